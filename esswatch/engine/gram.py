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

Three ways to form the Gramians, none with a Python step per position:

* **direct** (a few indices of a small operator): ``R_i``/``O_i`` for all requested indices at
  once and two batched contractions, ``O(n L N^2)``;
* **few** (a few indices, ``n sqrt(L) <= L``, :mod:`.gram_segments`): one batched matmul per
  segment between consecutive indices and ``n`` steps ``P <- D P D + S`` (``D <= 1``), forward in
  time for both Gramians, ``O(L N^2)``;
* **chunked** (many or all indices, :mod:`.gram_chunked`): positions are cut into chunks of
  ``C ~ sqrt(L)``. Inside every chunk the outer products ``k_c k_c^T``, weighted to the chunk's
  end, are summed (all chunks at once: a cumulative sum with a graph, ``C - 1`` in-place
  additions without one) and weighted back to each position; where a decay is too strong inside
  one chunk for those weights (``CUMSUM_SPAN``), the partial sums advance one offset at a time
  with the decays instead (``C`` batched steps). Between chunks ``P_{b+C} = D P_b D + S_b``
  (``D`` diagonal, ``<= 1``) takes ``L / C`` steps. ``O(L N^2)`` work for all indices, never one
  Python step per position.

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

from .gram_chunked import chunked_forward
from .gram_segments import LOG_FLOOR as _LOG_FLOOR
from .gram_segments import log_cumsum, segment_gramians
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

#: the direct form is used for at most this many indices while n * L * N * batch stays below DIRECT_MAX_ELEMS
#: elements, with or without a graph (its cost grows with n, the segments' does not; on one CPU thread the
#: segments were faster from about 1.3e5 elements, with and without a graph, and slower at 3.3e4:
#: ``examples/benchmarks/gram_forms.py --sections forms``)
DIRECT_MAX_INDICES = 16
DIRECT_MAX_ELEMS = 1 << 16


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


def gramian_form(n: int, L: int, N: int, nb: int) -> tuple:
    """``(form, C)``: the form :func:`gramians` takes under ``"auto"`` for ``n`` indices of ``nb`` matrices,
    ``"direct"`` while the factors are small, else ``"few"`` (by segments, for a few
    indices, ``n C <= L``) or ``"chunked"``; ``C`` the chunk length (about ``sqrt(L)``). Also the memory guard's
    model (``GatedRecurrence.gram_bytes``)."""
    C = max(4, round(L**0.5))
    if n <= DIRECT_MAX_INDICES and n * L * N * nb <= DIRECT_MAX_ELEMS:
        return "direct", C
    return ("few" if n * C <= L else "chunked"), C


def gramians(
    q: torch.Tensor, k: torch.Tensor, log_decay: torch.Tensor | None, indices: torch.Tensor, method: str = "auto"
):
    """``P_i`` and ``Q_i`` (float64) at sorted unique ``indices``, shape ``batch + (n, N, N)``.

    ``method``: ``"direct"``, ``"few"`` (by segments), ``"chunked"`` or ``"auto"`` (:func:`gramian_form`).
    """
    idx = indices.to(q.device)
    n, (L, N) = idx.numel(), q.shape[-2:]
    if method == "auto":
        method = gramian_form(n, L, N, max(1, q[..., 0, 0].numel()))[0]
    if method == "few":  # takes its sums of log_decay segment by segment
        return segment_gramians(q, k, log_decay, [int(i) for i in indices.tolist()])
    lam = log_cumsum(log_decay, q.shape)
    if method == "direct":
        return _direct(q.to(torch.float64), k.to(torch.float64), lam, idx)
    C = gramian_form(n, L, N, 1)[1]
    P = chunked_forward(k.to(torch.float64), lam, idx, C)
    # Q_i is P of the time-reversed system: r -> L-1-r, with reversed decays shifted by one
    # (O_i[r] weight exp(Lam[r] - Lam[i-1]) = prod_{s=i..r} a_s), index i -> L - i
    q_rev = q.flip(-2).to(torch.float64)
    lam_rev = scale = None
    if lam is not None:
        # reversed step t' = L-1-t carries log a_t; the weight between positions needs a_s for s in [i, r]: in
        # reversed time the decay applied "after" position t' is a_{L-1-t'}, so Lam'[t'] = sum_{s' < t'} log
        # a_{L-1-s'} = Lam[L-1] - Lam[L-1-t']
        lam_rev = lam.flip(-2).neg_().add_(lam[..., L - 1 :, :])
        # the reversed P sums exp(Lam'[L-i-1] - Lam'[r']) for r' < L-i; the true Q_i weights carry one more
        # factor a_i (s = i included): exp(ld[i]) on both sides
        ld = torch.clamp(log_decay[..., idx, :].to(torch.float64), min=_LOG_FLOOR)
        scale = torch.exp(ld).expand(*q.shape[:-2], n, ld.shape[-1])
    Q = chunked_forward(q_rev, lam_rev, L - idx, C, scale, True)
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
