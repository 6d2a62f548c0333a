"""Where the randomized estimator's first quadrature should deflate at rank 64 instead of the pilot's 16.

    python examples/benchmarks/wide_band.py --threads 1

Blocks whose rank-16 pilot leaves a long tail go to the deflated stochastic Lanczos quadrature
(``esswatch.engine.slq``), by default deflated by the pilot's own rank-16 basis. Where a band of values
lies above the tail (clustered attention with more noise: about ``clusters x d`` values a few times
above the rest), rank 16 leaves most of that band in the tail, the Gauss/Radau gap closes slowly and
the first quadrature fails; a rank-64 deflation (a subspace iteration of its own) removes enough of the
band that the quadrature passes in a few steps. Where the pilot's ratio is above ``SLQ_WIDE_RATIO`` (up
to ``SLQ_SCOUT_RATIO``) and its tail is not flat, the estimator takes the rank-64 route
(``esswatch.engine.adaptive``, step 4). This script is the evidence. For every block that reaches
that choice (a smaller side of at least 384, a pilot ratio from 1.5 to ``SLQ_SCOUT_RATIO``, a tail
that is not flat) of ``calibration.py``'s families (L = 1024 and 1536, two seeds) and
``estimators.py``'s variants (L = 2048), in float32, it times ``randomized`` (rtol 0.02) with the
first quadrature at rank 16 (the pilot's basis) and forced to rank 64, alternating, against the
exact SVD, and prints:

1. per bucket of the pilot's ratio: the blocks, each route's time as a share of the exact SVDs', the
   share of heads each route's first quadrature accepted, and the largest errors;
2. per family: the same at the shipped cut (rank 64 above ``SLQ_WIDE_RATIO`` only).

Times are medians over the repeats (after one warm-up call per block); compare within one run only.
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys
import time

import torch

from esswatch.engine import adaptive
from esswatch.engine.exact import oriented_svdvals
from esswatch.engine.spectral import entropy_from_singular_values

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from small_blocks import arguments, operators, pilot  # noqa: E402

BUCKETS = (1.5, 2.5, 3.0, 3.75, 5.0, 6.5, 8.0)


class _FirstTry:
    """Records the accepted share of each first quadrature (``adaptive._slq_try``'s first call in a block)."""

    def __init__(self):
        self.orig, self.shares = adaptive._slq_try, []

    def __enter__(self):
        def spy(h, fro2, stop, generator, k, basis=None):
            out = self.orig(h, fro2, stop, generator, k, basis)
            self.shares.append(float(out[3].float().mean()))
            return out

        adaptive._slq_try = spy
        return self

    def __exit__(self, *exc):
        adaptive._slq_try = self.orig


def _route(h, seed, wide: float):
    """``(seconds, estimate, first try's accepted share)`` of one ``randomized_entropy`` call with
    ``SLQ_WIDE_RATIO = wide``."""
    saved = adaptive.SLQ_WIDE_RATIO
    adaptive.SLQ_WIDE_RATIO = wide
    try:
        with _FirstTry() as spy:
            t0 = time.perf_counter()
            est = adaptive.randomized_entropy(h, 0.02, torch.Generator().manual_seed(seed))[0]
            dt = time.perf_counter() - t0
    finally:
        adaptive.SLQ_WIDE_RATIO = saved
    return dt, est, spy.shares[0] if spy.shares else math.nan


def block(T, i, seed, repeats):
    """``(ratio, t_exact, t16, t64, share16, share64, err16, err64)`` for ``T[..., i:, :i]``, or ``None``
    where the block does not reach the choice (module doc)."""
    h, p, _, fro2, t, _, ratio = pilot(T, i, seed)
    if not adaptive.SKETCH_HOPELESS_RATIO < ratio <= adaptive.SLQ_SCOUT_RATIO or adaptive._flat_tail(t, fro2, p):
        return None
    ex = entropy_from_singular_values(oriented_svdvals(h))
    times = {"exact": [], 16: [], 64: []}
    out = {}
    for r in range(repeats + 1):
        for route, wide in ((16, math.inf), (64, 0.0)):
            dt, est, share = _route(h, seed + r, wide)
            out[route] = (share, float(((est - ex).abs() / ex).max()))
            times[route].append(dt)
        t0 = time.perf_counter()
        oriented_svdvals(h)
        times["exact"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return ratio, med["exact"], med[16], med[64], out[16][0], out[64][0], out[16][1], out[64][1]


def _mean(xs):
    """The mean over the blocks where the route ran a first quadrature (its pilot may have sent a block on)."""
    xs = [x for x in xs if not math.isnan(x)]
    return f"{statistics.mean(xs):.2f} ({len(xs)})" if xs else "-"


def _row(label, rows):
    ex, t16, t64 = (sum(r[k] for r in rows) for k in (1, 2, 3))
    s16, s64 = (_mean([r[k] for r in rows]) for k in (4, 5))
    e16, e64 = (max(r[k] for r in rows) for k in (6, 7))
    return (
        f"| {label} | {len(rows)} | {t16 / ex:.2f} | {t64 / ex:.2f} | {t16 / t64:.2f}x | {s16} | {s64} "
        f"| {e16:.1e} | {e64:.1e} |"
    )


def main():
    args = arguments(__doc__, seeds=2)
    t_start = time.perf_counter()
    rows = []  # (family, ratio, ...)
    for n, (name, L, T) in enumerate(operators(args.seeds, lengths=(1024, 1536))):
        T = T if T.dim() == 3 else T[None]
        for i in sorted({L // 4, L // 2, 3 * L // 4, 400, L - 400}):
            if min(i, L - i) >= adaptive.SLQ_MIN_SIZE:
                out = block(T, i, n, 3)
                if out is not None:
                    rows.append((name, *out))
    head = (
        "| {} | blocks | rank 16: time / exact | rank 64: time / exact | rank 16 / rank 64 | first try accepted, "
        "rank 16 | rank 64 | largest error, rank 16 | rank 64 |"
    )
    print(
        f"blocks with p >= {adaptive.SLQ_MIN_SIZE}, a pilot ratio from {adaptive.SKETCH_HOPELESS_RATIO} to "
        f"{adaptive.SLQ_SCOUT_RATIO} and a tail that is not flat; float32, rtol 0.02; randomized with the first "
        "quadrature deflated at rank 16 (the pilot's basis) and at rank 64, against the exact SVD (median of 3)"
    )
    print("\n## 1. by the pilot's ratio\n")
    print(head.format("pilot ratio"))
    print("|---|---|---|---|---|---|---|---|---|")
    for lo, hi in zip(BUCKETS, BUCKETS[1:]):
        sel = [r[1:] for r in rows if lo < r[1] <= hi]
        if sel:
            print(_row(f"{lo}-{hi}", sel))
    cut = adaptive.SLQ_WIDE_RATIO
    print(f"\n## 2. by family: rank 64 only above SLQ_WIDE_RATIO = {cut} (the shipped rule)\n")
    print(head.format("family").replace("rank 64: time", "shipped: time").replace("/ rank 64", "/ shipped"))
    print("|---|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r[0] for r in rows):
        sel = [r[1:] for r in rows if r[0] == name]
        shipped = [
            (
                x[0],
                x[1],
                x[2],
                x[3] if x[0] > cut else x[2],
                x[4],
                x[5] if x[0] > cut else x[4],
                x[6],
                x[7] if x[0] > cut else x[6],
            )
            for x in sel
        ]
        ratios = [x[0] for x in sel]
        print(_row(f"{name} ({min(ratios):.1f}-{max(ratios):.1f})", shipped))
    print(f"\n{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
