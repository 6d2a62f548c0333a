"""The memory guard's estimate against what a call really holds, per operator, route and gradients.

Every ``entropy_ess`` / ``tolerance_ess`` call estimates its big buffers before it allocates anything
(``esswatch.ess.guard.call_bytes``; README, "Memory limit") and refuses a call over the limit. An estimate
below the real peak lets a call through that can exhaust memory, so this script measures, for each case,
the growth of the peak resident set of a fresh process running one call (after a small warm-up call; glibc
returns freed blocks of 64 KiB and more to the system, so the peak follows the live buffers) and prints
it beside the estimate. With gradients the call includes its backward pass (what the regularizer runs).
The previous release's model (``T``, the scores, the largest block, the sketch; no autograd graph, no
Gramian segments) is printed too, re-implemented here.

    python examples/benchmarks/memory_guard.py --threads 1
    python examples/benchmarks/memory_guard.py --threads 1 --indices all --kinds window,gla,mamba2,delta

The estimate is meant as an upper range: ``estimate / measured`` at or above 1 is what the guard needs.
The estimate models live buffers, so by default each case runs with glibc told to return freed blocks
(``MALLOC_MMAP_THRESHOLD_=65536``). ``--allocator default`` runs them with glibc's defaults instead, as most
processes do: there freed memory is kept for reuse, and a long call's resident growth can exceed its live
buffers (measured: up to 2.7x for a sliding window at all indices of L = 4096).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from delta_rule import peak_rss_mb as peak_mb
from delta_rule import watch_indices as indices

CASES = [  # (operator, estimator, grad)
    ("attention", "exact", False),
    ("attention", "auto", False),
    ("attention", "exact", True),
    ("window", "auto", False),
    ("window", "exact", True),
    ("delta", "exact", False),
    ("delta", "exact", True),
    ("delta", "auto", False),
    ("delta", "auto", True),
    ("gla", "exact", False),
    ("gla", "exact", True),
    ("gla", "auto", False),
    ("gla", "auto", True),
    ("mamba2", "auto", False),
    ("mamba2", "auto", True),
    ("convolution", "exact", False),
    ("convolution", "exact", True),
    ("short_conv", "exact", False),
    ("short_conv", "exact", True),
    ("dense", "exact", False),
    ("dense", "exact", True),
]


def make(kind, L, batch, grad):
    """One operator of ``batch`` matrices (float32) whose operands require gradients if ``grad``."""
    from esswatch.operators import Convolution, DeltaRule, Dense, GatedRecurrence, SoftmaxAttention

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "attention":
        parts, build = [rnd(batch, L, 64), rnd(batch, L, 64)], SoftmaxAttention
    elif kind == "window":  # sliding window of 128: the blocks come from the rows' scores, T is never built
        parts, build = [rnd(batch, L, 64), rnd(batch, L, 64)], lambda q, k: SoftmaxAttention(q, k, window=128)
    elif kind == "delta":  # N = 128, long memory (every Gramian factors)
        k = torch.nn.functional.normalize(rnd(batch, L, 128), dim=-1)
        beta, log_decay = torch.rand(batch, L, generator=g), -0.05 * torch.rand(batch, L, generator=g)
        parts, build = [rnd(batch, L, 128) / 11, k, beta, log_decay], DeltaRule
    elif kind == "gla":  # N = 16, a decay per channel
        log_decay = -0.05 * torch.rand(batch, L, 16, generator=g)
        parts, build = [rnd(batch, L, 16), rnd(batch, L, 16), log_decay], GatedRecurrence
    elif kind == "mamba2":  # N = 64, one decay per head
        log_decay = -0.05 * torch.rand(batch, L, 1, generator=g)
        parts, build = [rnd(batch, L, 64), rnd(batch, L, 64), log_decay], GatedRecurrence
    elif kind == "convolution":
        parts, build = [rnd(batch, L) / L**0.5], Convolution
    elif kind == "short_conv":  # a kernel of 128 taps: each block is at most 127 x 127, T is never built
        parts, build = [torch.nn.functional.pad(rnd(batch, 128), (0, L - 128)) / 11], Convolution
    else:
        parts, build = [torch.tril(rnd(batch, L, L))], Dense
    parts = [p.requires_grad_(grad) for p in parts]
    return build(*parts)


def call_indices(L, spec):
    """The watch's 8 indices (``"8"``), ``n`` spread over the sequence, or every index (``"all"``)."""
    if spec == "all":
        return list(range(1, L))
    n = int(spec)
    return indices(L) if n == 8 else sorted({round(j * L / (n + 1)) for j in range(1, n + 1)})


def one(kind, estimator, grad, L, batch, spec) -> None:
    """In a fresh process: print the peak resident growth of one call (and its backward pass), in MB."""
    import esswatch

    def call(op, idx):
        with torch.set_grad_enabled(grad):
            e = esswatch.entropy_ess(op, idx, estimator=estimator)
            if grad:
                e.sum().backward()

    call(make(kind, 64, 1, grad), [20, 40])
    op = make(kind, L, batch, grad)  # the inputs are not counted
    before = peak_mb()
    try:
        call(op, call_indices(L, spec))
    except esswatch.ESSMemoryError:  # refused before allocating: over the limit (half the memory available)
        return print("nan")
    print(peak_mb() - before)


def previous_model(op, idx, estimator) -> int:
    """The previous release's estimate: ``T`` per matrix (twice for attention), the largest block twice, the
    sketch's float64 copy; on the Gramian route, the operator's buffers without gradients."""
    from esswatch.operators import SoftmaxAttention

    b, L, n = op.numel_batch(), op.seq_len, len(idx)
    if op.has_gramians and estimator == "auto" and op.prefers_gram:
        return op.gram_bytes(n)
    block = max((L - i) * i for i in idx)  # the whole H_i, also with a window
    sketch = b * block * 8 if estimator in ("auto", "randomized") else 0
    return b * L * L * 4 * (2 if isinstance(op, SoftmaxAttention) else 1) + 2 * b * block * 4 + sketch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="matrices per operator (heads x rows)")
    ap.add_argument("--kinds", default="", help="only these operators, comma-separated (default: all)")
    ap.add_argument("--estimators", default="", help="only these estimators, comma-separated (default: all)")
    ap.add_argument(
        "--indices", default="8", help="indices per call: a count spread over the sequence (8: the watch's), or 'all'"
    )
    ap.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="glibc told to return freed blocks (tuned: the live buffers), or its defaults (what most processes see)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        kind, est, grad = args.one.split(",")
        return one(kind, est, grad == "1", args.length, args.batch, args.indices)
    from esswatch.ess.guard import call_bytes

    L, b = args.length, args.batch
    idx = call_indices(L, args.indices)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, L = {L}, {b} matrices, "
        f"{len(idx)} indices, glibc {args.allocator}"
    )
    print(f"(T alone: {b * L * L * 4 / 1e6:.0f} MB)")
    print(
        "| operator | estimator | gradients | measured, MB | estimate, MB | estimate / measured | previous model, MB |"
    )
    print("|---|---|---|---|---|---|---|")
    env = dict(os.environ)
    if args.allocator == "tuned":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    kinds = [k for k in args.kinds.split(",") if k]
    for kind, est, grad in CASES:
        if (kinds and kind not in kinds) or (args.estimators and est not in args.estimators.split(",")):
            continue
        cmd = [sys.executable, __file__, "--one", f"{kind},{est},{int(grad)}", "--length", str(L), "--batch", str(b)]
        cmd += ["--indices", args.indices]
        measured = float(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
        if measured != measured:  # NaN: the guard refused the call
            print(f"| {kind} | {est} | {'yes' if grad else 'no'} | refused (over the limit) | | | |", flush=True)
            continue
        op = make(kind, L, b, grad)
        with torch.set_grad_enabled(grad):
            estimate = call_bytes(op, torch.tensor(idx), est) / 1e6
        prev = previous_model(op, idx, est) / 1e6
        print(
            f"| {kind} | {est} | {'yes' if grad else 'no'} | {measured:.0f} | {estimate:.0f} "
            f"| {estimate / measured:.1f} | {prev:.0f} ({prev / measured:.1f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
