"""Exact singular values of Hankel blocks, the fast way round.

* **Trimming**: rows and columns of a block that are exactly zero (in every batch entry)
  carry no singular value; dropping them first is exact. Sliding windows, padding masks
  and short convolution kernels leave most of a block zero. Structured operators know the
  non-zero range up front (``Operator.hankel_support``); :func:`trim_zero_lines` finds the
  rest from the block (one pass over it, far cheaper than the SVD).
* **Orientation**: LAPACK's SVD of a tall block (rows >= columns) is several times faster
  than of its wide transpose on CPU (measured: ``examples/benchmarks/estimators.py``), so
  wide blocks are transposed first (same singular values).
* **Batching**: blocks of equal shape (every interior index of a sliding window) go to one
  batched ``svdvals`` call.

Zero rows and columns get a zero gradient (their true derivative is unbounded: a new
singular value of size ``eps`` moves entropy by ``eps log eps``). Everything else is
differentiable through ``torch.linalg.svdvals``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["batched_svdvals", "oriented_svdvals", "trim_zero_lines"]

#: trim only when it removes at least this fraction of rows or columns (a copy is not free)
TRIM_MIN_GAIN = 0.1


def _keep(h: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    idx = mask.nonzero()[:, 0]
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if hi - lo == idx.numel():  # a contiguous range: a view, no copy
        return h.narrow(dim, lo, hi - lo)
    return h.index_select(dim, idx)


def trim_zero_lines(h: torch.Tensor) -> torch.Tensor:
    """``h`` without the rows and columns that are zero in every batch entry (exact).

    An all-zero block becomes a ``1 x 1`` zero block (one zero singular value).
    """
    m, n = h.shape[-2:]
    if m == 0 or n == 0:
        return h
    nz = (h.detach() != 0).reshape(-1, m, n).any(0)
    rows, cols = nz.any(-1), nz.any(-2)
    r, c = int(rows.sum()), int(cols.sum())
    if r == 0:
        return h[..., :1, :1] * 0
    if r <= (1 - TRIM_MIN_GAIN) * m:
        h = _keep(h, rows, -2)
    if c <= (1 - TRIM_MIN_GAIN) * n:
        h = _keep(h, cols, -1)
    return h


def oriented_svdvals(h: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals`` of ``h`` in its tall orientation (faster on CPU, same values)."""
    if h.shape[-2] < h.shape[-1]:
        h = h.transpose(-1, -2)
    return torch.linalg.svdvals(h)


def batched_svdvals(blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values of each block; blocks of equal (oriented) shape share one batched call."""
    out: list = [None] * len(blocks)
    groups: dict[tuple, list] = {}
    for j, h in enumerate(blocks):
        if h.shape[-2] < h.shape[-1]:
            h = h.transpose(-1, -2)
        groups.setdefault((tuple(h.shape), h.dtype, h.device), []).append((j, h))
    for members in groups.values():
        if len(members) == 1:
            j, h = members[0]
            out[j] = torch.linalg.svdvals(h)
            continue
        sv = torch.linalg.svdvals(torch.stack([h for _, h in members], dim=0))
        for pos, (j, _) in enumerate(members):
            out[j] = sv[pos]
    return out
