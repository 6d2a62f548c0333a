"""The squared Hankel singular values from the Gramians of any factored operator ``H_i = O_i R_i``
(``P_i = R_i R_i^T``, ``Q_i = O_i^T O_i``): the eigenvalues of ``P_i Q_i``, in float64.

Shared by the diagonal recurrences (:mod:`.gram`) and the gated delta rule (:mod:`.delta_gram`); the
numerics are described in :mod:`.gram`'s module doc.
"""

from __future__ import annotations

import torch

__all__ = ["gramian_squared_singular_values", "GROUP_BYTES", "SQRT_RTOL"]


#: the eigenproblems of :func:`gramian_squared_singular_values` run in groups of indices whose ``P`` holds at most
#: this many bytes: the steps make about ten float64 copies of it (without groups, 64 matrices of N = 128 at 8
#: indices would hold about 300 MB at once)
GROUP_BYTES = 1 << 22


def gramian_squared_singular_values(
    P: torch.Tensor, Q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigma2, ok, fro2)`` from Gramians ``P_i, Q_i`` (``batch + (n, N, N)``, float64) of any factored
    operator ``H_i = O_i R_i``: the eigenvalues of ``P_i Q_i`` (descending, clamped at 0), the mask of the
    resolved entries and ``trace(P_i Q_i)`` (see :func:`gram_squared_singular_values`). Indices are taken in
    groups of at most :data:`GROUP_BYTES` of ``P``."""
    n = P.shape[-3]
    step = max(1, GROUP_BYTES // max(1, P[..., :1, :, :].numel() * P.element_size()))
    if n <= step:
        return _from_gramians(P, Q)
    parts = [_from_gramians(P[..., j : j + step, :, :], Q[..., j : j + step, :, :]) for j in range(0, n, step)]
    return tuple(torch.cat([p[m] for p in parts], dim=-2 if m == 0 else -1) for m in range(3))


def _from_gramians(P: torch.Tensor, Q: torch.Tensor):
    grad = torch.is_grad_enabled() and (P.requires_grad or Q.requires_grad)
    if not grad:  # every P factors (the common case): its Cholesky factor as it comes
        cp, info = torch.linalg.cholesky_ex(P)
        if not bool(info.any()):
            m = cp.transpose(-1, -2) @ Q @ cp
            fro2 = m.diagonal(dim1=-2, dim2=-1).sum(-1)  # trace(C^T Q C) = trace(P Q)
            lam = torch.clamp(torch.linalg.eigvalsh(m).flip(-1), min=0)  # eigvalsh reads one triangle
            return lam, torch.ones_like(info, dtype=torch.bool), fro2
    fro2 = (P * Q).sum(dim=(-1, -2))  # trace(P Q) for symmetric P, Q
    with torch.no_grad():  # which factorizations exist (no graph: a failed one has no usable backward)
        use_p = torch.linalg.cholesky_ex(P)[1] == 0
        use_q = (~use_p) & (torch.linalg.cholesky_ex(Q)[1] == 0)
    ok = use_p | use_q
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    # Factor only matrices known to factor (identity elsewhere): the backward of a failed
    # Cholesky holds inf/NaN, which torch.where's zero gradient would turn into NaN (0 * inf).
    cp = torch.linalg.cholesky_ex(torch.where(use_p[..., None, None], P, eye))[0]
    cq = torch.linalg.cholesky_ex(torch.where(use_q[..., None, None], Q, eye))[0]
    # M = C^T X C with (C, X) = (chol P, Q) or (chol Q, P); identity where neither factor exists.
    c = torch.where(use_p[..., None, None], cp, torch.where(use_q[..., None, None], cq, eye))
    x = torch.where(use_p[..., None, None], Q, torch.where(use_q[..., None, None], P, eye))
    m = c.transpose(-1, -2) @ x @ c
    m = 0.5 * (m + m.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(m).flip(-1)
    lam = torch.clamp(lam, min=0)
    if not bool(ok.all()) and not grad:
        lam, ok = _square_roots_where_singular(P, Q, lam, ok)
    return lam, ok, fro2


#: :func:`_square_roots_where_singular` drops a Gramian's eigenvalues below this fraction of its largest
#: (float64 round-off of the eigenvalues is about ``N * 1e-16`` of it)
SQRT_RTOL = 1e-13


def _square_roots_where_singular(P, Q, lam, ok):
    """Where neither Gramian factors (a state all but erased on both sides of the index: fast decays),
    and no gradient is needed: the singular values of ``Q^(1/2) P^(1/2)`` from their eigendecompositions,
    each truncated to its eigenvalues above :data:`SQRT_RTOL` of its largest (what remains is round-off,
    which would otherwise add up to ``N`` spurious values near ``1e-8 s_1``)."""
    bad = ~ok
    p, q = P[bad], Q[bad]
    dp, vp = torch.linalg.eigh(p)
    dq, vq = torch.linalg.eigh(q)
    dp = torch.where(dp > SQRT_RTOL * dp[..., -1:], dp, torch.zeros_like(dp))
    dq = torch.where(dq > SQRT_RTOL * dq[..., -1:], dq, torch.zeros_like(dq))
    core = torch.sqrt(dq)[..., :, None] * (vq.transpose(-1, -2) @ vp) * torch.sqrt(dp)[..., None, :]
    lam = lam.clone()
    lam[bad] = torch.linalg.svdvals(core) ** 2
    return lam, torch.ones_like(ok)
