"""The quadrature's control variate on float32 blocks: its mean, the tail energy, formed or differenced.

    python examples/benchmarks/tail_energy.py --threads 1

The deflated quadrature (``esswatch.engine.slq``) uses each probe's exact ``z^T A^T A z`` as a control
variate, with the tail energy ``||H||_F^2 - ||H V||_F^2`` as its known mean. In float32 that difference
carries round-off of about ``1e-7 ||H||_F^2``; where a deflation of rank 64 or 128 leaves less than that
in the tail, a wrong mean turns into a bias that neither the Gauss/Radau gap nor the standard error
sees. ``slq._tail_energy`` forms the remainder ``H - (H V) V^T`` there instead (below
``TAIL_ENERGY_EPS`` machine epsilons). This script runs ``randomized`` (rtol 0.02, the watch's 8
interior indices, L = 2048) on clustered attention (``estimators.py``'s construction; head dimension
16 and 32, noise 0.05, 0.07 and 0.1, three seeds each), in float32 and float64, with the tail energy
as shipped and always differenced (``TAIL_ENERGY_EPS = 0``, the previous release), and with the first
quadrature as shipped and at rank 16 only (``SLQ_WIDE_RATIO`` infinite: rejected heads then get the
rank-128 second try, whose tail holds the least energy), against a float64 NumPy SVD of the float64
operator, and prints per setting the entries, those the quadrature answered, those outside ``rtol``
and the largest error.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

import esswatch as ew
from esswatch.engine import adaptive, slq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from estimators import clustered_attention, interior  # noqa: E402
from reference import entropy_ess_ref  # noqa: E402  (the tests' NumPy reference)


def _count(r, out, ref):
    """Adds one call's entries to ``r``: (entries, by the quadrature, outside rtol, largest error)."""
    e, lo, hi = (x.double().numpy() for x in out)
    err = np.abs(e - ref) / ref
    r[0] += ref.size
    r[1] += int((hi / lo > 1.02**2 + 1e-9).sum())
    r[2] += int((err > 0.02).sum())
    r[3] = max(r[3], float(err.max()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L, idx, shipped, wide = 2048, interior(2048, 8), slq.TAIL_ENERGY_EPS, adaptive.SLQ_WIDE_RATIO
    t0 = time.perf_counter()
    rows = {}
    for d in (16, 32):
        for noise in (0.05, 0.07, 0.1):
            for seed in range(args.seeds):
                op64 = clustered_attention(L, d=d, noise=noise, seed=100 + seed, dtype=torch.float64)
                ref = entropy_ess_ref(op64.dense().numpy(), idx)
                for dtype in ("float32", "float64"):
                    op = op64.to(dtype=getattr(torch, dtype))
                    for first, cut in (("as shipped", wide), ("rank 16", float("inf"))):
                        for tail, eps in (("formed where small", shipped), ("always differenced", 0)):
                            slq.TAIL_ENERGY_EPS, adaptive.SLQ_WIDE_RATIO = eps, cut
                            try:
                                gen = torch.Generator().manual_seed(seed)
                                out = ew.entropy_ess(op, idx, estimator="randomized", return_bounds=True, generator=gen)
                            finally:
                                slq.TAIL_ENERGY_EPS, adaptive.SLQ_WIDE_RATIO = shipped, wide
                            _count(rows.setdefault((d, noise, dtype, first, tail), [0, 0, 0, 0.0]), out, ref)
    print(
        f"# clustered attention, L = {L}, indices {idx}, {args.seeds} seeds per setting, rtol 0.02, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    head = "| head dim | noise | dtype | first quadrature | tail energy | entries | by the quadrature | outside rtol "
    print(head + "| largest error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (d, noise, dtype, first, tail), (n, s, miss, mx) in rows.items():
        print(f"| {d} | {noise} | {dtype} | {first} | {tail} | {n} | {s} | {miss} | {mx:.2%} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
