"""Calibration of the randomized estimator's flat-tail quadrature on operators nobody tuned it for.

    python examples/benchmarks/calibration.py --threads 1 --seeds 8

The deflated stochastic Lanczos quadrature (``esswatch.engine.slq``) accepts a head when
``half_gap + 2 SE <= log(1 + rtol)``: about 95% confidence, not a guarantee, and it ignores the
cross-talk between the deflated top and the tail. This script counts, per operator family, how
many head-index entries the quadrature answered (the deterministic bounds stayed open) and how
many of all entries landed outside ``rtol`` of a float64 SVD (``tests/reference.py``). The
quadrature normally starts at blocks of 384 x 384; here it runs from 96 (as in the
test-suite's ``test_slq_calibration``) so that small, fast operators exercise it.

Families: low-ESS flat-tail attention (clustered q/k plus noise; the settings of
``estimators.py --variants`` and a few more), random attention, a random dense causal matrix
(a wide spectrum, where the cross-talk is largest), the same with decaying columns, and a
decaying long convolution, and near-uniform attention as at initialisation (head dimension 64
and 128; queries and keys of standard deviation 0.3, 0.5 and 0.9). Float64 operators (``--dtype
float32``: the same operators rounded to float32, as a watch measures them; the reference stays the
float64 operator's SVD), ``rtol = 0.02``. At ``--lengths 2048`` every block's smaller side is at least
640, so entries the first quadrature rejects get its second try (deflation rank 128 or more,
``esswatch.engine.adaptive.SLQ_RETRY_RANK``); a last line counts the entries it answered.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

import esswatch as ew
from esswatch.engine import adaptive
from esswatch.operators import Convolution, Dense, SoftmaxAttention

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from estimators import clustered_attention  # noqa: E402
from reference import entropy_ess_ref  # noqa: E402  (the tests' NumPy reference)

F64 = torch.float64


def flat_tail(L, seed, noise=0.05, d=16, clusters=4, sharp=4.0):
    """Low-ESS attention (``estimators.py``'s construction) in float64."""
    return clustered_attention(L, d=d, clusters=clusters, sharp=sharp, noise=noise, seed=seed, dtype=F64)


def families(L, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    decay = torch.exp(-torch.arange(L, dtype=F64) / 40)
    return {
        "flat tail, noise 0.05": flat_tail(L, seed),
        "flat tail, noise 0.07, d 32": flat_tail(L, seed + 20, noise=0.07, d=32),
        "flat tail, noise 0.03, d 48": flat_tail(L, seed + 30, noise=0.03, d=48),
        "flat tail, noise 0.1": flat_tail(L, seed + 10, noise=0.1),
        "flat tail, 8 clusters, sharpness 2": flat_tail(L, seed + 40, clusters=8, sharp=2.0),
        "random attention, d 8": SoftmaxAttention(2 * rn(4, L, 8), rn(4, L, 8)),
        "random dense causal": Dense(torch.tril(rn(4, L, L))),
        "random dense causal, decaying columns": Dense(torch.tril(rn(4, L, L)) * decay),
        "long convolution": Convolution(rn(4, L) * torch.exp(-torch.arange(L, dtype=F64) / (L / 8))),
        # near-uniform attention as at initialisation (small q, k): a value near s_1, a band of about
        # d values, then a long tail; from L = 2048 on the quadrature's second try (deflation rank 128 or more)
        "attention at initialisation, d 64": SoftmaxAttention(0.3 * rn(4, L, 64), 0.3 * rn(4, L, 64)),
        "attention at initialisation, d 64, q, k x 0.5": SoftmaxAttention(0.5 * rn(4, L, 64), 0.5 * rn(4, L, 64)),
        "attention at initialisation, d 128": SoftmaxAttention(0.3 * rn(4, L, 128), 0.3 * rn(4, L, 128)),
        # larger q, k (ESS up to about 480 at L = 2048): second tries of rank 256 from p = 768
        "attention at initialisation, d 64, q, k x 0.9": SoftmaxAttention(0.9 * rn(4, L, 64), 0.9 * rn(4, L, 64)),
    }


class SecondTries:
    """Wraps the quadrature's tries (``adaptive._slq_try``): each entry the second try (deflation
    rank ``SLQ_RETRY_RANK`` or more) accepts is checked against a float64 SVD of its block."""

    def __init__(self, rtol):
        self.rtol, self.orig = rtol, adaptive._slq_try
        self.answered = self.miss = 0
        self.max = 0.0
        self.ranks = {}

    def __call__(self, h, fro2, stop, generator, k, basis=None):
        out = self.orig(h, fro2, stop, generator, k, basis)
        if k >= adaptive.SLQ_RETRY_RANK:
            est, ok = out[0], out[3]
            self.ranks[k] = self.ranks.get(k, 0) + int(ok.sum())
            s = torch.linalg.svdvals(h[ok].to(F64))
            p = s / s.sum(-1, keepdim=True)
            ref = torch.exp(-torch.xlogy(p, p).sum(-1))
            err = ((est[ok] - ref).abs() / ref).tolist()
            self.answered += len(err)
            self.miss += sum(e > self.rtol for e in err)
            self.max = max([self.max, *err])
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=8, help="operators per family and length")
    ap.add_argument("--lengths", default="384,768")
    ap.add_argument("--rtol", type=float, default=0.02)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="the estimator's input")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    adaptive.SLQ_MIN_SIZE = 96
    tries = adaptive._slq_try = SecondTries(args.rtol)
    t0 = time.perf_counter()
    rows = {}
    for L in [int(x) for x in args.lengths.split(",")]:
        for seed in range(args.seeds):
            for name, op in families(L, seed).items():
                idx = [L // 3, L // 2, 2 * L // 3]
                ref = entropy_ess_ref(op.dense().numpy(), idx)
                gen = torch.Generator().manual_seed(seed)
                e, lo, hi = ew.entropy_ess(
                    op.to(dtype=dtype), idx, estimator="randomized", rtol=args.rtol, return_bounds=True, generator=gen
                )
                e, lo, hi = e.double(), lo.double(), hi.double()
                e, lo, hi = e.numpy(), lo.numpy(), hi.numpy()
                by_slq = hi / lo > (1 + args.rtol) ** 2 + 1e-9
                err = np.abs(e - ref) / ref
                r = rows.setdefault(name, {"n": 0, "slq": 0, "miss": 0, "max": 0.0})
                r["n"] += ref.size
                r["slq"] += int(by_slq.sum())
                r["miss"] += int((err > args.rtol).sum())
                r["max"] = max(r["max"], float(err[by_slq].max()) if by_slq.any() else 0.0)
    print(
        f"# quadrature calibration, {args.dtype} operators, rtol {args.rtol}, lengths {args.lengths}, "
        f"{args.seeds} seeds, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    print("| family | entries | by the quadrature | outside rtol | largest error of a quadrature answer |")
    print("|---|---|---|---|---|")
    tot = {"n": 0, "slq": 0, "miss": 0}
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['slq']} | {r['miss']} | {r['max']:.2%} |")
        for k in tot:
            tot[k] += r[k]
    rate = tot["miss"] / max(tot["slq"], 1)
    print(
        f"| all | {tot['n']} | {tot['slq']} | {tot['miss']} ({rate:.1%} of the quadrature's answers; "
        f"stated: at most about 5%) | |"
    )
    print(
        f"\nThe second try (blocks whose smaller side is at least {adaptive.SLQ_RETRY_MIN_SIZE}) answered "
        f"{tries.answered} entries (by deflation rank: {dict(sorted(tries.ranks.items()))}), {tries.miss} outside "
        f"rtol, largest error {tries.max:.2%}."
    )
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
