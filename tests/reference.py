"""Independent NumPy float64 references (no esswatch code)."""

from __future__ import annotations

import numpy as np


def hankel_sv(T: np.ndarray, i: int) -> np.ndarray:
    """Singular values of T[..., i:, :i] by NumPy's SVD."""
    return np.linalg.svd(np.asarray(T, dtype=np.float64)[..., i:, :i], compute_uv=False)


def entropy_ess_ref(T: np.ndarray, indices) -> np.ndarray:
    out = []
    for i in indices:
        s = hankel_sv(T, i)
        tot = s.sum(-1, keepdims=True)
        p = np.divide(s, tot, out=np.zeros_like(s), where=tot > 0)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        ess = np.exp(-plogp.sum(-1))
        out.append(np.where(tot[..., 0] > 0, ess, 0.0))
    return np.stack(out, -1)


def tolerance_ess_ref(T: np.ndarray, indices, tol: float, relative: bool) -> np.ndarray:
    out = []
    for i in indices:
        s = hankel_sv(T, i)
        th = tol * s.max(-1, keepdims=True) if relative else tol
        cnt = ((s > th) & (s > 0)).sum(-1) if relative else (s > th).sum(-1)
        out.append(cnt.astype(np.float64))
    return np.stack(out, -1)


def softmax_attention_dense(q, k) -> np.ndarray:
    """Causal softmax attention matrices ``(..., L, L)`` in float64 from ``q, k (..., L, d)``
    (torch tensors or arrays), scale ``1 / sqrt(d)``: the formula vectorized."""
    q, k = (np.asarray(t.detach().double() if hasattr(t, "detach") else t, np.float64) for t in (q, k))
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    n = s.shape[-1]
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)


def gated_recurrence_dense(q, k, log_decay) -> np.ndarray:
    """``T[r, c] = sum_n q[r, n] k[c, n] exp(Lam[r, n] - Lam[c, n])`` for ``c <= r`` (``Lam`` the
    cumulative sum of ``log_decay`` over time: ``prod_{s=c+1..r} a[s, n]``), in float64, from
    ``q, k, log_decay (..., L, N)`` (torch tensors or arrays): :func:`gated_recurrence_loop` vectorized."""
    q, k, ld = (np.asarray(t.detach().double() if hasattr(t, "detach") else t, np.float64) for t in (q, k, log_decay))
    lam = np.cumsum(np.broadcast_to(ld, q.shape), axis=-2)
    L = q.shape[-2]
    causal = np.tril(np.ones((L, L), bool))
    T = np.zeros(q.shape[:-2] + (L, L))
    for b in np.ndindex(*q.shape[:-2]):
        diff = np.where(causal[..., None], lam[b][:, None, :] - lam[b][None, :, :], -np.inf)
        T[b] = np.einsum("rn,cn,rcn->rc", q[b], k[b], np.exp(diff))
    return T


# -- naive loop implementations of each operator's formula (docs/ess.md section 1) ----------


def softmax_attention_loop(q, k, scale, window=None, mask=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    L = q.shape[-2]
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    q, k = np.broadcast_to(q, batch + q.shape[-2:]), np.broadcast_to(k, batch + k.shape[-2:])
    T = np.zeros(batch + (L, L))
    for b in np.ndindex(*batch):
        for r in range(L):
            cols = [c for c in range(r + 1) if window is None or r - c < window]
            if mask is not None:
                m = np.broadcast_to(mask, batch + (L, L))[b]
                if m.dtype == bool:
                    cols = [c for c in cols if m[r, c]]
            if not cols:
                continue
            sc = np.array([scale * q[b + (r,)] @ k[b + (c,)] for c in cols])
            if mask is not None and np.broadcast_to(mask, batch + (L, L)).dtype != bool:
                sc = sc + np.array([np.broadcast_to(mask, batch + (L, L))[b][r, c] for c in cols])
            e = np.exp(sc - sc.max())
            T[b + (r,)][cols] = e / e.sum()
    return T


def gated_recurrence_loop(q, k, log_decay=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    L, N = q.shape[-2:]
    a = np.ones_like(q) if log_decay is None else np.broadcast_to(np.exp(np.asarray(log_decay, np.float64)), q.shape)
    T = np.zeros(q.shape[:-2] + (L, L))
    for b in np.ndindex(*q.shape[:-2]):
        for r in range(L):
            for c in range(r + 1):
                T[b + (r, c)] = sum(q[b + (r, n)] * k[b + (c, n)] * np.prod(a[b][c + 1 : r + 1, n]) for n in range(N))
    return T


def convolution_loop(h):
    h = np.asarray(h, np.float64)
    L = h.shape[-1]
    T = np.zeros(h.shape[:-1] + (L, L))
    for r in range(L):
        for c in range(r + 1):
            T[..., r, c] = h[..., r - c]
    return T


def delta_rule_loop(q, k, beta, log_decay):
    """The gated delta rule's ``T`` in float64, by running its recurrence literally on one-hot values:
    ``S <- exp(g_t) S``, ``S <- S + k_t (beta_t (v_t - S^T k_t))^T``, ``o_t = S^T q_t`` with ``v_c = e_c``, so
    that ``o_t`` is row ``t`` of ``T``. ``q, k (..., L, N)``, ``beta, log_decay (..., L)``."""
    q, k, beta, g = (
        np.asarray(t.detach().double() if hasattr(t, "detach") else t, np.float64) for t in (q, k, beta, log_decay)
    )
    L, N = q.shape[-2:]
    T = np.zeros(q.shape[:-2] + (L, L))
    for b in np.ndindex(*q.shape[:-2]):
        S = np.zeros((N, L))
        for t in range(L):
            S = np.exp(g[b][t]) * S
            v = np.zeros(L)
            v[t] = 1.0
            S = S + np.outer(k[b][t], beta[b][t] * (v - S.T @ k[b][t]))
            T[b][t] = S.T @ q[b][t]
    return T
