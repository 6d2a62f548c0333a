"""Deflated stochastic Lanczos quadrature: entropy-ESS of a block with a long flat tail.

Entropy-ESS needs two spectral sums of the whole spectrum of ``H`` (``m x n``):
``S1 = sum s_j`` and ``S2 = sum s_j log s_j``, with ``log ESS = log S1 - S2 / S1``.

1. A rank-``k`` subspace iteration (or a basis the caller's sketch already has, such as
   the adaptive estimator's rank-16 pilot) gives a right basis ``V`` (``n x k``); the top values
   ``t = svdvals(H V)`` are computed exactly (``t_j <= s_j``, so they also feed the
   deterministic bounds of :func:`~esswatch.engine.randomized.entropy_bounds`).
2. The deflated remainder ``A = H (I - V V^T)`` holds the tail. Both tail sums are traces
   of ``f(A^T A)`` with ``f(x) = sqrt(x)`` and ``f(x) = 0.5 sqrt(x) log x``. Each probe
   ``z`` (uniform on the unit sphere of the complement of ``V``, scaled by its dimension)
   runs ``l`` steps of Golub-Kahan-Lanczos bidiagonalization (its right vectors are kept off
   ``V``; no reorthogonalization against the probe's earlier ones, :mod:`.golub_kahan`)
   and gives ``z^T f(A^T A) z`` by the Gauss rule of the Lanczos tridiagonal, and by the
   Gauss-Radau rule with a node at 0. For ``f = sqrt`` the two rules bracket the value
   (Gauss above, Radau below); their gap measures the quadrature bias.
3. Over the probes: the mean is the estimate, the spread gives a standard error of
   ``log ESS`` (delta method for the ratio ``S2 / S1``).

Accepted when ``gap / 2 + 2 * SE <= log(1 + rtol)`` (``gap`` = the difference of
``log ESS`` between the Gauss and the Radau rule): a two-standard-error criterion, so the
estimate is within ``rtol`` of the exact value with about 95% confidence, not with
certainty. It ignores the cross-talk between the deflated top and the tail, which biases ESS
upward (under 0.25% on blocks at L = 2048, about 1% on small blocks with a broad spectrum:
``examples/benchmarks/cross_talk.py``); the calibration test measures the realized miss rate.
With ``stop``, the runs take up to
``SLQ_STEPS`` steps and the test is tried along the way (from ``SLQ_FIRST_CHECK`` steps; the
quadrature sums are cheap next to a pass over ``h``): an entry is accepted once a check passes
it, and keeps the values of the last check that passed it (later steps come free while other
entries of its chunk run on, :mod:`.golub_kahan`). An entry is given up (left to the caller's exact
SVD) when it cannot pass by ``SLQ_STEPS``: above ``SLQ_GIVE_UP * stop`` at the first check, or,
later, when the power law through its last two checked criteria stays above ``stop`` at
``SLQ_STEPS`` (the criterion falls about as ``step^-1.5`` to ``step^-2`` on flat tails and
flattens where the standard error or a wide band holds it up). A chunk of entries stops once
each of its entries is accepted or given up (its entries keep their values from then on), and the
runs end once every chunk has stopped. The gap shrinks with each step and the same probes are used
throughout, so the extra looks barely change the miss rate (the calibration test runs with them).
Pure tensor math, batched, on the block's device, float64; randomness only from the given
generator.
For users: ``docs/estimators.md`` (sections 2 to 4, with the calibration figures).
"""

from __future__ import annotations

import torch

from .golub_kahan import GolubKahanRuns
from .slq_stopping import SLQ_FAST_DECAY, SLQ_FIRST_CHECK, SLQ_GIVE_UP, Checks

__all__ = ["SLQ_FAST_DECAY", "SLQ_FIRST_CHECK", "SLQ_GIVE_UP", "SLQ_PROBES", "SLQ_STEPS"]
__all__ += ["frobenius2", "hankel_frobenius2", "products", "slq_entropy"]

#: probes, and Lanczos steps per probe (at most, with ``stop``)
SLQ_PROBES = 16
SLQ_STEPS = 12


def frobenius2(h: torch.Tensor) -> torch.Tensor:
    """``||h||_F^2`` in float64 (``batch``) without a full-size temporary: per-row norms in
    ``h``'s dtype (a short pairwise sum each), squared and summed in float64."""
    dim = -1 if h.stride(-1) == 1 else -2  # along the contiguous side
    return (torch.linalg.vector_norm(h, dim=dim).to(torch.float64) ** 2).sum(-1)


def hankel_frobenius2(t: torch.Tensor, indices) -> dict:
    """``{i: ||t[..., i:, :i]||_F^2}`` (float64, ``batch``) for the indices, in one pass over the
    part of ``t`` the blocks cover: each column segment between consecutive indices is read
    once, in the rows below its right end (the rows every block holding it needs), not once per
    block (at 8 interior indices of L = 2048, about a quarter of what the blocks hold together).
    As :func:`frobenius2`: norms of row segments in ``t``'s dtype, squared and summed in float64."""
    out, rows, prev = {}, None, 0
    for i in sorted(set(int(i) for i in indices)):
        seg = torch.linalg.vector_norm(t[..., i:, prev:i], dim=-1).to(torch.float64) ** 2
        # rows[..., r]: the sum over the segments so far of row i + r's squared norms
        rows = seg if rows is None else rows[..., i - prev :] + seg
        out[i] = rows.sum(-1)
        prev = i
    return out


def products(h: torch.Tensor):
    """``(v -> h @ v, u -> h^T @ u)`` in the layouts BLAS runs fastest on a strided view.

    ``h`` has one unit stride (a slice of ``T``, maybe transposed). On CPU a product that
    reads ``h`` along its unit stride with the thin operand as rows is about 1.2-1.5x faster
    than the transposed form (``examples/benchmarks/estimators.py``); same values up to
    float round-off."""
    if h.stride(-1) == 1:  # row-major
        return (lambda v: h @ v), (lambda u: (u.mT.contiguous() @ h).mT)
    return (lambda v: (v.mT.contiguous() @ h.mT).mT), (lambda u: h.mT @ u)


#: below this many machine epsilons of ``||h||_F^2`` (in ``h``'s dtype), the tail's energy is computed from
#: ``h - (h V) V^T`` instead of as ``||h||_F^2 - ||h V||_F^2`` (examples/benchmarks/tail_energy.py; 256 cost
#: 15% on a row whose rank-64 tails hold 1.4e-5 of the energy, where the difference is off by under 1%)
TAIL_ENERGY_EPS = 16


def _tail_energy(h, hv, Vt, fro2, t):
    """``||h (I - V V^T)||_F^2 / ||h||_F^2`` (float64, ``batch``) from ``hv = h V`` and its singular values
    ``t``. The difference ``1 - sum t^2 / ||h||_F^2`` is exact in float64, but in float32 it carries
    round-off of about ``eps`` (1e-7), while a deflation that leaves little energy in the tail (a
    rank-128 try on a low-ESS block: 3e-8 of it) needs far less: there, per batch entry, the
    remainder is formed and its norm taken (its entries carry round-off relative to ``h``'s)."""
    frac = torch.clamp(1 - (t * t).sum(-1) / torch.clamp(fro2, min=1e-300), min=0)
    if h.dtype == torch.float64:
        return frac
    low = (frac < TAIL_ENERGY_EPS * torch.finfo(h.dtype).eps).reshape(-1)
    if not bool(low.any()):
        return frac
    m, n = h.shape[-2:]
    hs, hvs, Vts = h.reshape(-1, m, n), hv.reshape(-1, m, hv.shape[-1]), Vt.reshape(-1, *Vt.shape[-2:])
    out, f2 = frac.reshape(-1).clone(), fro2.reshape(-1)
    for e in low.nonzero()[:, 0].tolist():
        out[e] = frobenius2(hs[e] - hvs[e] @ Vts[e]) / torch.clamp(f2[e], min=1e-300)
    return out.reshape(frac.shape)


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _colnorm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-2, keepdim=True)


def _tridiagonal(diag: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """The symmetric tridiagonal matrices with ``diag`` and ``off`` (``batch + (l,)``, ``(l - 1,)``)."""
    ell = diag.shape[-1]
    T = diag.new_zeros(*diag.shape, ell)
    flat = T.view(*diag.shape[:-1], ell * ell)
    flat[..., :: ell + 1] = diag
    flat[..., 1 :: ell + 1] = off
    flat[..., ell :: ell + 1] = off
    return T


def _estimate(alphas, betas, t, d, tail_energy, fro2):
    """The Gauss and Gauss-Radau sums of the Golub-Kahan runs so far (``alphas``, ``betas``:
    ``batch + (probes, l)``, step by step), combined with the exact top values ``t``
    (of ``h / ||h||_F``): ``(est, half_gap, se)`` (module doc, steps 2-3)."""
    al = alphas.to(torch.float64)  # batch + (probes, l)
    be = betas.to(torch.float64)  # beta_1..beta_l (beta_l: Radau)
    diag = al**2
    diag[..., 1:] += be[..., :-1] ** 2
    off = al[..., :-1] * be[..., :-1]
    # Gauss: nodes and weights (first eigenvector components squared) of the Lanczos tridiagonal
    theta, Y = torch.linalg.eigh(_tridiagonal(diag, off))
    # Gauss-Radau with a node at 0: extend by b = alpha_l beta_l and omega = b^2 (T^{-1})_{ll},
    # (T^{-1})_{ll} from the same eigendecomposition (a relative ridge of 1e-14 keeps it finite)
    b = al[..., -1] * be[..., -1]
    dmax = diag.amax(-1)
    ridge = 1e-14 * torch.where(dmax > 0, dmax, 1.0)  # all zero (a breakdown at step 1): b = 0, any ridge
    omega = b**2 * (Y[..., -1, :] ** 2 / (theta + ridge[..., None])).sum(-1)
    theta_r, Y_r = torch.linalg.eigh(
        _tridiagonal(torch.cat([diag, omega[..., None]], -1), torch.cat([off, b[..., None]], -1))
    )
    # per probe, both rules: sum w s and sum w s log s over the nodes s = sqrt(theta) (0 log 0 = 0)
    sums = []
    for th, w in ((theta, Y[..., 0, :] ** 2), (theta_r, Y_r[..., 0, :] ** 2)):
        s = torch.sqrt(torch.clamp(th, min=0))
        sums += [(w * s).sum(-1), (w * torch.special.xlogy(s, s)).sum(-1)]
    X = d * torch.stack(sums)  # (Gauss S1, Gauss S2, Radau S1, Radau S2) x batch x probes
    # control variate: each probe's z^T B z = d alpha_1^2 is exact and its mean is known
    # (tail_energy); on a flat tail sqrt(B) and B are nearly proportional, so subtracting the
    # regression on it removes most of the probe-to-probe variance
    e = d * al[..., 0] ** 2 - tail_energy[..., None]
    ec = e - e.mean(-1, keepdim=True)
    ve = torch.clamp((ec * ec).sum(-1, keepdim=True), min=1e-300)
    X = X - ((X - X.mean(-1, keepdim=True)) * ec).sum(-1, keepdim=True) / ve * e
    M = X.mean(-1)
    # 3. combine with the exact top
    t1, t2 = t.sum(-1), torch.special.xlogy(t, t).sum(-1)

    def log_ess(x, y):
        s1 = torch.clamp(t1 + x, min=1e-300)
        return torch.log(s1) - (t2 + y) / s1

    log_est = log_ess(0.5 * (M[0] + M[2]), 0.5 * (M[1] + M[3]))  # the midpoint of the two rules
    half_gap = 0.5 * (log_ess(M[0], M[1]) - log_ess(M[2], M[3])).abs()
    # the standard error of log ESS (delta method for S2 / S1) over the probes' midpoints
    xm, ym = 0.5 * (X[0] + X[2]), 0.5 * (X[1] + X[3])
    s1 = t1 + xm.mean(-1)
    g1 = 1.0 / s1 + (t2 + ym.mean(-1)) / s1**2
    g2 = -1.0 / s1
    p = xm.shape[-1]
    xc, yc = xm - xm.mean(-1, keepdim=True), ym - ym.mean(-1, keepdim=True)
    # one degree of freedom spent on the control variate
    var = ((g1[..., None] * xc + g2[..., None] * yc) ** 2).sum(-1) / max(p - 2, 1) / p
    est = torch.where(fro2 > 0, torch.exp(log_est), 0.0)
    return est, half_gap, torch.sqrt(var)


def slq_entropy(
    h: torch.Tensor,
    k: int,
    generator: torch.Generator | None,
    *,
    probes: int = SLQ_PROBES,
    steps: int = SLQ_STEPS,
    power_iters: int = 1,
    fro2: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
    stop: float | None = None,
):
    """Deflated SLQ estimate of entropy-ESS of ``h`` (``batch + (m, n)``).

    The products run in ``h``'s dtype (they read the whole block and dominate the cost);
    the top values, the quadrature and the statistics in float64. Top values from a
    float32 product are shrunk by ``1e-5`` so that they stay below the true ones (the
    interlacing the deterministic bounds rest on). ``h`` may be a strided view (one unit
    stride; no copy is made). ``fro2`` (``||h||_F^2``, float64) may be passed in if the
    caller has it, and ``basis``
    (an orthonormal right basis ``n x k`` from the caller's sketch, float64) replaces the
    subspace iteration. ``stop`` (``log(1 + rtol)``): try the acceptance test
    ``half_gap + 2 se <= stop`` along the way and end early (module doc); accepted entries
    keep the values of the last check they passed.

    Returns ``(est, half_gap, se, t, fro2)``: the estimate ``batch``, half the Gauss/Radau gap
    and the standard error, both in ``log ESS`` (``batch``), the top values ``t``
    (``batch + (k,)``, float64, each ``<= s_j``) and ``||h||_F^2`` (float64, ``batch``).
    """
    batch, n = h.shape[:-2], h.shape[-1]
    dev, lo = h.device, h.dtype
    if fro2 is None:
        fro2 = frobenius2(h)
    scale = torch.sqrt(torch.clamp(fro2, min=1e-300))  # entropy is scale-free: work on h / ||h||_F
    inv = (1.0 / scale).to(lo)[..., None, None]
    if h.stride(-1) != 1 and h.stride(-2) != 1:
        h = h.contiguous()  # BLAS needs one unit stride; a sliced view of T is used as is
    hmul, hrmul = products(h)
    # 1. the top of the spectrum: subspace iteration
    if basis is None:
        omega = torch.randn(*batch, n, k, dtype=lo, device=dev, generator=generator)
        qm = _orth(hmul(omega))
        for _ in range(power_iters):
            qm = _orth(hmul(_orth(hrmul(qm))))
        basis = _orth(hrmul(qm).to(torch.float64))
    V = basis.to(lo)  # n x k right basis
    Vt = V.transpose(-1, -2)
    # the probes (uniform on the sphere of V's complement), drawn before one product gives
    # both h V (the top values) and h v (the first Lanczos step): one pass over h, not two
    d = n - V.shape[-1]
    g = torch.randn(*batch, n, probes, dtype=lo, device=dev, generator=generator)
    z = g - V @ (Vt @ g)
    v = z / torch.clamp(_colnorm(z), min=1e-30)
    hvv = hmul(torch.cat([V, v], dim=-1))
    t = torch.linalg.svdvals(hvv[..., : V.shape[-1]].to(torch.float64))
    # the tail's energy is known exactly: ||h (I - V V^T)||_F^2 = ||h||_F^2 - ||h V||_F^2 (the control
    # variate's mean in _estimate: an error in it is a bias; _tail_energy avoids float32 cancellation)
    tail_energy = _tail_energy(h, hvv[..., : V.shape[-1]], Vt, fro2, t)
    if lo != torch.float64:
        t = t * (1 - 1e-5)  # float32 round-off: stay below s_j
    t = t / scale[..., None]

    # 2. Golub-Kahan-Lanczos on all probes at once (module doc), chunk by chunk of batch entries
    # (golub_kahan.py: on CPU a chunk's block stays in cache for the steps it runs between two checks)
    state = GolubKahanRuns(h, V, hvv[..., V.shape[-1] :].mT, v.mT, inv, steps)
    checks = None if stop is None else Checks(stop, steps)
    j = 0
    while True:
        # run up to the next check (or the last step); every chunk not yet stopped
        nxt = j + 1
        while nxt < steps and not (checks is not None and checks.due(nxt)):
            nxt += 1
        state.run(j, nxt)
        j = nxt
        values = _estimate(*state.coefficients(j), t, d, tail_energy, fro2)
        if checks is None:  # j == steps
            return (*values, t * scale[..., None], fro2)
        if checks.update(j, *values, frozen=state.frozen()) or j == steps:
            return (*checks.result(), t * scale[..., None], fro2)
        state.stop_chunks(checks.finished)
