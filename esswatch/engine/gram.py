"""Exact Hankel singular values of diagonal recurrences via factored Gramians.

For ``T[r, c] = sum_n q[r, n] k[c, n] prod_{s=c+1..r} a[s, n]`` (``docs/ess.md`` sections 1 and 4,
``a = exp(log_decay)``)
the Hankel block factors as ``H_i = O_i R_i`` through an ``N``-dimensional state. With
``Lam[t, n] = sum_{s <= t} log_decay[s, n]`` (float64)::

    R_i[n, c] = k[c, n] exp(Lam[i-1, n] - Lam[c, n])     (c < i)
    O_i[r, n] = q[r, n] exp(Lam[r, n] - Lam[i-1, n])     (r >= i)

Every exponent is ``<= 0``, so both factors are computed directly and stably. The
squared singular values of ``H_i`` are the eigenvalues of ``P_i Q_i`` with
``P_i = R_i R_i^T`` and ``Q_i = O_i^T O_i``.

Two ways to form the Gramians, neither with a Python step per position:

* **direct** (a few indices): ``R_i``/``O_i`` for all requested indices at once and two
  batched contractions, ``O(n L N^2)``;
* **chunked** (many or all indices): positions are cut into chunks of ``C ~ sqrt(L)``.
  Inside every chunk the outer products ``k_c k_c^T``, weighted to the chunk's end, are summed
  with one cumulative sum (all chunks at once), and weighted back to each position; where a
  decay is too strong inside one chunk for those weights (``CUMSUM_SPAN``), the partial sums
  advance one offset at a time instead (``C`` batched steps). Between chunks
  ``P_{b+C} = D P_b D + S_b`` (``D`` diagonal, ``<= 1``) takes ``L / C`` steps. ``O(L N^2)``
  work for all indices, never one Python step per position.

The eigenproblem runs in float64 and is made symmetric with a Cholesky factor
``P_i = C C^T`` (``eig(P Q) = eig(C^T Q C)``); where ``P_i`` is singular the Cholesky of
``Q_i`` is tried instead. Where both fail (fast decays erase the state on both sides of the
index) the singular values come from the truncated square roots of both Gramians when no
gradient is needed; with gradients the index is returned as unresolved so the caller computes
it densely. Squaring loses half the digits of the small singular values:
float64 resolves them down to about ``1e-8 * s_1`` (entropy contribution below ``1e-6``).
Everything is differentiable with finite gradients (masked exponents are ``-inf`` before
``exp``; the square root uses :func:`safe_sqrt`).
"""

from __future__ import annotations

import torch

from .gram_spectrum import gramian_squared_singular_values
from .spectral import safe_sqrt

__all__ = [
    "gram_singular_values",
    "gram_squared_singular_values",
    "gramian_squared_singular_values",
    "gramian_form",
    "gramians",
    "log_cumsum",
]

#: log decays below this are clamped: exp(-1000) is exactly 0 in float64, and -inf would
#: turn the differences of cumulative sums into NaN
_LOG_FLOOR = -1000.0
#: the direct form is used for at most this many indices while n * L * N * batch stays
#: below DIRECT_MAX_ELEMS elements (its cost grows with n; the chunked form's does not)
DIRECT_MAX_INDICES = 16
DIRECT_MAX_ELEMS = 1 << 22
#: the chunked form sums a chunk's outer products with one cumulative sum, weighted to the chunk's end and back,
#: where ``Lam`` spans at most this much inside every chunk: the weights and their products then stay within
#: ``exp(+-2 * 300)``, inside float64's range; stronger decays take one step per offset
CUMSUM_SPAN = 300.0


def log_cumsum(log_decay, shape):
    """``Lam`` (float64, each step clamped at ``_LOG_FLOOR``) broadcast to ``shape`` = batch + (L, N); ``None`` for
    ``None``. Also the cumulative sum of ``GatedRecurrence``'s blocks."""
    if log_decay is None:
        return None
    ld = torch.clamp(log_decay.to(torch.float64), min=_LOG_FLOOR)
    lam = torch.cumsum(ld, dim=-2)
    return lam.expand(*shape[:-1], lam.shape[-1])


def _direct(q, k, lam, idx):
    """``P_i, Q_i`` for the indices ``idx`` (1-D, on q's device) from the factors."""
    L = q.shape[-2]
    pos = torch.arange(L, device=q.device)
    past = pos[None, :] < idx[:, None]  # (n, L): c < i
    if lam is None:
        w_p = past.to(q.dtype)[..., None]
        w_q = (~past).to(q.dtype)[..., None]
        R = k[..., None, :, :] * w_p  # batch + (n, L, N)
        Ob = q[..., None, :, :] * w_q
    else:
        anchor = lam[..., idx - 1, :]  # batch + (n, N|1): Lam[i-1]
        d_p = anchor[..., :, None, :] - lam[..., None, :, :]  # Lam[i-1] - Lam[c]
        d_q = lam[..., None, :, :] - anchor[..., :, None, :]  # Lam[r] - Lam[i-1]
        ninf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
        R = k[..., None, :, :] * torch.exp(torch.where(past[..., None], d_p, ninf))
        Ob = q[..., None, :, :] * torch.exp(torch.where(past[..., None], ninf, d_q))
    P = R.transpose(-1, -2) @ R
    Q = Ob.transpose(-1, -2) @ Ob
    return P, Q


def _chunked_forward(k, lam, idx, C, scale=None):
    """``P_i`` for the sorted unique indices ``idx`` by chunks (see module doc), times ``scale`` (``(n, N|1)``, or
    ``None``) on both sides.

    Two levels of the recurrence ``P_{t+1} = D_t P_t D_t + k_t k_t^T``: inside every chunk (all chunks at once),
    then between chunks (one step per chunk: ``L / C`` steps). Inside a chunk the outer products are weighted to
    its end (factors ``<= 1``) and summed with one cumulative sum, where ``Lam`` spans at most
    :data:`CUMSUM_SPAN` in every chunk; then ``P_i = b (e A e + S) b`` with ``b = exp(Lam[i-1] - Lam[end]) >= 1``
    and ``e = exp(Lam[end] - Lam[start - 1]) <= 1``. Stronger decays take one step per offset (every factor
    ``<= 1``).
    """
    *batch, L, N = k.shape
    nc = -(-L // C)
    pad = nc * C - L
    dev, dt = k.device, k.dtype
    kc = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(*batch, nc, C, N)
    lamp = lc = None
    if lam is not None:
        # padded positions repeat the last Lam (no decay); they carry k = 0
        lamp = torch.cat([lam, lam[..., -1:, :].expand(*lam.shape[:-2], pad, lam.shape[-1])], dim=-2)
        lc = lamp.reshape(*batch, nc, C, lamp.shape[-1])
    if idx.numel() * C <= L:
        return _scaled(_chunked_few(kc, lc, lamp, idx, C), scale)
    m, jj = (idx - 1) // C, (idx - 1) % C
    if lam is None or float((lc.amax(dim=-2) - lc.amin(dim=-2)).amax().detach()) <= CUMSUM_SPAN:
        kw = kc if lam is None else kc * torch.exp(lc[..., C - 1 :, :] - lc)
        # the outer products and their sums with the offsets last (contiguous: about twice as fast on CPU), then
        # batch + (nc, C, N, N), weighted to the chunks' ends
        x = kw.transpose(-1, -2).contiguous()
        S = torch.cumsum(x[..., :, None, :] * x[..., None, :, :], dim=-1).permute(*range(len(batch) + 1), -1, -3, -2)
        S = S.contiguous()
        A = _anchors(S[..., :, C - 1, :, :], lamp, C, batch, N, dt, dev)  # P at each chunk's start
        b = scale
        if lam is not None:
            starts = torch.clamp(torch.arange(nc, device=dev) * C - 1, min=0)
            e = torch.exp(lc[..., :, C - 1, :] - lamp[..., starts, :])  # A[0] = 0 needs no weight
            A = A * (e[..., :, None] * e[..., None, :])
            b = torch.exp(lamp[..., idx - 1, :] - lc[..., m, C - 1, :])  # batch + (n, N|1)
            b = b if scale is None else b * scale
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (k, lam, scale)):
            return _scaled(S[..., m, jj, :, :] + A[..., m, :, :], b)
        # without a graph: A added where S lies, and the indices read as a slice where they are consecutive
        S.add_(A[..., :, None, :, :])
        return _scaled(_rows(S.reshape(*batch, nc * C, N, N), idx - 1), b)
    # a decay too strong inside one chunk for those weights to stay in range: one step per offset
    step = torch.exp(lc[..., 1:, :] - lc[..., :-1, :])  # a at offsets 1..C-1 (<= 1)
    kk = kc[..., :, :, None] * kc[..., :, None, :]  # batch + (nc, C, N, N)
    parts = [kk[..., 0, :, :]]
    for j in range(1, C):
        a = step[..., j - 1, :]
        parts.append(parts[-1] * (a[..., :, None] * a[..., None, :]) + kk[..., j, :, :])
    S = torch.stack(parts, dim=-3)  # batch + (nc, C, N, N), to each offset
    A = _anchors(S[..., :, C - 1, :, :], lamp, C, batch, N, dt, dev)
    # P_i = D A[m] D + S[m][i-1-mC], m = (i-1) // C, D = exp(Lam[i-1] - Lam[mC-1])
    has = (m > 0).to(dt)
    g = torch.exp(lamp[..., idx - 1, :] - lamp[..., torch.clamp(m * C - 1, min=0), :])  # batch + (n, N|1)
    base = A[..., m, :, :] * (g[..., :, None] * g[..., None, :]) * has[:, None, None]
    return _scaled(S[..., m, jj, :, :] + base, scale)


def _rows(x, pos):
    """``x[..., pos, :, :]`` for sorted ``pos`` (ascending or descending), a slice where they are consecutive."""
    n = pos.numel()
    first, last = (int(v) for v in pos[[0, -1]].tolist())
    if abs(last - first) + 1 == n:
        lo = min(first, last)
        out = x[..., lo : lo + n, :, :]
        return out if first <= last else out.flip(-3)
    return x[..., pos, :, :]


def _scaled(P, scale):
    """``diag(scale) P diag(scale)`` (``scale``: ``(..., n, N|1)`` or ``None``)."""
    if scale is None:
        return P
    if torch.is_grad_enabled() and (P.requires_grad or scale.requires_grad):
        return P * (scale[..., :, None] * scale[..., None, :])
    return (P * scale[..., :, None]).mul_(scale[..., None, :])


def _anchors(ends, lamp, C, batch, N, dt, dev):
    """``A[m]`` = ``P`` at position ``mC`` from the chunk sums ``ends[m]`` (weighted to the chunk's end)."""
    anchors = [torch.zeros(*batch, N, N, dtype=dt, device=dev)]
    for m in range(1, ends.shape[-3]):
        prev = anchors[-1]
        if lamp is not None and m > 1:
            g = torch.exp(lamp[..., m * C - 1, :] - lamp[..., (m - 1) * C - 1, :])
            prev = prev * (g[..., :, None] * g[..., None, :])
        anchors.append(prev + ends[..., m - 1, :, :])
    return torch.stack(anchors, dim=-3)


def _chunked_few(kc, lc, lamp, idx, C):
    """:func:`_chunked_forward` for a few indices (``n C <= L``): no partial sum at every offset.

    A chunk's sum weighted to its end factors as ``(W k)^T (W k)`` with ``W[c] = exp(Lam[end] -
    Lam[c]) <= 1``, and so does the partial sum up to ``i - 1`` inside ``i``'s chunk: one
    batched product per chunk and per index instead of ``C`` steps over every chunk."""
    *batch, nc, _, N = kc.shape
    dev, dt = kc.device, kc.dtype
    kw = kc if lc is None else kc * torch.exp(lc[..., C - 1 :, :] - lc)
    ends = kw.transpose(-1, -2) @ kw  # batch + (nc, N, N)
    A = _anchors(ends, lamp, C, batch, N, dt, dev)
    m, jj = (idx - 1) // C, (idx - 1) % C
    valid = torch.arange(C, device=dev)[None, :] <= jj[:, None]  # (n, C): c <= i - 1 inside the chunk
    km = kc[..., m, :, :]  # batch + (n, C, N)
    if lc is None:
        w = valid[..., None].to(dt)
        base = A[..., m, :, :]
    else:
        d = lamp[..., idx - 1, :][..., None, :] - lc[..., m, :, :]  # Lam[i-1] - Lam[c] (<= 0 where valid)
        w = torch.exp(torch.where(valid[..., None], d, torch.tensor(float("-inf"), dtype=dt, device=dev)))
        has = (m > 0).to(dt)
        g = torch.exp(lamp[..., idx - 1, :] - lamp[..., torch.clamp(m * C - 1, min=0), :])
        base = A[..., m, :, :] * (g[..., :, None] * g[..., None, :]) * has[:, None, None]
    kp = km * w
    return kp.transpose(-1, -2) @ kp + base


def gramian_form(n: int, L: int, N: int, nb: int) -> tuple:
    """``(form, C)``: the form :func:`gramians` takes under ``"auto"`` for ``n`` indices of ``nb`` matrices,
    ``"direct"`` while the factors are small, else ``"few"`` (the chunked form for a few indices, ``n C <= L``)
    or ``"chunked"``; ``C`` the chunk length (about ``sqrt(L)``). Also the memory guard's model
    (``GatedRecurrence.gram_bytes``)."""
    C = max(4, round(L**0.5))
    if n <= DIRECT_MAX_INDICES and n * L * N * nb <= DIRECT_MAX_ELEMS:
        return "direct", C
    return ("few" if n * C <= L else "chunked"), C


def gramians(
    q: torch.Tensor, k: torch.Tensor, log_decay: torch.Tensor | None, indices: torch.Tensor, method: str = "auto"
):
    """``P_i`` and ``Q_i`` (float64) at sorted unique ``indices``, shape ``batch + (n, N, N)``.

    ``method``: ``"direct"``, ``"chunked"`` or ``"auto"`` (direct while the factors are small).
    """
    q64, k64 = q.to(torch.float64), k.to(torch.float64)
    lam = log_cumsum(log_decay, q64.shape)
    idx = indices.to(q.device)
    n, (L, N) = idx.numel(), q.shape[-2:]
    if method == "auto":
        method = gramian_form(n, L, N, max(1, q[..., 0, 0].numel()))[0]
    if method == "direct":
        return _direct(q64, k64, lam, idx)
    C = gramian_form(n, L, N, 1)[1]
    P = _chunked_forward(k64, lam, idx, C)
    # Q_i is P of the time-reversed system: r -> L-1-r, with reversed decays shifted by one
    # (O_i[r] weight exp(Lam[r] - Lam[i-1]) = prod_{s=i..r} a_s), index i -> L - i
    q_rev = q64.flip(-2)
    lam_rev = None
    if lam is not None:
        ld = torch.clamp(log_decay.to(torch.float64), min=_LOG_FLOOR).expand(*q64.shape[:-1], lam.shape[-1])
        # reversed step t' = L-1-t carries log a_t; the weight between positions needs a_s for
        # s in [i, r]: in reversed time the decay applied "after" position t' is a_{L-1-t'}
        shifted = ld.flip(-2)
        lam_rev = torch.cumsum(torch.nn.functional.pad(shifted[..., :-1, :], (0, 0, 1, 0)), dim=-2)
    # the reversed P sums exp(Lam'[L-i-1] - Lam'[r']) for r' < L-i; the true Q_i weights carry one more
    # factor a_i (s = i included): exp(ld[i]) on both sides
    Q = _chunked_forward(q_rev, lam_rev, L - idx, C, None if lam is None else torch.exp(ld[..., idx, :]))
    return P, Q


def gram_squared_singular_values(
    q: torch.Tensor,
    k: torch.Tensor,
    log_decay: torch.Tensor | None,
    indices: torch.Tensor,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared Hankel singular values (float64) for a diagonal recurrence.

    Args:
        q, k: ``batch + (L, N)``.
        log_decay: broadcastable to ``batch + (L, N)`` (``(L, 1)`` for one decay
            per head), or ``None`` for plain linear attention.
        indices: 1-D int64 tensor of indices in ``1..L-1`` (any order, repeats allowed).
        method: ``"auto"``, ``"direct"`` or ``"chunked"`` (module doc).

    Returns:
        ``(sigma2, ok, fro2)`` in the order of ``indices``: eigenvalues ``batch + (n, N)``
        (descending, clamped at 0), a bool mask ``batch + (n,)`` of the entries that were
        resolved (False where both Gramians were numerically singular), and the exact
        ``||H_i||_F^2 = trace(P_i Q_i)``.
    """
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
    uniq, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    P, Q = gramians(q, k, log_decay, uniq, method)
    inv = inverse.to(P.device)
    if uniq.numel() != indices.numel() or not torch.equal(uniq, indices):
        P, Q = P[..., inv, :, :], Q[..., inv, :, :]
    return gramian_squared_singular_values(P, Q)


def gram_singular_values(q, k, log_decay, indices, method: str = "auto"):
    """Like :func:`gram_squared_singular_values` but returns singular values (finite gradients)."""
    lam, ok, fro2 = gram_squared_singular_values(q, k, log_decay, indices, method)
    return safe_sqrt(lam), ok, fro2
