"""Exact Hankel singular values of diagonal recurrences via the Gramians.

For ``T[r, c] = sum_n q[r, n] k[c, n] prod_{s=c+1..r} a[s, n]`` (``docs/ess.md`` section 1,
``a = exp(log_decay)``) the Hankel block factors as ``H_i = O_i R_i`` with an
``N``-dimensional state, and the squared singular values of ``H_i`` are the
eigenvalues of ``P_i Q_i`` where (``docs/ess.md`` section 4, diagonal ``A``)::

    P_1 = k_0 k_0^T,   P_{i+1} = a_i a_i^T * P_i + k_i k_i^T          (forward)
    Q_L = 0,           Q_i     = a_i a_i^T * (q_i q_i^T + Q_{i+1})     (backward)

All ``L - 1`` indices cost ``O(L N^2)`` for the two recursions plus one
``N x N`` symmetric eigenproblem per kept index. The recursions and the
eigenproblem run in float64: squaring loses half the digits of the small
singular values, so float64 resolves singular values down to about
``1e-8 * s_1`` (their entropy contribution below that is under ``1e-6``).

The eigenproblem is made symmetric with a Cholesky factor ``P_i = C C^T``:
``eig(P Q) = eig(C^T Q C)``. Where ``P_i`` is singular (``i < N``, or a
degenerate recurrence) the Cholesky of ``Q_i`` is tried instead, and where both
fail the index is returned as "unresolved" so the caller computes it densely.
Everything is differentiable with finite gradients (``eigvalsh``'s backward
``V diag(g) V^T`` is well defined for repeated eigenvalues; the square root uses
:func:`safe_sqrt`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .spectral import safe_sqrt

__all__ = ["gram_squared_singular_values", "gram_singular_values"]


def _gramians(q: torch.Tensor, k: torch.Tensor, log_decay: Optional[torch.Tensor], indices: torch.Tensor):
    """``P_i`` and ``Q_i`` (float64) at the requested indices, shape ``batch + (n, N, N)``."""
    L = q.shape[-2]
    want = torch.zeros(L + 1, dtype=torch.bool)
    want[indices] = True
    want_list = want.tolist()
    pos = {int(i): j for j, i in enumerate(indices.tolist())}

    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64)
    if log_decay is None:
        aa = None
    else:
        a = torch.exp(log_decay.to(torch.float64))
        a = a.expand(*q.shape[:-1], a.shape[-1])
        aa = a[..., :, :, None] * a[..., :, None, :]             # batch + (L, N|1, N|1)
    # unbind along time once: indexing one step at a time would make autograd's backward
    # scatter into a full (L, N, N) zero tensor per step (O(L^2 N^2) instead of O(L N^2))
    kk = (k64[..., :, :, None] * k64[..., :, None, :]).unbind(-3)   # L x batch + (N, N)
    qq = (q64[..., :, :, None] * q64[..., :, None, :]).unbind(-3)
    if aa is not None:
        aa = aa.unbind(-3)

    n = len(pos)
    p_out = [None] * n
    q_out = [None] * n

    # forward: P_1 = k_0 k_0^T ; P_{i+1} = aa_i * P_i + kk_i
    P = kk[0]
    if want_list[1]:
        p_out[pos[1]] = P
    for i in range(1, L - 1):
        P = (aa[i] * P if aa is not None else P) + kk[i]
        if want_list[i + 1]:
            p_out[pos[i + 1]] = P
    # backward: Q_L = 0 ; Q_i = aa_i * (qq_i + Q_{i+1})
    Q = None
    for i in range(L - 1, 0, -1):
        inner = qq[i] if Q is None else qq[i] + Q
        Q = aa[i] * inner if aa is not None else inner
        if want_list[i]:
            q_out[pos[i]] = Q
    return torch.stack(p_out, dim=-3), torch.stack(q_out, dim=-3)


def gram_squared_singular_values(
    q: torch.Tensor, k: torch.Tensor, log_decay: Optional[torch.Tensor], indices: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared Hankel singular values (float64) for a diagonal recurrence.

    Args:
        q, k: ``batch + (L, N)``.
        log_decay: broadcastable to ``batch + (L, N)`` (``(L, 1)`` for one decay
            per head), or ``None`` for plain linear attention.
        indices: 1-D int64 CPU tensor of indices in ``1..L-1``.

    Returns:
        ``(sigma2, ok, fro2)``: eigenvalues ``batch + (n, N)`` (descending, clamped
        at 0), a bool mask ``batch + (n,)`` of the entries that were resolved
        (False where both Gramians were numerically singular), and the exact
        ``||H_i||_F^2 = trace(P_i Q_i)``.
    """
    P, Q = _gramians(q, k, log_decay, indices)
    fro2 = (P * Q).sum(dim=(-1, -2))                      # trace(P Q) for symmetric P, Q
    cp, info_p = torch.linalg.cholesky_ex(P)
    cq, info_q = torch.linalg.cholesky_ex(Q)
    use_p = info_p == 0
    use_q = (~use_p) & (info_q == 0)
    ok = use_p | use_q
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    # M = C^T X C with (C, X) = (chol P, Q) or (chol Q, P); identity where neither factor exists.
    c = torch.where(use_p[..., None, None], cp, torch.where(use_q[..., None, None], cq, eye))
    x = torch.where(use_p[..., None, None], Q, torch.where(use_q[..., None, None], P, eye))
    m = c.transpose(-1, -2) @ x @ c
    m = 0.5 * (m + m.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(m).flip(-1)
    lam = torch.clamp(lam, min=0)
    return lam, ok, fro2


def gram_singular_values(q, k, log_decay, indices):
    """Like :func:`gram_squared_singular_values` but returns singular values (finite gradients)."""
    lam, ok, fro2 = gram_squared_singular_values(q, k, log_decay, indices)
    return safe_sqrt(lam), ok, fro2
