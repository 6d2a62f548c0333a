"""The Gramians ``P_i``, ``Q_i`` of a diagonal recurrence at a few sorted indices, by the segments between them
(see :mod:`.gram`'s module doc for ``R_i``, ``O_i`` and ``Lam``).

With ``i_0 < i_1 < ... < i_{n-1}`` and ``D_j = exp(Lam[i_j - 1] - Lam[i_{j-1} - 1]) <= 1``::

    P_{i_j} = D_j P_{i_{j-1}} D_j + sum_{c in [i_{j-1}, i_j)} (k_c w_c)(k_c w_c)^T,    w_c = exp(Lam[i_j - 1] - Lam[c])
    Q_{i_j} = D_{j+1} Q_{i_{j+1}} D_{j+1} + sum_{r in [i_j, i_{j+1})} (q_r v_r)(q_r v_r)^T,
                                                                  v_r = exp(Lam[r] - Lam[i_j - 1])

(``i_{-1} = 0``, ``i_n = L``). Every weight is ``<= 1``, each segment's sum is one batched matmul over its
positions, and the steps between segments are ``n`` per Gramian: ``O(L N^2)`` work for both, in forward time
(no reversed copies), with no buffer of ``L x N`` per matrix beyond ``Lam``.
"""

from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["segment_gramians"]


def _weighted_gram(x: torch.Tensor, logw: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum_t (x_t exp(logw_t)) (x_t exp(logw_t))^T`` over the positions of ``x`` (``batch + (len, N)``), in
    float64 (only the segment is converted)."""
    x = x.to(torch.float64)
    if logw is not None:
        x = x * torch.exp(logw)
    return x.transpose(-1, -2) @ x


def segment_gramians(q: torch.Tensor, k: torch.Tensor, lam: Optional[torch.Tensor], pos: List[int]):
    """``P_i`` and ``Q_i`` (float64, ``batch + (n, N, N)``) at the sorted unique indices ``pos`` (host ints in
    ``1..L-1``). ``q``, ``k``: ``batch + (L, N)``; ``lam``: ``Lam`` (float64, clamped per step:
    :func:`~esswatch.engine.gram.log_cumsum`) broadcast to ``batch + (L, N|1)``, or ``None`` without decay."""
    L = q.shape[-2]

    def log_gap(a: slice, b: slice):  # Lam[a] - Lam[b], or None without decay
        return None if lam is None else lam[..., a, :] - lam[..., b, :]

    def step(prev: torch.Tensor, a: int, b: int) -> torch.Tensor:  # D prev D, D = exp(Lam[a] - Lam[b]) <= 1
        if lam is None:
            return prev
        d = torch.exp(lam[..., a, :] - lam[..., b, :])
        return prev * (d[..., :, None] * d[..., None, :])

    P: List[torch.Tensor] = []
    for j, i in enumerate(pos):  # segments [i_{j-1}, i_j), forward
        s = pos[j - 1] if j else 0
        seg = _weighted_gram(k[..., s:i, :], log_gap(slice(i - 1, i), slice(s, i)))
        P.append(step(P[-1], i - 1, s - 1) + seg if P else seg)
    ends = pos[1:] + [L]
    Q: List[torch.Tensor] = []
    for j in reversed(range(len(pos))):  # segments [i_j, i_{j+1}), backward
        i, e = pos[j], ends[j]
        seg = _weighted_gram(q[..., i:e, :], log_gap(slice(i, e), slice(i - 1, i)))
        Q.append(step(Q[-1], e - 1, i - 1) + seg if Q else seg)
    return torch.stack(P, dim=-3), torch.stack(Q[::-1], dim=-3)
