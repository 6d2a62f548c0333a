"""Operators nobody tuned the randomized estimator for: its answers against `exact`, per family.

    python examples/benchmarks/edge_cases.py --threads 1            # L = 1024, 3 seeds (about 3 min)

Sixteen families of causal operators the estimator's design did not start from: rank-1 blocks
(uniform attention, an all-ones kernel, a shift), one-hot and mixed attention, sliding windows,
random masks, exactly low-rank matrices with and without a 1e-6 floor, duplicate heads, gated
recurrences with no, strong and mixed decay, and long convolutions. Per seed, five random indices
and ``L / 2``; each operator in float32 and float64, ``estimator="randomized"`` and ``"auto"``
(``rtol = 0.02``, ``return_bounds=True``), against ``estimator="exact"`` on the same input cast to
float64 (a float32 SVD of a rank-deficient block reports round-off values near ``eps s_1``, which
move ESS 1 to about 1.001). It prints, per family, the entries outside ``rtol``, the largest
relative error, the entries whose bounds miss that value by more than round-off (``1e-4``
relative in float32, ``1e-8`` in float64), and any exception. The edge cases it found are tests
now (``tests/test_estimator_edge_cases.py``; docs/estimators.md, section 5).

``--metric tolerance`` runs ``tolerance_ess`` instead (relative ``tol`` 1e-3 and 1e-2, absolute
1e-4), counting entries that differ from ``exact`` on the same input and on its float64 cast.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import esswatch as ew
from esswatch.operators import Convolution, Dense, GatedRecurrence, SoftmaxAttention

F64 = torch.float64


def families(L: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    H = 4
    clustered = lambda: torch.repeat_interleave(rn(H, 4, 16), L // 4, 1)[:, torch.randperm(L, generator=g)]  # noqa: E731
    q_mixed = rn(H, L, 16)
    q_mixed[:2] *= 20
    return {
        "uniform attention (equal keys)": SoftmaxAttention(rn(H, L, 16), rn(H, 1, 16).expand(H, L, 16).contiguous()),
        "one-hot attention (scale 50)": SoftmaxAttention(rn(H, L, 16), rn(H, L, 16), scale=50.0),
        "2 one-hot heads, 2 smooth": SoftmaxAttention(q_mixed, rn(H, L, 16)),
        "sliding window 600": SoftmaxAttention(rn(H, L, 16), rn(H, L, 16), window=600),
        "sliding window 600, clustered": SoftmaxAttention(
            4 * clustered() + 0.05 * rn(H, L, 16), clustered() + 0.05 * rn(H, L, 16), window=600
        ),
        "random mask, half the pairs": SoftmaxAttention(
            rn(H, L, 16), rn(H, L, 16), mask=torch.rand(H, L, L, generator=g) > 0.5
        ),
        "shift (one subdiagonal)": Dense(torch.diag(torch.ones(L - 1, dtype=F64), -1).expand(H, L, L).clone()),
        "all-ones kernel": Convolution(torch.ones(H, L, dtype=F64)),
        "rank 3": Dense(torch.tril(rn(H, L, 3) @ rn(H, 3, L))),
        "rank 3 + 1e-6 noise": Dense(torch.tril(rn(H, L, 3) @ rn(H, 3, L) + 1e-6 * rn(H, L, L))),
        "duplicate heads": SoftmaxAttention((3 * rn(1, L, 16)).expand(H, L, 16), rn(1, L, 16).expand(H, L, 16)),
        "recurrence, no decay": GatedRecurrence(rn(H, L, 16), rn(H, L, 16), torch.zeros(H, L, 16, dtype=F64)),
        "recurrence, strong decay": GatedRecurrence(
            rn(H, L, 16), rn(H, L, 16), -3 * torch.rand(H, L, 16, generator=g, dtype=F64)
        ),
        "recurrence, decays 1e-4 to 10": GatedRecurrence(
            rn(H, L, 16), rn(H, L, 16), -torch.logspace(-4, 1, 16, dtype=F64).expand(H, L, 16)
        ),
        "long convolution, slow decay": Convolution(rn(H, L) * torch.exp(-torch.arange(L, dtype=F64) / (L / 3))),
        "long convolution, power law": Convolution(rn(H, L) / (1 + torch.arange(L, dtype=F64))),
    }


def _tolerance(stats, name, x, idx, dtype):
    """tolerance-ESS of ``randomized`` and ``auto`` against ``exact`` on ``x`` and on ``x`` in float64."""
    s = stats.setdefault(name, [0, 0, 0, set()])
    for relative, tol in ((True, 1e-3), (True, 1e-2), (False, 1e-4)):
        ref = ew.tolerance_ess(x, idx, estimator="exact", tol=tol, relative=relative).numpy()
        ref64 = ew.tolerance_ess(x.to(dtype=F64), idx, estimator="exact", tol=tol, relative=relative).numpy()
        for est in ("randomized", "auto"):
            got = ew.tolerance_ess(x, idx, estimator=est, tol=tol, relative=relative).numpy()
            s[0] += got.size
            s[1] += int((got != ref).sum())
            s[2] += int((got != ref64).sum())
            if (got != ref).any() or (got != ref64).any():
                s[3].add(f"{dtype}, {'relative' if relative else 'absolute'} {tol:g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--metric", choices=("entropy", "tolerance"), default="entropy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L = args.length
    print(f"# edge cases, L = {L}, {args.seeds} seeds, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    stats, failures, t0 = {}, [], time.perf_counter()
    for seed in range(args.seeds):
        idx = sorted(set(np.random.default_rng(seed).integers(1, L, 5).tolist()) | {L // 2})
        for name, op in families(L, seed).items():
            for dtype in (torch.float32, F64):
                x = op.to(dtype=dtype)
                if args.metric == "tolerance":
                    _tolerance(stats, name, x, idx, str(dtype).replace("torch.", ""))
                    continue
                ref = ew.entropy_ess(x.to(dtype=F64), idx, estimator="exact").numpy()
                slack = 1e-4 if dtype == torch.float32 else 1e-8
                for est in ("randomized", "auto"):
                    s = stats.setdefault(name, [0, 0, 0.0, 0])
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            out = ew.entropy_ess(
                                x, idx, estimator=est, return_bounds=True, generator=torch.Generator().manual_seed(seed)
                            )
                    except Exception as e:  # noqa: BLE001 - the point is to list them
                        failures.append(f"{name}, {dtype}, {est}, seed {seed}: {type(e).__name__}: {e}"[:200])
                        continue
                    e, lo, hi = (t.double().numpy() for t in out)
                    err = np.abs(e - ref) / np.maximum(ref, 1e-12)
                    s[0] += err.size
                    s[1] += int((err > 0.02).sum())
                    s[2] = max(s[2], float(err.max()))
                    s[3] += int(((lo > ref * (1 + slack) + 1e-9) | (ref > hi * (1 + slack) + 1e-9)).sum())
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.metric == "tolerance":
        print("\n| family | entries | differ from exact | from exact in float64 | setting of the differences |")
        print("|---|---|---|---|---|")
        for name, (n, d, d64, where) in stats.items():
            print(f"| {name} | {n} | {d} | {d64} | {', '.join(sorted(where)) or '-'} |")
    else:
        print("\n| family | entries | outside rtol | largest error | bounds missing exact |")
        print("|---|---|---|---|---|")
        for name, (n, out, worst, miss) in stats.items():
            print(f"| {name} | {n} | {out} | {worst:.1e} | {miss} |")
    print(f"\nexceptions: {len(failures)}")
    for f in failures:
        print("-", f)


if __name__ == "__main__":
    main()
