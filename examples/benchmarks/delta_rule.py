"""Materializing the gated delta rule's ``T`` (``esswatch.operators.DeltaRule``): chunked against step by step.

    python examples/benchmarks/delta_rule.py --threads 1 --repeats 3

``DeltaRule`` builds ``T`` with ``delta_rule_dense``: steps one by one inside chunks of 64 positions, and
the columns of earlier chunks carried across each chunk by one ``N x N`` transition (matrix products).
The contender is the plain form, one batched step per position on all columns so far (in place, the
fastest single-step variant found). Both build the same ``T`` (the largest difference is printed). Sizes
are those of a Qwen3-Next-like layer, ``head_k_dim`` N = 128, 2 batch rows; the two alternate inside one
run, and the script prints the median [min-max] of ``--repeats`` timings after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esswatch.operators.delta import delta_rule_dense


def step_by_step(q, k, beta, log_decay):
    """One batched step per position on every column so far (in place; no gradients)."""
    L, N = q.shape[-2:]
    x = torch.zeros(*q.shape[:-2], N, L, dtype=q.dtype)
    t_out = torch.zeros(*q.shape[:-2], L, L, dtype=q.dtype)
    bk, decay = beta[..., None] * k, torch.exp(log_decay)
    for t in range(L):
        if t:
            p = x[..., :t]
            p.sub_(bk[..., t, :, None] * (k[..., t, None, :] @ p)).mul_(decay[..., t, None, None])
        x[..., t] = bk[..., t, :]
        t_out[..., t, : t + 1] = (q[..., t, None, :] @ x[..., : t + 1])[..., 0, :]
    return t_out


def inputs(L, heads, N=128, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, L, N, generator=g) / N**0.5
    k = torch.nn.functional.normalize(torch.randn(rows, heads, L, N, generator=g), dim=-1)
    beta = torch.rand(rows, heads, L, generator=g)
    log_decay = -0.05 * torch.rand(rows, heads, L, generator=g)
    return q, k, beta, log_decay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="512x16,1024x16,2048x8", help="L x heads, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, N = 128, 2 rows")
    print("| L | heads | chunked (64), s | step by step, s | step by step / chunked | largest difference |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        L, heads = (int(x) for x in size.split("x"))
        x = inputs(L, heads)
        with torch.no_grad():
            diff = float((delta_rule_dense(*x) - step_by_step(*x)).abs().max())  # also the warm-up
            times = {"chunked": [], "step": []}
            for _ in range(args.repeats):
                for name, fn in (("chunked", delta_rule_dense), ("step", step_by_step)):
                    t0 = time.perf_counter()
                    fn(*x)
                    times[name].append(time.perf_counter() - t0)
        c, s = (statistics.median(times[n]) for n in ("chunked", "step"))
        ratios = sorted(b / a for a, b in zip(times["chunked"], times["step"]))
        print(
            f"| {L} | {heads} | {c:.2f} [{min(times['chunked']):.2f}-{max(times['chunked']):.2f}] "
            f"| {s:.2f} [{min(times['step']):.2f}-{max(times['step']):.2f}] "
            f"| {statistics.median(ratios):.1f}x [{ratios[0]:.1f}-{ratios[-1]:.1f}] | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
