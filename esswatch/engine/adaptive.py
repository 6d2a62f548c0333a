"""The adaptive randomized estimator of entropy-ESS of one Hankel block (tolerance-ESS: :mod:`.tolerance_sketch`).

Entropy-ESS (:func:`randomized_entropy`), in order of cost:

1. a rank-16 pilot sketch without power iterations (a few % of an exact SVD); long-tailed
   blocks (``upper/lower > SKETCH_HOPELESS_RATIO``, or an unseen energy worth more than
   ``SKETCH_FLAT_TAIL * p`` values at the pilot's smallest) skip the bound-closing sketches;
2. low-ESS blocks are often resolved by the pilot's rank already (bounds of
   :mod:`.randomized` within ``(1 + rtol)^2``) once a float64 re-sketch at that rank makes the
   unseen energy exact; it runs where the pilot's bounds are within ``SKETCH_REPROJECT_RATIO``;
3. sketches of rank 32, 64, ... with 2 power iterations until the bounds close, while they
   cost less than ``SKETCH_BUDGET`` of an exact SVD;
4. blocks where the bounds cannot close (a long flat tail) and whose smaller side is at
   least ``SLQ_MIN_SIZE`` (``SLQ_SMALL_MIN_SIZE`` where the pilot's bound ratio is at most
   ``SLQ_SMALL_MAX_RATIO``): the deflated stochastic Lanczos quadrature of :mod:`.slq`,
   accepted per batch entry when ``gap/2 + 2 SE <= log(1 + rtol)`` (about 95% confidence).
   Blocks the pilot already screened out are deflated by the pilot's own right basis
   (``orth(H^T Q)``, rank 16: half a power iteration, no further pass over the block), or, where
   its ratio is above ``SLQ_WIDE_RATIO`` and its tail is not flat (a band above the tail), by a
   rank-``SLQ_WIDE_RANK`` subspace iteration (one power iteration);
5. entries that quadrature rejects, in blocks whose smaller side is at least
   ``SLQ_RETRY_MIN_SIZE``: a second quadrature deflated by a rank-``k`` subspace iteration (one
   power iteration), ``k = SLQ_RETRY_RANK`` doubled while the largest first estimate is above
   ``1.5 k`` (and ``k <= p / 3``), for entries whose first estimate is at most
   ``SLQ_RETRY_MAX_RATIO * k``. Where the pilot's ratio is above ``SLQ_SCOUT_RATIO`` and its tail is
   not flat, the first quadrature is not tried: a ``SLQ_SCOUT_STEPS``-step run only estimates
   (for the rank), or, below ``SLQ_RETRY_MIN_SIZE``, the block goes to exact at once. It is for
   a band of values above the tail that rank 16 leaves in it (attention at initialisation: one
   value near ``s_1``, a band of about ``d`` values, a long tail). The same acceptance test;
6. everything else (and every rejected batch entry) is computed exactly.

All randomness comes from the ``generator`` argument. Pure tensor math on the block.
"""

from __future__ import annotations

import math

import torch

from .exact import oriented_svdvals
from .randomized import entropy_bounds, sketch_singular_values
from .scaling import on_unit_scale
from .slq import frobenius2, products, slq_entropy
from .spectral import entropy_from_singular_values

__all__ = [
    "SKETCH_BUDGET",
    "SKETCH_COST",
    "SKETCH_FLAT_TAIL",
    "SKETCH_HOPELESS_RATIO",
    "SKETCH_PILOT_RANK",
    "SKETCH_POWER_ITERS",
    "SKETCH_RANK0",
    "SKETCH_REPROJECT_RATIO",
    "SLQ_MIN_SIZE",
    "SLQ_MIN_RTOL",
    "SLQ_RANK",
    "SLQ_RETRY_MAX_RATIO",
    "SLQ_RETRY_MIN_SIZE",
    "SLQ_RETRY_RANK",
    "SLQ_RETRY_RANK_DIVISOR",
    "SLQ_SCOUT_RATIO",
    "SLQ_SCOUT_STEPS",
    "SLQ_SMALL_MAX_RATIO",
    "SLQ_SMALL_MIN_SIZE",
    "SLQ_WIDE_RANK",
    "SLQ_WIDE_RATIO",
    "randomized_entropy",
]

SKETCH_RANK0, SKETCH_POWER_ITERS = 32, 2  #: randomized: starting rank and power iterations
#: cost model (measured on CPU, examples/benchmarks/estimators.py): a rank-k sketch with
#: 2 power iterations costs about SKETCH_COST * k / p of the exact SVD of the same block.
SKETCH_COST = 3.0
#: fall back to exact once the sketches would have cost SKETCH_BUDGET of the exact SVD, or
#: at once if the first sketch leaves upper/lower above SKETCH_HOPELESS_RATIO (a long tail).
SKETCH_BUDGET = 0.5
SKETCH_HOPELESS_RATIO = 1.5
#: rank of the pilot sketch (no power iteration) that screens out long-tailed blocks
SKETCH_PILOT_RANK = 16
#: the pilot's rank is sketched again with a float64 projection only where the pilot's bounds are
#: within this ratio: float32 round-off in the unseen energy holds them open by a few % at most
#: (examples/benchmarks/sketch_ladder.py: re-sketches closed blocks whose pilot had 1.005-1.05,
#: none above 1.05, over 1,072 blocks of 134 operators)
SKETCH_REPROJECT_RATIO = 1.1
#: ... and the sketches of rank 32 and up (step 3) are skipped where the pilot's unseen energy would
#: fill more than SKETCH_FLAT_TAIL * p values at its smallest level (a flat tail, which they cannot
#: close; sketch_ladder.py: blocks they closed had at most 0.39 p, those they could not close 0.45 p
#: or more, 62 of 65 above 0.5 p)
SKETCH_FLAT_TAIL = 0.5
#: the deflated SLQ runs on blocks whose smaller side is at least this (below it an exact
#: SVD is about as cheap) with a deflation rank of SLQ_RANK
SLQ_MIN_SIZE = 384
SLQ_RANK = 32
#: ... and only for rtol at or above this: its ~95% confidence is calibrated at 0.02, and below it a float32
#: block's bias (about +0.9% on attention at initialisation) took up the whole rtol (46% misses at 0.01)
SLQ_MIN_RTOL = 0.02
#: ... and blocks from SLQ_SMALL_MIN_SIZE where the pilot's bound ratio is at most SLQ_SMALL_MAX_RATIO
#: (examples/benchmarks/small_blocks.py: ratios of 1.28-2.09 there, every head accepted, 0.17-0.75 of the
#: exact SVD's time; from 2.56 up most heads were rejected, so the quadrature's time was lost)
SLQ_SMALL_MIN_SIZE = 256
SLQ_SMALL_MAX_RATIO = 2.3
#: entries the first quadrature rejects get a second one (:func:`_retry_rank`) when the block's
#: smaller side is at least SLQ_RETRY_MIN_SIZE (there the try costs a small part of the exact SVD
#: it may save), deflated by a subspace iteration of rank SLQ_RETRY_RANK or more, for entries
#: whose first estimate is at most SLQ_RETRY_MAX_RATIO times that rank (far above it the tail
#: holds most of the mass and the second try fails too)
SLQ_RETRY_RANK = 128
SLQ_RETRY_MIN_SIZE = 640
SLQ_RETRY_MAX_RATIO = 3
#: the second try's rank stays at most p / SLQ_RETRY_RANK_DIVISOR (3: on GPT-2-shaped attention at
#: initialisation, L = 4096, heads with ESS about 480 at p = 1820 needed rank 512; p / 4 stopped at 256)
SLQ_RETRY_RANK_DIVISOR = 3
#: a pilot ratio above SLQ_SCOUT_RATIO with a tail that is not flat: the first quadrature fails (examples/
#: benchmarks/first_try.py: none accepted above 5.6 but one block; attention at initialisation is at 20-150),
#: so only its estimates after SLQ_SCOUT_STEPS steps are made, to pick the second try's rank
SLQ_SCOUT_RATIO = 8.0
SLQ_SCOUT_STEPS = 2
#: a pilot ratio from SLQ_WIDE_RATIO to SLQ_SCOUT_RATIO, a tail that is not flat: the first quadrature deflates at rank
#: SLQ_WIDE_RANK (examples/benchmarks/wide_band.py: rank 16 leaves a band above the tail and fails; cut above d 64's)
SLQ_WIDE_RATIO = 3.75
SLQ_WIDE_RANK = 64


def _ratio(lo, hi) -> float:
    return float((hi / torch.clamp(lo, min=1e-300)).max())


def _flat_tail(t, fro2, p: int) -> bool:
    """Whether the pilot's unseen energy ``r^2 = ||H||_F^2 - sum t_j^2`` exceeds
    ``SKETCH_FLAT_TAIL * p`` values at its smallest level ``t_k^2`` in some batch entry."""
    r2 = fro2 - (t * t).sum(-1)
    return bool((r2 > SKETCH_FLAT_TAIL * p * t[..., -1] ** 2).any())


def _exact(h):
    e = entropy_from_singular_values(oriented_svdvals(h))
    return e, e, e


def _bounded(est, t, fro2, p: int):
    """``(est, lo, hi)``: the deterministic bounds of the top values ``t`` and the estimate clamped into them."""
    _, lo, hi = entropy_bounds(t, fro2, p)
    return torch.minimum(torch.maximum(est.to(lo.dtype), lo), hi), lo, hi


def _slq_try(h, fro2, stop, generator, k, basis=None):
    """One deflated SLQ of ``h`` (rank ``k``; ``basis``: the caller's, else its own subspace
    iteration): ``(est, lo, hi, ok)``, ``ok`` where it meets its acceptance test."""
    est, half_gap, se, t, _ = slq_entropy(h, k, generator, fro2=fro2, basis=basis, stop=stop)
    est, lo, hi = _bounded(est, t, fro2, min(h.shape[-2:]))
    return est, lo, hi, (half_gap + 2 * se <= stop) & torch.isfinite(est)


def _scout(h, fro2, generator, basis):
    """The first quadrature's estimates after ``SLQ_SCOUT_STEPS`` steps, no acceptance test: ``(est, lo, hi)``."""
    est, _, _, t, _ = slq_entropy(h, SLQ_RANK, generator, fro2=fro2, basis=basis, steps=SLQ_SCOUT_STEPS)
    return _bounded(est, t, fro2, min(h.shape[-2:]))


def _has_second_try(p: int, k: int = SLQ_RETRY_RANK) -> bool:
    return p >= max(SLQ_RETRY_MIN_SIZE, SLQ_RETRY_RANK_DIVISOR * k)


def _retry_rank(first, p: int) -> int:
    """The second quadrature's deflation rank for a block whose smaller side is ``p`` (0: no
    second try), from the rejected entries' first estimates ``first``: ``SLQ_RETRY_RANK``, doubled
    while their largest (of those it could take) is above 1.5 times it and the doubled rank stays
    at most ``p / SLQ_RETRY_RANK_DIVISOR`` (the band above the tail grows with the ESS)."""
    k, div = SLQ_RETRY_RANK, SLQ_RETRY_RANK_DIVISOR
    if not _has_second_try(p, k) or first.numel() == 0:
        return 0
    top = float(torch.where(first <= SLQ_RETRY_MAX_RATIO * p / div, first, 0).max())
    while top > 1.5 * k and 2 * k * div <= p:
        k *= 2
    return k


def _slq_or_exact(h, fro2, rtol, generator, basis=None, scout=False, k=SLQ_RANK):
    """The deflated SLQ where it meets its acceptance test, exact per batch entry elsewhere.

    ``basis``: a right basis of ``h`` from a sketch already run (skips the SLQ's own). Entries it
    rejects may get a second try with a larger deflation (module doc, step 5) before their exact SVD.
    ``scout``: the first try only estimates, for the second try's rank (module doc, step 5)."""
    p = min(h.shape[-2:])
    stop = math.log1p(rtol)
    if not scout:
        est, lo, hi, ok = _slq_try(h, fro2, stop, generator, k, basis)
    elif not _has_second_try(p):
        return _exact(h)
    else:
        est, lo, hi = _scout(h, fro2, generator, basis)
        ok = torch.zeros_like(lo, dtype=torch.bool)
    if bool(ok.all()):
        return est, lo, hi
    shape = ok.shape
    flat = h.reshape(-1, *h.shape[-2:])
    est, lo, hi, ok = (x.reshape(-1).clone() for x in (est, lo, hi, ok))
    # a band of values above the tail (e.g. the head dimension's worth of near-uniform attention
    # at initialisation) that rank 16 leaves in the tail: deflate it too
    k = _retry_rank(est[~ok], p)
    bad = ((~ok) & (est <= SLQ_RETRY_MAX_RATIO * k)).nonzero()[:, 0] if k else ok[:0]
    if bad.numel():
        e2, lo2, hi2, ok2 = _slq_try(flat[bad], fro2.reshape(-1)[bad], stop, generator, k)
        est[bad] = torch.where(ok2, e2, est[bad])
        lo[bad] = torch.maximum(lo[bad], lo2)
        hi[bad] = torch.minimum(hi[bad], hi2)
        ok[bad] = ok2
    if not bool(ok.all()):
        # exact for the rejected batch entries only
        bad = ~ok
        ex = entropy_from_singular_values(torch.linalg.svdvals(flat[bad])).to(est.dtype)
        for x in (est, lo, hi):
            x[bad] = ex
    return est.reshape(shape), lo.reshape(shape), hi.reshape(shape)


def randomized_entropy(h: torch.Tensor, rtol: float, generator, *, allow_slq: bool = True, fro2=None):
    """``(est, lower, upper)`` of entropy-ESS of the block ``h`` (``batch + (m, n)``).

    ``lower <= exact <= upper`` always (deterministic bounds; equal to the estimate where the
    block was computed exactly). The estimate is within ``rtol`` of the exact value for
    bound-closed and exact entries; for entries accepted by the deflated SLQ with about 95%
    confidence (the SLQ runs only for ``rtol >= SLQ_MIN_RTOL``; below it such entries are exact).
    ``fro2``: ``||h||_F^2`` (float64, ``batch``) where the caller has it
    (:func:`~esswatch.engine.slq.hankel_frobenius2`), else one pass over ``h`` computes it.
    Entries far from unit scale are rescaled, all-zero ones answered with 0 (:mod:`.scaling`).
    """
    fro2 = frobenius2(h) if fro2 is None else fro2
    allow_slq = allow_slq and rtol >= SLQ_MIN_RTOL - 1e-12
    return on_unit_scale(lambda h, f: _randomized_entropy(h, rtol, generator, allow_slq, f), h, fro2)


def _randomized_entropy(h: torch.Tensor, rtol: float, generator, allow_slq: bool, fro2):
    if h.shape[-2] < h.shape[-1]:
        h = h.transpose(-1, -2)  # tall: same singular values, smaller sketch vectors
    if h.stride(-1) != 1 and h.stride(-2) != 1:
        h = h.contiguous()  # BLAS needs one unit stride; a sliced view of T is used as is
    batch, (m, n) = h.shape[:-2], h.shape[-2:]
    p = min(m, n)
    matmul, rmatmul = products(h)
    use_slq = allow_slq and p >= SLQ_MIN_SIZE

    spent, pilot_ratio = 0.0, math.inf
    if p >= 4 * SKETCH_PILOT_RANK:
        # a pilot in the compute dtype: rank 16, no power iteration (a few % of an exact SVD)
        # screens out long-tailed blocks, which go to the SLQ or exact at once
        t, basis = sketch_singular_values(
            matmul, rmatmul, n, batch, SKETCH_PILOT_RANK, 0, h.dtype, h.device, generator, return_basis=True
        )
        t = t.to(torch.float64)
        _, lo, hi = entropy_bounds(t, fro2, p)
        pilot_ratio = _ratio(lo, hi)
        use_slq |= allow_slq and p >= SLQ_SMALL_MIN_SIZE and pilot_ratio <= SLQ_SMALL_MAX_RATIO
        flat = pilot_ratio > SKETCH_REPROJECT_RATIO and _flat_tail(t, fro2, p)
        if pilot_ratio > SKETCH_HOPELESS_RATIO or flat:
            # a long tail: the pilot's right basis (H^T Q, half a power iteration) deflates the top
            scout = pilot_ratio > SLQ_SCOUT_RATIO and not flat
            if use_slq and not flat and SLQ_WIDE_RATIO < pilot_ratio <= SLQ_SCOUT_RATIO and p >= 3 * SLQ_WIDE_RANK:
                return _slq_or_exact(h, fro2, rtol, generator, k=SLQ_WIDE_RANK)
            return _slq_or_exact(h, fro2, rtol, generator, basis, scout) if use_slq else _exact(h)
        spent += SKETCH_COST * SKETCH_PILOT_RANK / 3
    # the sketches proper: power iterations in the compute dtype; the final projection and
    # ||H||_F^2 in float64, since the unseen energy r^2 = ||H||_F^2 - sum t_j^2 is a
    # difference of near-equal numbers that float32 round-off would swamp
    h64 = h.to(torch.float64)
    fro2 = (h64 * h64).sum(dim=(-1, -2))
    _, rmatmul64 = products(h64)  # the BLAS layout matters in float64 too: 2-5x (h64^T @ w is slow)

    if p >= 4 * SKETCH_PILOT_RANK and pilot_ratio <= SKETCH_REPROJECT_RATIO:
        # low-ESS blocks (trained attention) are often resolved by the pilot's rank already, once the
        # unseen energy is exact: a float64 re-sketch at the pilot's rank, where the pilot came close
        t = sketch_singular_values(
            matmul, rmatmul, n, batch, SKETCH_PILOT_RANK, 0, h.dtype, h.device, generator, rmatmul_exact=rmatmul64
        )
        est, lo, hi = entropy_bounds(t, fro2, p)
        if _ratio(lo, hi) <= (1 + rtol) ** 2:
            return est, lo, hi
        spent += SKETCH_COST * SKETCH_PILOT_RANK / 3
    k = min(SKETCH_RANK0, p)
    while True:
        if k >= p:
            return _exact(h)
        sketch = (matmul, rmatmul, n, batch, k, SKETCH_POWER_ITERS, h.dtype, h.device, generator)
        t, basis = sketch_singular_values(*sketch, rmatmul_exact=rmatmul64, return_basis=True)
        spent += SKETCH_COST * k
        est, lo, hi = entropy_bounds(t, fro2, p)
        ratio = _ratio(lo, hi)
        if ratio <= (1 + rtol) ** 2:
            return est, lo, hi
        if use_slq:
            # the bounds did not close at rank 32: a flat tail; the sketch's basis deflates it
            del h64
            return _slq_or_exact(h, fro2, rtol, generator, basis if k == SLQ_RANK else None)
        k_next = min(2 * k, p)
        if ratio > SKETCH_HOPELESS_RATIO or spent + SKETCH_COST * k_next > SKETCH_BUDGET * p:
            return _exact(h)
        k = k_next
