"""Exact singular values of Hankel blocks, the fast way round.

* **Trimming**: rows and columns of a block that are exactly zero (in every batch entry)
  carry no singular value; dropping them first is exact. Sliding windows, padding masks
  and short convolution kernels leave most of a block zero. Structured operators know the
  non-zero range up front (``Operator.hankel_support``); :func:`trim_zero_lines` finds the
  rest from the block (one pass over it, far cheaper than the SVD). When the whole ``T`` is
  materialized, one pass over it (:func:`nonzero_extents`: each row's first and each
  column's last non-zero) trims every block ``T[i:, :i]`` without touching it
  (:func:`trim_by_extents`, the same blocks bit for bit).
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

__all__ = [
    "EXACT_CHUNK_BYTES",
    "batched_svdvals",
    "nonzero_extents",
    "oriented_svdvals",
    "trim_by_extents",
    "trim_zero_lines",
]

#: without gradients, the exact route builds and decomposes the blocks of one call in chunks of at most this
#: many bytes of block values: a window's or a short kernel's thousands of equal blocks (each holding its
#: scores) are never all alive at once
EXACT_CHUNK_BYTES = 1 << 26

#: trim only when it removes at least this fraction of rows or columns (a copy is not free)
TRIM_MIN_GAIN = 0.1


def _keep(h: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    idx = mask.nonzero()[:, 0]
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if hi - lo == idx.numel():  # a contiguous range: a view, no copy
        return h.narrow(dim, lo, hi - lo)
    return h.index_select(dim, idx)


def _trim(h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``h`` without the rows / columns whose flag in ``rows`` / ``cols`` is False (the zero ones)."""
    m, n = h.shape[-2:]
    r, c = int(rows.sum()), int(cols.sum())
    if r == 0:
        return h[..., :1, :1] * 0
    if r <= (1 - TRIM_MIN_GAIN) * m:
        h = _keep(h, rows, -2)
    if c <= (1 - TRIM_MIN_GAIN) * n:
        h = _keep(h, cols, -1)
    return h


def trim_zero_lines(h: torch.Tensor) -> torch.Tensor:
    """``h`` without the rows and columns that are zero in every batch entry (exact).

    An all-zero block becomes a ``1 x 1`` zero block (one zero singular value).
    """
    m, n = h.shape[-2:]
    if m == 0 or n == 0:
        return h
    nz = (h.detach() != 0).reshape(-1, m, n).any(0)
    return _trim(h, nz.any(-1), nz.any(-2))


def nonzero_extents(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, last)`` of a batch of ``M x N`` matrices ``t`` (detached):
    ``first[r]``: the first column with a non-zero in row ``r`` in any batch entry (``N`` if none);
    ``last[c]``: the last row with a non-zero in column ``c`` in any batch entry (``-1`` if none).

    Row ``r`` of the block ``t[..., r0:r1, c0:c1]`` is then non-zero iff ``first[r] < c1``
    (when ``first[r] >= c0``), column ``c`` iff ``last[c] >= r0`` (when ``last[c] < r1``):
    every Hankel block ``t[..., i:, :i]`` is trimmed from them (:func:`trim_by_extents`).

    A row with a non-zero in column 0 starts there, and a column with a non-zero in the last row
    ends there: only the other lines are scanned (none in causal attention without padding, whose
    first column and last row have no zero: then two lines are read instead of ``M x N``). When
    more than half of the rows or of the columns stay open (padding that empties the first column
    or the last row), one pass over all of ``t`` finds both, as without this shortcut.
    """
    m, n = t.shape[-2:]
    if m == 0 or n == 0:
        return torch.full((m,), n, device=t.device), torch.full((n,), -1, device=t.device)
    flat = t.detach().reshape(-1, m, n)
    first = torch.zeros(m, dtype=torch.long, device=t.device)
    last = torch.full((n,), m - 1, dtype=torch.long, device=t.device)
    rows = (flat[:, :, 0] == 0).all(0).nonzero()[:, 0]  # rows not settled by column 0
    cols = (flat[:, m - 1, :] == 0).all(0).nonzero()[:, 0]  # columns not settled by the last row
    if 2 * rows.numel() > m or 2 * cols.numel() > n:  # e.g. padding: one pass over all of t
        rows, cols = torch.arange(m, device=t.device), torch.arange(n, device=t.device)
        nz_rows = nz_cols = _any_nonzero(flat, None, -2)
    else:
        nz_rows = _any_nonzero(flat, rows, -2) if rows.numel() else None
        nz_cols = _any_nonzero(flat, cols, -1) if cols.numel() else None
    if rows.numel():
        f = nz_rows.view(torch.uint8).argmax(-1)  # argmax: the first maximum; a line without a non-zero has 0
        first[rows] = torch.where(nz_rows.gather(-1, f[:, None])[:, 0], f, n)
    if cols.numel():
        la = m - 1 - nz_cols.flip(-2).view(torch.uint8).argmax(-2)
        last[cols] = torch.where(nz_cols.gather(-2, la[None, :])[0], la, -1)
    return first, last


def _any_nonzero(flat: torch.Tensor, lines, dim: int) -> torch.Tensor:
    """Boolean: which entries of the rows (``dim=-2``) or columns (``dim=-1``) ``lines`` (``None``:
    all) of ``flat`` (``B x M x N``) are non-zero in any batch entry; one entry at a time (a buffer
    of the lines' size, not ``B`` of them)."""
    nz = buf = None
    for entry in flat:
        part = entry if lines is None else entry.index_select(dim, lines)
        if nz is None:
            nz, buf = part != 0, torch.empty(part.shape, dtype=torch.bool, device=part.device)
        else:
            torch.ne(part, 0, out=buf)
            nz |= buf
    return nz


def trim_by_extents(t: torch.Tensor, rows: slice, cols: slice, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``trim_zero_lines(t[..., rows, cols])`` (the same block, bit for bit) from the
    :func:`nonzero_extents` of ``t``: no pass over the block. ``rows``, ``cols``: unit-step
    slices. Where the extents cannot decide (a non-zero left of ``cols`` or below ``rows``),
    the block is scanned as :func:`trim_zero_lines` does."""
    (r0, r1, rs), (c0, c1, cs) = rows.indices(t.shape[-2]), cols.indices(t.shape[-1])
    h = t[..., rows, cols]
    m, n = h.shape[-2:]
    if m == 0 or n == 0:
        return h
    if rs != 1 or cs != 1:
        return trim_zero_lines(h)
    f, la = first[r0:r1], last[c0:c1]
    if (c0 > 0 and bool((f < c0).any())) or (r1 < t.shape[-2] and bool((la >= r1).any())):
        return trim_zero_lines(h)
    return _trim(h, f < c1, la >= r0)


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
