"""How far from index ``i`` a decaying operator's Hankel block ``H_i`` can still hold anything: the window
of rows and columns outside which its entries are provably negligible.

Recurrences with a bounded transition per step (the gated delta rule, diagonal gated recurrences) obey an
*envelope* ``|T[r, c]| <= exp(out_r + in_c + G_r - G_c)`` with ``G`` the cumulative sum of a per-step log
bound (``G_r - G_c = sum_{s=c+1..r} step_s``). For ``H_i`` restricted to the rows ``[i, i + a)`` and the
columns ``[i - b, i)`` the Frobenius norm of the part left out is then at most ``sqrt(e)`` with::

    e = sum_{r >= i + a} x_r * sum_{c < i} y_c  +  sum_{r >= i} x_r * sum_{c < i - b} y_c,
    x_r = exp(2 (out_r + G_r)),  y_c = exp(2 (in_c - G_c))

(the two sums of a product separate), so every singular value of the window is within ``sqrt(e)`` of
``H_i``'s (Weyl). Where the gates forget within a few steps the window is a few dozen positions wide, and
a block that would otherwise need the whole ``L x L`` operator is a small one. The sums are taken in the
log domain (``G`` reaches ``-1e5`` on long sequences with fast gates).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["Envelope"]


class Envelope:
    """The envelope ``|T[r, c]| <= exp(out_r + inp_c + G_r - G_c)`` of a batch of operators, with the sums of
    the module doc, ``log sum_{r' >= r} x_r'`` and ``log sum_{c' <= c} y_c'``, precomputed for all indices the
    first time a window is asked for (so each index then costs a comparison over the sequence, not new
    cumulative sums). :meth:`bound_norm` and :meth:`wider_than` before that take the few sums they need on
    their own, so a call whose windows would be too wide anyway never pays for the cumulative ones.

    Args:
        out, inp, step: ``batch + (L,)`` float64, the log bounds (``-inf`` allowed: a zero row or column);
            ``step[s]`` bounds the transition applied at position ``s``.
    """

    def __init__(self, out: torch.Tensor, inp: torch.Tensor, step: torch.Tensor) -> None:
        G = torch.cumsum(step, dim=-1)
        self._lx = 2 * (out + G)  # log x_r
        self._ly = 2 * (inp - G)  # log y_c
        self._rows: Optional[torch.Tensor] = None
        self._cols: Optional[torch.Tensor] = None
        self.seq_len = out.shape[-1]

    @property
    def rows(self) -> torch.Tensor:
        """``log sum_{r' >= r} x_r'`` for every ``r`` (``batch + (L,)``)."""
        if self._rows is None:
            self._rows = torch.logcumsumexp(self._lx.flip(-1), dim=-1).flip(-1)
        return self._rows

    @property
    def cols(self) -> torch.Tensor:
        """``log sum_{c' <= c} y_c'`` for every ``c`` (``batch + (L,)``)."""
        if self._cols is None:
            self._cols = torch.logcumsumexp(self._ly, dim=-1)
        return self._cols

    def _row(self, r: int) -> torch.Tensor:  # rows[..., r], from the cumulative sums where they exist
        return self._rows[..., r] if self._rows is not None else torch.logsumexp(self._lx[..., r:], dim=-1)

    def _col(self, c: int) -> torch.Tensor:  # cols[..., c]
        return self._cols[..., c] if self._cols is not None else torch.logsumexp(self._ly[..., : c + 1], dim=-1)

    def _none(self) -> torch.Tensor:
        return torch.full(self.rows.shape[:-1], -torch.inf, dtype=self.rows.dtype, device=self.rows.device)

    def _half_budget(self, log_eps) -> torch.Tensor:  # log of half of exp(2 log_eps): each side's share
        return 2 * torch.as_tensor(log_eps, dtype=self._lx.dtype, device=self._lx.device) - math.log(2.0)

    def bound_norm(self, i: int) -> torch.Tensor:
        """The bound on ``log ||H_i||_F`` (``batch``): half the log of ``sum_{r >= i} x_r * sum_{c < i} y_c``."""
        return 0.5 * (self._row(i) + self._col(i - 1))

    def wider_than(self, i: int, log_eps: torch.Tensor, width: int) -> bool:
        """Whether :meth:`window` ``(i, log_eps)`` would take more than ``width`` rows or more than ``width``
        columns, decided from two sums on each side (not the cumulative ones). ``True`` only with a margin over
        the budget of ``1e-6 (1 + |budget|)`` in the log, far above the round-off between these sums and the
        cumulative ones, so it never contradicts :meth:`window`; ``False`` where it cannot tell."""
        L = self.seq_len
        budget = self._half_budget(log_eps)
        budget = budget + torch.where(budget.isfinite(), 1e-6 * (1 + budget.abs()), 0.0)
        over = []
        if i + width < L:  # a > width: the rows from i + width on still exceed the half budget
            over.append(self._row(i + width) + self._col(i - 1) > budget)
        if width < i:  # b > width
            over.append(self._col(i - width - 1) + self._row(i) > budget)
        return any(bool(o.any()) for o in over)

    def left_out(self, i: int, a: int, b: int) -> torch.Tensor:
        """The bound on the log of the Frobenius norm of ``H_i`` outside rows ``[i, i + a)`` and columns
        ``[i - b, i)`` (``batch``; ``-inf`` when nothing is left out)."""
        L = self.seq_len
        rows = self.rows[..., i + a] + self.cols[..., i - 1] if i + a < L else self._none()
        cols = self.cols[..., i - b - 1] + self.rows[..., i] if b < i else self._none()
        return 0.5 * torch.logaddexp(rows, cols)

    def window(self, i: int, log_eps: torch.Tensor) -> tuple[int, int]:
        """``(a, b)``: the fewest rows after ``i`` and columns before it such that, in every batch entry, the
        part of ``H_i`` outside rows ``[i, i + a)`` and columns ``[i - b, i)`` has a Frobenius norm of at most
        ``exp(log_eps)`` (``batch`` or a scalar; ``-inf`` asks for all of ``H_i``, ``+inf`` for nothing) by the
        envelope, each of the two sums of the module doc getting half of ``exp(2 log_eps)``.

        Returns ``a`` in ``1..L-i`` and ``b`` in ``1..i`` (the whole block where nothing can be left out).
        """
        L = self.seq_len
        budget = self._half_budget(log_eps)
        # rows: sum_{r >= i + a} x_r decreases with a; a = how many of a = 0..L-i-1 exceed the budget
        a = int((self.rows[..., i:] + self.cols[..., i - 1, None] > budget[..., None]).sum(-1).max().item())
        # columns: sum_{c < i - b} y_c decreases with b; b = how many of b = 0..i-1 exceed it
        b = int((self.cols[..., :i] + self.rows[..., i, None] > budget[..., None]).sum(-1).max().item())
        return min(max(a, 1), L - i), min(max(b, 1), i)
