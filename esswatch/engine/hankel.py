"""Hankel blocks ``H_i = T[..., i:, :i]`` of dense causal matrices."""

from __future__ import annotations

import torch

__all__ = ["hankel_fro2_dense"]


def hankel_fro2_dense(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Exact ``||T[..., i:, :i]||_F^2`` for every index, O(L^2) per matrix for all indices.

    With ``A = T^2`` (strictly lower part), ``colfuture[c] = sum_{r > c} A[r, c]`` and
    ``rowpast[r] = sum_{c < r} A[r, c]``::

        ||H_i||_F^2 = sum_{c < i} colfuture[c] - sum_{r < i} rowpast[r]

    (the second sum removes the pairs ``c < r < i`` inside the past). Accumulated in
    float64. Returns ``batch + (len(indices),)`` in float64.
    """
    a = torch.tril(t.detach().to(torch.float64) ** 2, diagonal=-1)
    colfuture = a.sum(dim=-2)
    rowpast = a.sum(dim=-1)
    fro2 = torch.cumsum(colfuture - rowpast, dim=-1)  # [j] = value for i = j + 1
    return torch.clamp(fro2[..., indices.to(t.device) - 1], min=0)
