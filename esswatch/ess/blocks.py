"""Blocks ``H_i`` of one operator for one functional-API call, trimmed to their non-zeros.

Used by :mod:`esswatch.ess`; sits between the operators and the functional API.
"""

from __future__ import annotations

from typing import Optional

from ..engine.exact import nonzero_extents, trim_by_extents, trim_zero_lines
from ..engine.slq import hankel_frobenius2
from ..operators import Dense, GatedRecurrence, Operator

__all__ = ["BlockCache", "EXTENTS_FROM"]


#: a dense ``T`` is trimmed from its ``nonzero_extents`` when a call asks for at least this many
#: blocks; below, each block is scanned. Their cost: two lines of ``T`` when its first column and
#: last row have no zero (causal attention without padding), else a pass over the lines these
#: leave open, at worst all of ``T`` (L = 2048, 4 heads: about as much as scanning 4 interior
#: blocks; examples/benchmarks/materialize.py)
EXTENTS_FROM = 4


class BlockCache:
    """Blocks of ``T`` shared by all indices of one call, trimmed to their non-zero range.

    ``blocks``: how many blocks the call will ask for at most (``None``: many)."""

    def __init__(self, op: Operator, blocks: Optional[int] = None):
        self.op = op
        self._use_extents = blocks is None or blocks >= EXTENTS_FROM
        self._dense = None
        self._extents = None  # nonzero_extents(T): trims every block of the dense T without a pass over it
        self._left = None  # T[:, :N]   (recurrences: every H_i with i <= N lies in it)
        self._bottom = None  # T[L-N:, :] (every H_i with L - i <= N)

    def dense(self):
        if self._dense is None:
            self._dense = self.op.dense()
        return self._dense

    def _support(self, i: int):
        """``(rows, cols, own)``: ``H_i``'s non-zero support, and whether the operator narrows it
        (a window, a short kernel) so that the block comes from ``op.block``, not from ``T``."""
        L = self.op.seq_len
        rows, cols = self.op.hankel_support(i)
        narrowed = (rows.indices(L)[:2], cols.indices(L)[:2]) != ((i, L), (0, i))
        return rows, cols, narrowed and not isinstance(self.op, Dense)

    def hankel(self, i: int):
        """``H_i`` without its all-zero rows and columns (same non-zero singular values)."""
        op = self.op
        L = op.seq_len
        if self._dense is None and isinstance(op, GatedRecurrence):
            n = op.state_width
            if i <= n:
                if self._left is None:
                    self._left = op.block(slice(None), slice(0, n))
                return self._left[..., i:, :i]
            if L - i <= n:
                if self._bottom is None:
                    self._bottom = op.block(slice(L - n, None), slice(None))
                return self._bottom[..., i - (L - n) :, :i]
            return op.hankel(i)
        rows, cols, own = self._support(i)
        if own and self._dense is None:
            return trim_zero_lines(op.block(rows, cols))  # a window or a short kernel: never materialize T
        t = self.dense()
        if not self._use_extents:
            return trim_zero_lines(t[..., rows, cols])
        if self._extents is None:
            self._extents = nonzero_extents(t)
        return trim_by_extents(t, rows, cols, *self._extents)

    def frobenius2(self, indices) -> dict:
        """``{i: ||H_i||_F^2}`` (float64) from one pass over the dense ``T`` where every ``H_i`` is
        a slice of it (:meth:`hankel`; trimming zero lines keeps the norm), else ``{}``."""
        if not indices or (self._dense is None and self.op.has_gramians):
            return {}
        if any(self._support(i)[2] for i in indices):
            return {}  # a window or a short kernel: blocks from op.block, T never materialized
        return hankel_frobenius2(self.dense(), indices)
