"""Building a gated recurrence's Hankel blocks: the previous release's sum over the state, entry by entry,
against this release's products of two width-``N`` factors (``GatedRecurrence.hankel``), side by side.

    python examples/benchmarks/recurrence_blocks.py --threads 1
    python examples/benchmarks/recurrence_blocks.py --threads 1 --grad   # with a backward pass through the blocks

The operator is target (a)'s of ``estimators.py`` (GLA-like gates near 1, a decay per channel, 4 heads,
N = 16, L = 2048) at the watch's 8 indices. "entry by entry" is ``GatedRecurrence._direct`` without the float64
cumulative sum, which is the previous release's ``_block``: ``sum_n q k exp(Lam_r - Lam_c)`` over
``(rows, cols, N)`` chunks. The two contenders alternate in each repeat. Figures: median [min-max] of
``--repeats``, and the median of the per-repeat ratios. Both are compared with the blocks in float64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esswatch.operators import GatedRecurrence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--grad", action="store_true", help="also the backward pass of the blocks' sum of squares")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L, H, N = args.length, args.heads, 16
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(H, L, N, generator=g) for _ in range(2))
    log_decay = torch.nn.functional.logsigmoid(torch.randn(H, L, N, generator=g) + 4.0)
    idx = [round(L * (j + 1) / 9) for j in range(8)]

    def build(kind):
        parts = [x.clone().requires_grad_(args.grad) for x in (q, k, log_decay)]
        op = GatedRecurrence(*parts)
        with torch.set_grad_enabled(args.grad):
            if kind == "factors":
                blocks = [op.hankel(i) for i in idx]
            else:
                qe, ke, ld = op.expanded()
                blocks = [op._direct(qe, ke, ld, slice(i, None), slice(0, i), torch.float32) for i in idx]
            if args.grad:
                sum(b.square().sum() for b in blocks).backward()
        return [b.detach() for b in blocks]

    ref = [GatedRecurrence(q.double(), k.double(), log_decay.double()).hankel(i) for i in idx]
    times = {"entries": [], "factors": []}
    errs = {}
    for kind in times:  # warm-up
        build(kind)
    for _ in range(args.repeats):
        for kind in times:
            t = time.perf_counter()
            out = build(kind)
            times[kind].append(time.perf_counter() - t)
            errs[kind] = max(float((b.double() - r).abs().max() / r.abs().max()) for b, r in zip(out, ref))
    med = lambda ts: f"{statistics.median(ts):.3f} [{min(ts):.3f}-{max(ts):.3f}]"  # noqa: E731
    ratios = [a / b for a, b in zip(times["entries"], times["factors"])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), L = {L}, {H} heads, N = {N}, 8 indices")
    print("| backward | entry by entry, s | factor products, s | ratio | largest error vs float64 (entries, factors) |")
    print("|---|---|---|---|---|")
    print(
        f"| {'yes' if args.grad else 'no'} | {med(times['entries'])} | {med(times['factors'])} | "
        f"{statistics.median(ratios):.1f}x [{min(ratios):.1f}-{max(ratios):.1f}] | "
        f"{errs['entries']:.1e}, {errs['factors']:.1e} |"
    )


if __name__ == "__main__":
    main()
