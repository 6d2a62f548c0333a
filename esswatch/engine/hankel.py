"""Hankel blocks ``H_i = T[..., i:, :i]`` of dense causal matrices."""
from __future__ import annotations

from typing import List

import torch

__all__ = ["hankel_fro2_dense", "hankel_singular_values_dense"]


def hankel_fro2_dense(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Exact ``||T[..., i:, :i]||_F^2`` for every index, by 2-D prefix sums of ``T^2``.

    O(L^2) per matrix for all indices; accumulated in float64. Returns
    ``batch + (len(indices),)`` in float64.
    """
    sq = t.detach().to(torch.float64) ** 2
    row_prefix = torch.cumsum(sq, dim=-1)                     # [r, c] = sum_{c' <= c} T[r, c']^2
    suffix = torch.flip(torch.cumsum(torch.flip(row_prefix, dims=[-2]), dim=-2), dims=[-2])  # sum_{r' >= r}
    idx = indices.to(t.device)
    return suffix[..., idx, idx - 1]


def hankel_singular_values_dense(t: torch.Tensor, indices: torch.Tensor) -> List[torch.Tensor]:
    """Singular values of each ``H_i`` (one tensor ``batch + (min(i, L-i),)`` per index).

    O(L^3) per index. Differentiable (``torch.linalg.svdvals``; its backward
    ``U diag(g) V^T`` is well defined for repeated and zero singular values).
    """
    return [torch.linalg.svdvals(t[..., int(i):, : int(i)]) for i in indices.tolist()]
