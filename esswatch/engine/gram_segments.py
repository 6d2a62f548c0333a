"""The Gramians ``P_i``, ``Q_i`` of a diagonal recurrence at a few sorted indices, by the segments between them
(see :mod:`.gram`'s module doc for ``R_i``, ``O_i`` and ``Lam``).

With ``i_0 < i_1 < ... < i_{n-1}`` and ``D_j = exp(Lam[i_j - 1] - Lam[i_{j-1} - 1]) <= 1``::

    P_{i_j} = D_j P_{i_{j-1}} D_j + sum_{c in [i_{j-1}, i_j)} (k_c w_c)(k_c w_c)^T,    w_c = exp(Lam[i_j - 1] - Lam[c])
    Q_{i_j} = D_{j+1} Q_{i_{j+1}} D_{j+1} + sum_{r in [i_j, i_{j+1})} (q_r v_r)(q_r v_r)^T,
                                                                  v_r = exp(Lam[r] - Lam[i_j - 1])

(``i_{-1} = 0``, ``i_n = L``). Every weight is ``<= 1``, each segment's sum is one batched matmul over its
positions, and the steps between segments are ``n`` per Gramian: ``O(L N^2)`` work for both, in forward time
(no reversed copies). Every weight and every ``D`` is a sum of ``log_decay`` over part of one segment (``D_j``
over all of it), so ``Lam`` is never formed over the whole sequence: without a graph each segment's clamped
cumulative sum, its weights and its weighted factor are formed in place in two float64 buffers of the longest
segment, allocated once (on CPU a fresh buffer of a segment's size cost more than the arithmetic on it:
``examples/benchmarks/gram_forms.py``). With a graph the same sums come from ``Lam`` out of place.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["LOG_FLOOR", "log_cumsum", "segment_gramians"]

#: log decays below this are clamped: exp(-1000) is exactly 0 in float64, and -inf would
#: turn the differences of cumulative sums into NaN
LOG_FLOOR = -1000.0

_Seg = Tuple[torch.Tensor, Optional[torch.Tensor]]


def log_cumsum(log_decay, shape):
    """``Lam`` (float64, each step clamped at ``LOG_FLOOR``) broadcast to ``shape`` = batch + (L, N); ``None`` for
    ``None``. Also the cumulative sum of ``GatedRecurrence``'s blocks."""
    if log_decay is None:
        return None
    if torch.is_grad_enabled() and log_decay.requires_grad:
        lam = torch.cumsum(torch.clamp(log_decay, min=LOG_FLOOR), dim=-2, dtype=torch.float64)
    else:  # one float64 buffer, clamped and summed in place
        lam = log_decay.to(torch.float64, copy=True).clamp_(min=LOG_FLOOR).cumsum_(-2)
    return lam.expand(*shape[:-1], lam.shape[-1])


class _WithGraph:
    """A segment's weighted Gramian and its ``D`` from ``Lam`` over the whole sequence, out of place (autograd)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, log_decay: Optional[torch.Tensor]) -> None:
        self.q, self.k = q, k
        self.lam = log_cumsum(log_decay, q.shape)

    def _gram(self, x: torch.Tensor, a: slice, b: slice) -> torch.Tensor:
        x = x.to(torch.float64)
        if self.lam is not None:
            x = x * torch.exp(self.lam[..., a, :] - self.lam[..., b, :])
        return x.transpose(-1, -2) @ x

    def _d(self, a: int, b: int) -> Optional[torch.Tensor]:
        return None if self.lam is None else torch.exp(self.lam[..., a, :] - self.lam[..., b, :])

    def past(self, s: int, i: int) -> _Seg:  # k over [s, i) weighted to i - 1; D = exp(Lam[i-1] - Lam[s-1])
        return self._gram(self.k[..., s:i, :], slice(i - 1, i), slice(s, i)), self._d(i - 1, s - 1) if s else None

    def future(self, i: int, e: int) -> _Seg:  # q over [i, e) weighted from i - 1; D = exp(Lam[e-1] - Lam[i-1])
        return self._gram(self.q[..., i:e, :], slice(i, e), slice(i - 1, i)), self._d(e - 1, i - 1)


class _InPlace:
    """The same without a graph, in two flat float64 buffers of ``longest`` positions per matrix, reused by every
    segment (each segment a contiguous view of their first entries): the factor's segment, and the segment's
    clamped cumulative sum of ``log_decay`` turned into its weights."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, log_decay: Optional[torch.Tensor], longest: int) -> None:
        self.q, self.k, self.ld = q, k, log_decay
        rows, opts = q[..., 0, 0].numel() * longest, dict(dtype=torch.float64, device=q.device)
        self.xbuf = torch.empty(rows * q.shape[-1], **opts)
        self.wbuf = None if log_decay is None else torch.empty(rows * log_decay.shape[-1], **opts)

    def _factor(self, x: torch.Tensor) -> torch.Tensor:
        return self.xbuf[: x.numel()].view(x.shape).copy_(x)

    def _local(self, a: int, b: int) -> torch.Tensor:  # sum_{t = a..c} log_decay[t] for c in [a, b)
        ld = self.ld[..., a:b, :]
        return self.wbuf[: ld.numel()].view(ld.shape).copy_(ld).clamp_(min=LOG_FLOOR).cumsum_(-2)

    def past(self, s: int, i: int) -> _Seg:
        x, d = self._factor(self.k[..., s:i, :]), None
        if self.ld is not None:
            w = self._local(s, i)
            total = w[..., -1:, :].clone()  # sum over [s, i): log D
            x.mul_(w.neg_().add_(total).exp_())  # exp(sum over (c, i)) = exp(Lam[i-1] - Lam[c])
            d = total.squeeze(-2).exp_()
        return x.transpose(-1, -2) @ x, d

    def future(self, i: int, e: int) -> _Seg:
        x, d = self._factor(self.q[..., i:e, :]), None
        if self.ld is not None:
            w = self._local(i, e)
            d = w[..., -1, :].exp()  # sum over [i, e): log D
            x.mul_(w.exp_())  # exp(sum over [i, r]) = exp(Lam[r] - Lam[i-1])
        return x.transpose(-1, -2) @ x, d


def _step(prev: torch.Tensor, seg: torch.Tensor, d: Optional[torch.Tensor]) -> torch.Tensor:  # D prev D + seg
    return prev + seg if d is None else prev * (d[..., :, None] * d[..., None, :]) + seg


def segment_gramians(q: torch.Tensor, k: torch.Tensor, log_decay: Optional[torch.Tensor], pos: List[int]):
    """``P_i`` and ``Q_i`` (float64, ``batch + (n, N, N)``) at the sorted unique indices ``pos`` (host ints in
    ``1..L-1``). ``q``, ``k``: ``batch + (L, N)``; ``log_decay``: broadcastable to ``batch + (L, N|1)`` (each step
    clamped at :data:`LOG_FLOOR`), or ``None`` without decay."""
    L = q.shape[-2]
    bounds = [0] + pos + [L]
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, log_decay))
    if grad or k.shape != q.shape:
        segs = _WithGraph(q, k, log_decay)
    else:
        ld = None if log_decay is None else log_decay.expand(*q.shape[:-1], log_decay.shape[-1])
        segs = _InPlace(q, k, ld, max(b - a for a, b in zip(bounds, bounds[1:])))
    P: List[torch.Tensor] = []
    for s, i in zip(bounds, pos):  # segments [i_{j-1}, i_j), forward
        seg, d = segs.past(s, i)
        P.append(_step(P[-1], seg, d) if P else seg)
    Q: List[torch.Tensor] = []
    for i, e in reversed(list(zip(pos, bounds[2:]))):  # segments [i_j, i_{j+1}), backward
        seg, d = segs.future(i, e)
        Q.append(_step(Q[-1], seg, d) if Q else seg)
    return torch.stack(P, dim=-3), torch.stack(Q[::-1], dim=-3)
