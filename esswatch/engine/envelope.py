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

import torch

__all__ = ["Envelope"]


class Envelope:
    """The envelope ``|T[r, c]| <= exp(out_r + inp_c + G_r - G_c)`` of a batch of operators, with the sums of
    the module doc precomputed once for all indices: ``log sum_{r' >= r} x_r'`` and ``log sum_{c' <= c} y_c'``
    (so each index costs a comparison over the sequence, not new cumulative sums).

    Args:
        out, inp, step: ``batch + (L,)`` float64, the log bounds (``-inf`` allowed: a zero row or column);
            ``step[s]`` bounds the transition applied at position ``s``.
    """

    def __init__(self, out: torch.Tensor, inp: torch.Tensor, step: torch.Tensor) -> None:
        G = torch.cumsum(step, dim=-1)
        self.rows = torch.logcumsumexp((2 * (out + G)).flip(-1), dim=-1).flip(-1)  # log sum_{r' >= r} x_r'
        self.cols = torch.logcumsumexp(2 * (inp - G), dim=-1)  # log sum_{c' <= c} y_c'
        self.seq_len = out.shape[-1]

    def _none(self) -> torch.Tensor:
        return torch.full(self.rows.shape[:-1], -torch.inf, dtype=self.rows.dtype, device=self.rows.device)

    def bound_norm(self, i: int) -> torch.Tensor:
        """The bound on ``log ||H_i||_F`` (``batch``): half the log of ``sum_{r >= i} x_r * sum_{c < i} y_c``."""
        return 0.5 * (self.rows[..., i] + self.cols[..., i - 1])

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
        budget = 2 * torch.as_tensor(log_eps, dtype=self.rows.dtype, device=self.rows.device) - math.log(2.0)
        # rows: sum_{r >= i + a} x_r decreases with a; a = how many of a = 0..L-i-1 exceed the budget
        a = int((self.rows[..., i:] + self.cols[..., i - 1, None] > budget[..., None]).sum(-1).max().item())
        # columns: sum_{c < i - b} y_c decreases with b; b = how many of b = 0..i-1 exceed it
        b = int((self.cols[..., :i] + self.rows[..., i, None] > budget[..., None]).sum(-1).max().item())
        return min(max(a, 1), L - i), min(max(b, 1), i)
