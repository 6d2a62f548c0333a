"""Where the calibration's misses come from: the same in float32 and float64, and the deflation's cross-talk.

    python examples/benchmarks/cross_talk.py --threads 1

``calibration.py --seeds 12`` put 3 of the quadrature's answers outside ``rtol`` in float64 and 11
with ``--dtype float32``. All 14 are on blocks whose smaller side is 128-256, which the
quadrature reaches only because that script starts it from 96 (the default starts at 384, or 256
where the pilot's bound ratio is at most 2.3). This script prints two tables about them:

1. **Per block, by dtype.** The 11 blocks (``BLOCKS``) are estimated ``--draws`` times each, with
   independent seeds, in float64 and in float32, as ``calibration.py`` runs them. For each dtype it
   prints how many entries the quadrature answered, how many fell outside ``rtol``, and the mean and
   spread of the answers' signed error against a float64 SVD. If float32 had a bias of its own, its
   rows would differ from float64's beyond the draws' noise.
2. **The split's bias, without the quadrature.** The quadrature estimates the spectrum of ``H`` as
   the union of the top values (those of ``H V``) and the values of the deflated remainder
   ``H (I - V V^T)`` (module doc of ``esswatch.engine.slq``). With an approximate basis ``V`` the
   two parts share column space through ``B12 = U^T H (I - V V^T)`` (``U = orth(H V)``): the
   "cross-talk". Splitting a spectrum this way raises the sum of the singular values (Rotfel'd's
   inequality), so ESS is biased high. The table computes the union exactly, with float64 SVDs
   of both parts and no quadrature. ``one-sided`` is the shipped split. ``two-sided`` takes the top
   from ``U^T H`` and the remainder as ``(I - U U^T) H (I - V V^T)``, which moves the energy of
   ``B12`` into the top. The bases are those the estimator builds: the pilot's (rank 16, no power
   iteration) on the small blocks, and each route's rank on blocks of ``estimators.py --variants``
   at L = 2048. Each figure is the mean over ``REPS`` bases (independent seeds).

The draws run under one thread. Compare rows within one run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from esswatch.engine import adaptive
from esswatch.engine.spectral import entropy_from_singular_values

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from calibration import families  # noqa: E402
from estimators import FLAT_TAIL_VARIANTS, INIT_VARIANTS, attention_at_init, clustered_attention  # noqa: E402

#: (L, seed, family, index): the blocks where calibration.py --seeds 12 (float64 or --dtype float32) had an entry
#: outside rtol
BLOCKS = [
    (384, 0, "attention at initialisation, d 64, q, k x 0.9", 128),
    (384, 1, "attention at initialisation, d 64, q, k x 0.9", 256),
    (384, 2, "attention at initialisation, d 64, q, k x 0.9", 128),
    (384, 9, "attention at initialisation, d 64, q, k x 0.9", 128),
    (384, 10, "attention at initialisation, d 64, q, k x 0.9", 256),
    (384, 3, "flat tail, noise 0.1", 128),
    (384, 8, "flat tail, noise 0.1", 256),
    (384, 9, "flat tail, noise 0.1", 128),
    (384, 4, "flat tail, noise 0.05", 128),
    (384, 6, "flat tail, noise 0.05", 192),
    (768, 10, "flat tail, noise 0.07, d 32", 256),
]
#: blocks at the default sizes (L = 2048, i = 914) and the deflation rank (and power iterations) of the route
#: that answers them: the pilot's basis (16, none), the rank-64 first try, the rank-128 second try
DEFAULT_SIZES = [
    ("the benchmark (noise 0.05, d 32, 4 clusters)", 16, 0),
    ("d 64", 16, 0),
    ("noise 0.07", 64, 1),
    ("noise 0.1", 128, 1),
    ("at initialisation, d 64, q, k x 0.3", 128, 1),
    ("at initialisation, d 64, q, k x 0.9", 128, 1),
]
REPS = 3
RTOL = 0.02


def _tall(h):
    return h.mT if h.shape[-2] < h.shape[-1] else h


def _ess(s):
    return entropy_from_singular_values(s)


def per_block(draws: int):
    print(f"\n## 1. the blocks of the calibration's misses, {draws} draws per dtype (4 heads each)")
    print("| L | seed | family | i | p | exact ESS | float64: answered, outside rtol, mean err, sd | float32: same |")
    print("|---|---|---|---|---|---|---|---|")
    adaptive.SLQ_MIN_SIZE = 96  # as calibration.py
    for L, seed, name, i in BLOCKS:
        h = families(L, seed)[name].dense()[..., i:, :i]
        ref = _ess(torch.linalg.svdvals(h))
        cells = []
        for dtype in (torch.float64, torch.float32):
            errs = []
            for r in range(draws):
                e, lo, hi = adaptive.randomized_entropy(h.to(dtype), RTOL, torch.Generator().manual_seed(10_000 + r))
                by_slq = hi.double() / lo.double() > (1 + RTOL) ** 2 + 1e-9
                errs.append(((e.double() - ref) / ref)[by_slq])
            err = torch.cat(errs)
            sd = float(err.std()) if err.numel() > 1 else float("nan")
            cells.append(
                f"{err.numel()}, {int((err.abs() > RTOL).sum())}, "
                f"{float(err.mean()) if err.numel() else float('nan'):+.2%}, {sd:.2%}"
            )
        p = min(h.shape[-2:])
        print(f"| {L} | {seed} | {name} | {i} | {p} | {float(ref.mean()):.1f} | {cells[0]} | {cells[1]} |", flush=True)


def _basis(h, k, power_iters, g):
    """The right basis the estimator deflates by: ``orth(H^T Q)`` after a rank-``k`` subspace iteration."""
    q = torch.linalg.qr(h @ torch.randn(*h.shape[:-2], h.shape[-1], k, dtype=h.dtype, generator=g)).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(h @ torch.linalg.qr(h.mT @ q).Q).Q
    return torch.linalg.qr(h.mT @ q).Q


def split_bias(h, k, power_iters):
    """Mean relative errors of ESS from the one-sided and the two-sided split (exact parts), and the
    cross-talk energy ``||B12||_F^2 / ||H||_F^2``."""
    h = _tall(h.double())
    ref = _ess(torch.linalg.svdvals(h))
    one = two = cross = 0.0
    for r in range(REPS):
        V = _basis(h, k, power_iters, torch.Generator().manual_seed(r))
        hv = h @ V
        rest = h - hv @ V.mT
        U = torch.linalg.qr(hv).Q
        top = U.mT @ h
        b22 = rest - U @ (U.mT @ rest)
        one += float((_ess(torch.cat([torch.linalg.svdvals(hv), torch.linalg.svdvals(rest)], -1)) / ref - 1).mean())
        two += float((_ess(torch.cat([torch.linalg.svdvals(top), torch.linalg.svdvals(b22)], -1)) / ref - 1).mean())
        fro2 = (h * h).sum((-1, -2))
        cross += float((((top * top).sum((-1, -2)) - (hv * hv).sum((-1, -2))) / fro2).mean())
    return ref, one / REPS, two / REPS, cross / REPS


def splits():
    print(f"\n## 2. the split's bias in ESS with exact parts (no quadrature), mean of {REPS} bases, 4 heads")
    print("| block | deflation rank | exact ESS | one-sided (shipped) | two-sided | ||B12||^2 / ||H||^2 |")
    print("|---|---|---|---|---|---|")
    for L, seed, name, i in BLOCKS:
        ref, one, two, cross = split_bias(families(L, seed)[name].dense()[..., i:, :i], 16, 0)
        print(
            f"| {name}, L = {L}, seed {seed}, i = {i} | 16 | {float(ref.mean()):.1f} | {one:+.2%} | {two:+.2%} "
            f"| {cross:.1e} |",
            flush=True,
        )
    for name, k, power_iters in DEFAULT_SIZES:
        if name in FLAT_TAIL_VARIANTS:
            att = clustered_attention(2048, dtype=torch.float64, **FLAT_TAIL_VARIANTS[name])
        else:
            att = attention_at_init(2048, dtype=torch.float64, **INIT_VARIANTS[name])
        ref, one, two, cross = split_bias(att.dense()[..., 914:, :914], k, power_iters)
        print(
            f"| {name}, L = 2048, i = 914 | {k} | {float(ref.mean()):.1f} | {one:+.2%} | {two:+.2%} | {cross:.1e} |",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draws", type=int, default=40, help="estimates per block and dtype (independent seeds)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"# cross-talk, {torch.get_num_threads()} thread(s), torch {torch.__version__}, rtol {RTOL}")
    per_block(args.draws)
    splits()
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
