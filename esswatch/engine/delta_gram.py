"""Gramians of the gated delta rule, without materializing ``T``.

The gated delta rule (``docs/ess.md`` section 1) has the state recurrence
``S_t = B_t S_{t-1} + beta_t k_t v_t^T`` with ``B_t = exp(g_t) (I - beta_t k_t k_t^T)`` (symmetric) and the
readout ``o_t = S_t^T q_t``, so ``T[r, c] = beta_c q_r^T B_r ... B_{c+1} k_c`` and the Hankel block factors
through the ``N``-dimensional state as ``H_i = O_i R_i`` with::

    R_i[:, c] = B_{i-1} ... B_{c+1} beta_c k_c          (c < i)
    O_i[r, :] = q_r^T B_r ... B_i                       (r >= i)

The squared singular values of ``H_i`` are the eigenvalues of ``P_i Q_i`` (:mod:`.gram`), where
``P_i = R_i R_i^T`` obeys ``P_{t+1} = B_t P_t B_t + beta_t^2 k_t k_t^T`` and
``Q_i = O_i^T O_i = B_i (q_i q_i^T + Q_{i+1}) B_i``: the same forward recurrence in reversed time, with the
input ``B_r q_r`` in place of ``beta_r k_r``.

The positions are cut into segments (chunks of ``C`` positions, also cut at every requested index). Over a
segment ``[a, b)`` the recurrence ``X_t = B_t X_{t-1} + u_t e_t^T`` has a closed form (the WY / UT form of
chunked delta-rule kernels): with ``G`` the cumulative sum of ``g`` inside the segment,
``E[t, s] = exp(G_t - G_s)`` for ``s < t`` (else 0) and the unit lower-triangular
``A = I + diag(beta) (K K^T * E)``,

* the segment's transition ``M = B_{b-1} ... B_a = exp(G_last) I - K^T diag(w) A^-1 diag(beta exp(G)) K``,
* its own columns ``W[:, s] = B_{b-1} ... B_{s+1} u_s = U^T diag(w) - K^T diag(w) A^-1 diag(beta) (K U^T * E)``,

with ``w = exp(G_last - G)``. Every exponent is ``<= 0``. Then ``P_b = M P_a M^T + W W^T``: per segment one
``C x C`` triangular solve and a few products of at most ``N x max(N, C)`` matrices, ``L / C + n`` segments
in float64, ``O(L (N^2 + C N))`` per matrix, never an ``L x L`` buffer. Differentiable. Segment by segment
(not all segments batched): batched, the large temporaries cost more than the loop (page faults; about
2.5x slower at 16 heads, ``L = 2048``, ``N = 128``).
"""

from __future__ import annotations

import torch

from .gram import _LOG_FLOOR, gramian_squared_singular_values

__all__ = ["delta_gramians", "delta_gram_squared_singular_values", "delta_window", "delta_rule_dense", "SEGMENT"]

#: positions per segment (at most): the triangular systems are ``SEGMENT x SEGMENT``; between 64 and 128
#: the work per matrix is flat for ``N = 128`` (examples/benchmarks/delta_rule.py)
SEGMENT = 64


def _segment(k, u, beta, g, q=None):
    """``(M, W, D)`` of one segment (module doc); ``k, u (..., C, N)``, ``beta, g (..., C)``. With ``q (..., C, N)``,
    ``D`` is the segment's own block of ``T`` (rows and columns in the segment, :func:`delta_rule_dense`), else
    ``None``."""
    C, N = k.shape[-2:]
    G = torch.cumsum(g.to(torch.float64), dim=-1)  # float64 sums: the differences of long ones keep their digits
    g_last = G[..., -1:]
    lower = torch.tril(torch.ones(C, C, dtype=torch.bool, device=k.device), -1)
    diff = G[..., :, None] - G[..., None, :]
    E = torch.exp(torch.where(lower, diff, torch.full_like(diff, float("-inf")))).to(k.dtype)
    w = torch.exp(g_last - G).to(k.dtype)[..., :, None]
    decay_in, decay_all = torch.exp(G).to(k.dtype), torch.exp(g_last).to(k.dtype)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    A = eye + beta[..., :, None] * (k @ k.transpose(-1, -2)) * E
    rhs = torch.cat([beta[..., :, None] * (k @ u.transpose(-1, -2)) * E, (beta * decay_in)[..., :, None] * k], -1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    kw = (k * w).transpose(-1, -2)  # (..., N, C)
    W = (u * w).transpose(-1, -2) - kw @ sol[..., :C]
    M = decay_all[..., None] * torch.eye(N, dtype=k.dtype, device=k.device) - kw @ sol[..., C:]
    if q is None:
        return M, W, None
    D = (q @ k.transpose(-1, -2)) * (E + eye)  # (Q K^T * E) A^-1 diag(beta), E with its unit diagonal
    D = torch.linalg.solve_triangular(A, D, upper=False, left=False, unitriangular=True) * beta[..., None, :]
    return M, W, D


def _segment_inputs(q, k, beta, log_decay, a, b, reverse):
    """``(k, u, beta, g)`` in float64 of the segment ``[a, b)`` of the forward recurrence (``u = beta k``) or of
    the reversed one (positions ``L - b .. L - a - 1`` backwards, ``u_r = B_r q_r``): converted segment by
    segment, so no full-length copy of the inputs is made."""
    L = k.shape[-2]
    lo, hi = (L - b, L - a) if reverse else (a, b)
    ks, bs = k[..., lo:hi, :].to(torch.float64), beta[..., lo:hi].to(torch.float64)
    gs = torch.clamp(log_decay[..., lo:hi].to(torch.float64), min=_LOG_FLOOR)
    if not reverse:
        return ks, bs[..., None] * ks, bs, gs
    qs = q[..., lo:hi, :].to(torch.float64)
    us = torch.exp(gs)[..., None] * (qs - bs[..., None] * ks * (ks * qs).sum(-1, keepdim=True))
    return ks.flip(-2), us.flip(-2), bs.flip(-1), gs.flip(-1)


def _forward(q, k, beta, log_decay, idx, C, reverse):
    """The Gramian ``P_b = X_b X_b^T`` of ``X_t = B_t X_{t-1} + u_t e_t^T`` (in reversed time if ``reverse``)
    at the boundaries ``idx`` (``batch + (n, N, N)``, in the order of ``idx``, repeats included), and ``{b: X_b}``
    (``batch + (N, b)``) for those with ``b < N``."""
    N = k.shape[-1]
    bounds = sorted(set(range(0, max(idx), C)) | set(idx))
    wanted: dict = {}
    for j, b in enumerate(idx):  # positions of each boundary (a repeated index fills every one of its slots)
        wanted.setdefault(b, []).append(j)
    P = torch.zeros(*k.shape[:-2], N, N, dtype=torch.float64, device=k.device)
    X = P[..., :0]  # the columns themselves, while there are fewer than N
    # without a graph the stack is written in place (in reversed order if reverse): no list beside a stacked copy
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, beta, log_decay))
    out, factors = ([None] * len(idx) if graph else P.new_empty(*P.shape[:-2], len(idx), N, N)), {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        M, W, _ = _segment(*_segment_inputs(q, k, beta, log_decay, a, b, reverse))
        P = M @ P @ M.transpose(-1, -2) + W @ W.transpose(-1, -2)
        if b < N:
            X = torch.cat([M @ X, W], dim=-1)
        for j in wanted.get(b, ()):
            pos = len(idx) - 1 - j if reverse else j  # reversed time: stacked in the order of the forward indices
            if graph:
                out[pos] = P
            else:
                out[..., pos, :, :] = P
        if b in wanted and b < N:
            factors[b] = X
    if graph:
        out = torch.stack(out, dim=-3)
    return out, factors


def _both(q, k, beta, log_decay, idx, segment):
    """``P, Q`` at ``idx``, and the explicit factors ``R_i`` (``i < N``) and ``O_i^T`` (``L - i < N``)."""
    L = q.shape[-2]
    P, R = _forward(q, k, beta, log_decay, idx, segment, reverse=False)
    # Q_i: the forward recurrence in reversed time with the input B_r q_r; index i -> L - i (stacked in the order
    # of idx)
    Q, Ot = _forward(q, k, beta, log_decay, [L - i for i in reversed(idx)], segment, reverse=True)
    return P, Q, R, {L - b: x for b, x in Ot.items()}


def delta_gramians(q, k, beta, log_decay, indices: torch.Tensor, segment: int = SEGMENT):
    """``P_i`` and ``Q_i`` (float64) of the gated delta rule at sorted unique ``indices``, ``batch + (n, N, N)``.

    Args:
        q, k: ``(..., L, N)``; beta, log_decay: ``(..., L)`` (:class:`~esswatch.operators.DeltaRule`).
        indices: 1-D, sorted, unique, in ``1..L-1``.
        segment: positions per segment (module doc).
    """
    P, Q, _, _ = _both(q, k, beta, log_decay, [int(i) for i in indices.tolist()], segment)
    return P, Q


def delta_gram_squared_singular_values(q, k, beta, log_decay, indices: torch.Tensor, segment: int = SEGMENT):
    """``(sigma2, ok, fro2)`` at sorted unique ``indices``, like
    :func:`~esswatch.engine.gram.gram_squared_singular_values`, for every index: where ``min(i, L - i) < N``
    a Gramian has rank below ``N``, and the squared singular values are the eigenvalues of the smaller
    ``R_i^T Q_i R_i`` (``i x i``) or ``O_i P_i O_i^T`` (``(L - i) x (L - i)``) from the explicit factor
    (zero-padded to ``N``), with no spurious values where ``P_i Q_i`` has exact zeros."""
    idx = [int(i) for i in indices.tolist()]
    P, Q, R, Ot = _both(q, k, beta, log_decay, idx, segment)
    N = P.shape[-1]
    ends = [j for j, i in enumerate(idx) if i in R or i in Ot]
    inner = [j for j in range(len(idx)) if j not in set(ends)]
    parts = {}
    if inner:
        if inner[-1] - inner[0] + 1 == len(inner):  # consecutive (all indices but the ends): views, not copies
            p_in, q_in = P[..., inner[0] : inner[-1] + 1, :, :], Q[..., inner[0] : inner[-1] + 1, :, :]
        else:
            pos = torch.tensor(inner, device=P.device)
            p_in, q_in = P.index_select(-3, pos), Q.index_select(-3, pos)
        lam, ok, fro2 = gramian_squared_singular_values(p_in, q_in)
        parts.update({j: (lam[..., m, :], ok[..., m], fro2[..., m]) for m, j in enumerate(inner)})
    for j in ends:
        i = idx[j]
        p, qm = P[..., j, :, :], Q[..., j, :, :]
        m = (R[i].transpose(-1, -2) @ qm @ R[i]) if i in R else (Ot[i].transpose(-1, -2) @ p @ Ot[i])
        ev = torch.linalg.eigvalsh(0.5 * (m + m.transpose(-1, -2))).flip(-1).clamp(min=0)
        fro2 = (p * qm).sum(dim=(-1, -2))
        parts[j] = (torch.nn.functional.pad(ev, (0, N - ev.shape[-1])), torch.ones_like(fro2, dtype=torch.bool), fro2)
    return tuple(torch.stack([parts[j][m] for j in range(len(idx))], dim=-2 if m == 0 else -1) for m in range(3))


def delta_window(q, k, beta, log_decay, i: int, a: int, b: int) -> torch.Tensor:
    """``T[..., i:i+a, i-b:i]`` (float64, differentiable) as ``O^T R``: the columns ``R[:, c] = B_{i-1} ...
    B_{c+1} beta_c k_c`` of ``[i - b, i)`` and the rows ``O[:, r] = B_i ... B_r q_r`` of ``[i, i + a)`` are
    each one segment's own columns in closed form (:func:`_segment`: one ``b x b`` and one ``a x a``
    triangular solve), so the cost is independent of ``L``."""
    L = q.shape[-2]
    _, R, _ = _segment(*_segment_inputs(q, k, beta, log_decay, i - b, i, reverse=False))
    _, rows, _ = _segment(*_segment_inputs(q, k, beta, log_decay, L - i - a, L - i, reverse=True))
    return rows.flip(-1).transpose(-1, -2) @ R


def delta_rule_dense(q, k, beta, log_decay, chunk: int = SEGMENT) -> torch.Tensor:
    """The causal matrices ``T (..., L, L)`` of the gated delta rule, in the inputs' dtype, chunk by chunk in the
    closed form (module doc; differentiable, no in-place writes).

    Over a chunk ``[s0, s1)``: its own block is ``(Q K^T * E) A^-1 diag(beta)`` (``E`` with its unit diagonal:
    the chunked delta-rule kernels' intra-chunk form); its rows against the columns of earlier chunks are
    ``R X``, with ``X`` those columns' states entering the chunk and row ``t`` of ``R`` equal to
    ``B_s0 ... B_t q_t``, the own columns of the chunk in reversed time with the input ``B_t q_t`` (as for
    ``Q_i``); then ``X <- [M X, W]``. Per chunk a few products and two ``C x C`` triangular solves, and
    ``M X`` (``N^2`` per earlier column): no step-by-step loop, and with gradients a graph of about ``L^2`` values
    per matrix beside ``T`` itself (the stepped form kept ``N^2`` per position for the transitions).
    """
    L, N = q.shape[-2:]
    g = torch.clamp(log_decay, min=_LOG_FLOOR)
    bk = beta[..., None] * k
    carried = q.new_zeros(*q.shape[:-2], N, 0)  # the states of the columns of earlier chunks
    rows = []
    for s0 in range(0, L, chunk):
        s1 = min(s0 + chunk, L)
        kc, qc, bc, gc = k[..., s0:s1, :], q[..., s0:s1, :], beta[..., s0:s1], g[..., s0:s1]
        M, W, D = _segment(kc, bk[..., s0:s1, :], bc, gc, q=qc)
        u = torch.exp(gc)[..., None] * (qc - bc[..., None] * kc * (kc * qc).sum(-1, keepdim=True))  # B_t q_t
        _, R, _ = _segment(kc.flip(-2), u.flip(-2), bc.flip(-1), gc.flip(-1))
        past = R.flip(-1).transpose(-1, -2) @ carried  # (..., C, s0)
        rows.append(torch.nn.functional.pad(torch.cat([past, D], dim=-1), (0, L - s1)))
        carried = torch.cat([M @ carried, W], dim=-1)
    return torch.cat(rows, dim=-2)
