"""Which blocks below ``SLQ_MIN_SIZE`` the randomized estimator's quadrature answers, and faster than exact.

    python examples/benchmarks/small_blocks.py --threads 1

``estimator="randomized"`` runs the deflated stochastic Lanczos quadrature (``esswatch.engine.slq``)
on blocks whose bounds cannot close once their smaller side ``p`` is at least ``SLQ_MIN_SIZE`` (384).
Below that, from ``SLQ_SMALL_MIN_SIZE`` (256), it runs only where the rank-16 pilot's bound ratio
``upper / lower`` is at most ``SLQ_SMALL_MAX_RATIO`` (``esswatch.engine.adaptive``). This script
shows why. For every block with ``256 <= p < 384`` that the pilot leaves open, of every operator
family of ``calibration.py`` (lengths 768 and 1024) and ``estimators.py --variants`` (L = 2048), in
float32, it runs the pilot, an exact SVD and the quadrature (deflated by the pilot's basis, as the
estimator does), and prints per family and side of the threshold: the pilot's ratios, the share of
heads the quadrature accepted, its time over the exact SVD's (both of the whole block, all heads, one
thread), and the largest error of an accepted head against that SVD. A rejected head costs the
quadrature's time on top of its exact SVD.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

from esswatch.engine import adaptive
from esswatch.engine.exact import oriented_svdvals
from esswatch.engine.randomized import entropy_bounds, sketch_singular_values
from esswatch.engine.slq import frobenius2, products
from esswatch.engine.spectral import entropy_from_singular_values

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from calibration import families  # noqa: E402
from estimators import FLAT_TAIL_VARIANTS, INIT_VARIANTS, attention_at_init, clustered_attention  # noqa: E402


def operators(seeds: int, lengths=(768, 1024)):
    """``(family, L, dense T)`` in float32: calibration.py's families at ``lengths``, then estimators.py's
    variants (L = 2048). Also used by ``first_try.py``."""
    for L in lengths:
        for seed in range(seeds):
            for name, op in families(L, seed).items():
                yield name, L, op.dense().float()
    for name, kw in FLAT_TAIL_VARIANTS.items():
        yield f"estimators.py: {name}", 2048, clustered_attention(2048, dtype=torch.float32, **kw).dense()
    for name, kw in INIT_VARIANTS.items():
        yield f"estimators.py: {name}", 2048, attention_at_init(2048, dtype=torch.float32, **kw).dense()


def pilot(T, i, seed):
    """The block ``T[..., i:, :i]`` (tall, as the estimator takes it) and its rank-16 pilot, as the estimator
    runs it: ``(h, p, generator, ||h||_F^2, t (float64), right basis, bound ratio)``. Also used by ``first_try.py``."""
    h = T[..., i:, :i]
    if h.shape[-2] < h.shape[-1]:
        h = h.transpose(-1, -2)
    p = min(h.shape[-2:])
    g = torch.Generator().manual_seed(seed)
    fro2 = frobenius2(h)
    mm, rm = products(h)
    k = adaptive.SKETCH_PILOT_RANK
    t, basis = sketch_singular_values(mm, rm, h.shape[-1], h.shape[:-2], k, 0, h.dtype, h.device, g, return_basis=True)
    t = t.double()
    _, lo, hi = entropy_bounds(t, fro2, p)
    return h, p, g, fro2, t, basis, adaptive._ratio(lo, hi)


def block(T, i, seed, rtol):
    """``(pilot ratio, accepted share, time quadrature / exact, largest error accepted)`` of ``T[..., i:, :i]``,
    or ``None`` where the pilot closes its bounds."""
    h, p, g, fro2, _, basis, ratio = pilot(T, i, seed)
    if ratio <= (1 + rtol) ** 2:
        return None
    t0 = time.perf_counter()
    ex = entropy_from_singular_values(oriented_svdvals(h))
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    est, _, _, ok = adaptive._slq_try(h, fro2, math.log1p(rtol), g, adaptive.SLQ_RANK, basis)
    t_slq = time.perf_counter() - t0
    err = ((est - ex).abs() / ex)[ok]
    return ratio, float(ok.float().mean()), t_slq / t_exact, float(err.max()) if err.numel() else math.nan


def summary(rows):
    if not rows:
        return "| - | - | - | - |"
    r, acc, tt, err = zip(*rows)
    errs = [e for e in err if not math.isnan(e)]
    worst = f"{max(errs):.4f}" if errs else "-"
    share = sum(acc) / len(acc)
    return f"| {min(r):.2f}-{max(r):.2f} ({len(rows)}) | {share:.2f} | {min(tt):.2f}-{max(tt):.2f} | {worst} |"


def arguments(doc: str, seeds: int):
    """The command line of this script and ``first_try.py`` (``--threads`` is applied)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=seeds, help="operators per calibration family and length")
    ap.add_argument("--rtol", type=float, default=0.02)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main():
    args = arguments(__doc__, seeds=3)
    cut = adaptive.SLQ_SMALL_MAX_RATIO
    t0 = time.perf_counter()
    fams = {}
    for n, (name, L, T) in enumerate(operators(args.seeds)):
        T = T if T.dim() == 3 else T[None]
        for i in sorted({256, 300, 340, L - 340, L - 256}):
            if not adaptive.SLQ_SMALL_MIN_SIZE <= min(i, L - i) < adaptive.SLQ_MIN_SIZE:
                continue
            out = block(T, i, n, args.rtol)
            if out is not None:
                fams.setdefault(name, ([], []))[out[0] > cut].append(out)
    print(
        f"blocks with {adaptive.SLQ_SMALL_MIN_SIZE} <= p < {adaptive.SLQ_MIN_SIZE} the pilot left open, float32, "
        f"rtol {args.rtol}; pilot ratio at most {cut} (the quadrature runs) | above it (exact)"
    )
    print(
        "| family | ratios (blocks) | accepted | time / exact | largest error | ratios (blocks) | accepted "
        "| time / exact | largest error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (below, above) in fams.items():
        print(f"| {name} {summary(below)[:-1]}{summary(above)}", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
