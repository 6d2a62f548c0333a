"""The gated delta rule (``esswatch.operators.DeltaRule``): entropy-ESS from its Gramians against the dense
routes, and materializing its ``T``.

    python examples/benchmarks/delta_rule.py --threads 1 --repeats 3 --sections ess
    python examples/benchmarks/delta_rule.py --threads 1 --repeats 3 --sections materialize

``--sections ess``: ``entropy_ess`` at the watch's 8 indices (``round(j L / 9)``) by ``"gram"`` (the default
for ``DeltaRule``: the Gramians segment by segment, ``esswatch.engine.delta_gram``, never an ``L x L``
buffer; where the gates forget within a few steps, windows near each index instead, ``esswatch.ess.near``,
which ``near_window.py`` compares with the Gramians) against the two dense routes, which materialize ``T``
first: ``"randomized"`` (what ``"auto"`` ran on this operator before it had Gramians) and ``"exact"`` (the
reference). The contenders alternate
inside one run; it prints the median [min-max] of ``--repeats`` timings after a warm-up, the ratios per
repeat, the largest relative difference from ``exact`` (and, ``--reference64``, of ``gram`` and ``exact``
from an untimed ``exact`` on the same inputs in float64), and each contender's peak memory above the
inputs (``--memory``: the growth of the peak resident set of a fresh process running one call after a
small warm-up call, with glibc returning freed blocks of 64 KiB and more to the system).

``--sections materialize``: ``DeltaRule.dense()`` builds ``T`` with ``delta_rule_dense``: chunks of 64 positions
in closed form (``esswatch.engine.delta_gram``: per chunk a few matrix products and two triangular solves, the
columns of earlier chunks carried across it by its ``N x N`` transition). The contenders: ``stepped``, the
previous release's form (the same chunks, but stepped one position at a time inside each, the transition
included), and ``step``, one batched step per position on all columns so far (in place; without gradients
only). ``--grad`` times the forward and backward pass of ``(T * T).sum()`` (what the regularizer pays where it
builds ``T``); ``--memory`` adds each contender's peak memory above the inputs (a fresh process, as above).
The largest difference from ``stepped`` is printed.

Sizes are those of a Qwen3-Next-like layer, ``head_k_dim`` N = 128, 2 batch rows (the watch's default).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import esswatch
from esswatch.operators import DeltaRule
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


def inputs(L, heads, N=128, rows=2, seed=0, gates="slow"):
    """``gates="slow"``: ``g ~ -0.05 U(0, 1)`` (long memory: every Gramian factors); ``"init"``: Qwen3-Next's
    gate at initialisation, ``g = -A softplus(a + 1)`` with ``A ~ U(0, 16)`` per head and ``a ~ N(0, 0.5^2)``
    (most heads forget within a few steps: both Gramians singular, the square-root route)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, L, N, generator=g) / N**0.5
    k = torch.nn.functional.normalize(torch.randn(rows, heads, L, N, generator=g), dim=-1)
    beta = torch.rand(rows, heads, L, generator=g)
    log_decay = -0.05 * torch.rand(rows, heads, L, generator=g)
    if gates == "init":
        A = 16 * torch.rand(heads, 1, generator=g)
        log_decay = -A * torch.nn.functional.softplus(0.5 * torch.randn(rows, heads, L, generator=g) + 1)
    return q, k, beta, log_decay


def stepped_chunks(q, k, beta, log_decay, chunk=64):
    """The previous release's ``delta_rule_dense``: inside each chunk the columns, the rows and the chunk's
    transition are stepped one position at a time (``N^2`` per position for the transition, and as much kept for
    the backward pass); the columns of earlier chunks are carried by the transition."""

    def step(x, k, bk, decay):  # B x for the columns of x
        return decay[..., None, None] * (x - bk[..., :, None] * (k[..., None, :] @ x))

    L, N = q.shape[-2:]
    batch, bk, decay = q.shape[:-2], beta[..., None] * k, torch.exp(log_decay)
    carried, rows = q.new_zeros(*batch, N, 0), []
    eye = torch.eye(N, dtype=q.dtype).expand(*batch, N, N)
    for s0 in range(0, L, chunk):
        s1 = min(s0 + chunk, L)
        kc, bkc, dc = k[..., s0:s1, :], bk[..., s0:s1, :], decay[..., s0:s1]
        r = q[..., s0:s1, :].transpose(-1, -2)
        for j in range(s1 - s0 - 1, -1, -1):
            r = torch.cat([r[..., :j], step(r[..., j:], kc[..., j, :], bkc[..., j, :], dc[..., j])], dim=-1)
        past = r.transpose(-1, -2) @ carried
        own, m, inner = q.new_zeros(*batch, N, 0), eye, []
        for j in range(s1 - s0):
            own = torch.cat([step(own, kc[..., j, :], bkc[..., j, :], dc[..., j]), bkc[..., j, :, None]], -1)
            m = step(m, kc[..., j, :], bkc[..., j, :], dc[..., j])
            inner.append(torch.nn.functional.pad(q[..., s0 + j, None, :] @ own, (0, s1 - s0 - j - 1)))
        rows.append(torch.nn.functional.pad(torch.cat([past, torch.cat(inner, dim=-2)], dim=-1), (0, L - s1)))
        carried = torch.cat([m @ carried, own], dim=-1)
    return torch.cat(rows, dim=-2)


BUILDERS = {"closed": delta_rule_dense, "stepped": stepped_chunks, "step": step_by_step}


def build(name, x, grad):
    """Seconds to build ``T`` (and, ``grad``, to run the backward pass of ``(T * T).sum()``), and ``T``."""
    x = [t.detach().requires_grad_(grad) for t in x]
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad):
        T = BUILDERS[name](*x)
        if grad:
            (T * T).sum().backward()
    return time.perf_counter() - t0, T.detach()


def one_build(L, heads, name, grad) -> None:
    """Run in a fresh process (``--memory``): the peak resident set growth of one build, in MB."""
    build(name, inputs(64, 1), grad)
    x = inputs(L, heads)
    before = peak_rss_mb()
    build(name, x, grad)
    print(peak_rss_mb() - before)


def materialize_section(args) -> None:
    names = ["closed", "stepped"] + ([] if args.grad else ["step"])
    what = "build and backward pass" if args.grad else "build"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, N = 128, 2 rows, {what}")
    mem_head = " | peak memory above the inputs, MB (" + ", ".join(names) + ")" if args.memory else ""
    cols = " | ".join(f"{n}, s" for n in names) + " | " + " | ".join(f"{n} / closed" for n in names[1:])
    print(f"| L | heads | {cols} | largest difference from stepped{mem_head} |")
    print("|---" * (3 + 2 * len(names) - 1 + bool(args.memory)) + "|")
    for size in args.sizes.split(","):
        L, heads = (int(x) for x in size.split("x"))
        x = inputs(L, heads)
        ref = build("stepped", x, False)[1]
        diff = max(float((build(n, x, False)[1] - ref).abs().max()) for n in names)  # also the warm-up
        times = {n: [] for n in names}
        for _ in range(args.repeats):
            for n in names:
                times[n].append(build(n, x, args.grad)[0])
        cells = [f"{statistics.median(times[n]):.2f} [{min(times[n]):.2f}-{max(times[n]):.2f}]" for n in names]
        for n in names[1:]:
            r = sorted(b / a for a, b in zip(times["closed"], times[n]))
            cells.append(f"{statistics.median(r):.1f}x [{r[0]:.1f}-{r[-1]:.1f}]")
        cells.append(f"{diff:.1e}")
        if args.memory:
            mb = [fresh_mb("--one-build", f"{L},{heads},{n},{int(args.grad)}") for n in names]
            cells.append(", ".join(f"{m:.0f}" for m in mb))
        print(f"| {L} | {heads} | " + " | ".join(cells) + " |", flush=True)


def watch_indices(L):
    return [round(j * L / 9) for j in range(1, 9)]


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would start at the parent's peak at the fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fresh_mb(flag: str, spec: str) -> float:
    """Run this script with ``flag spec`` in a fresh process (one thread) and return the MB it prints. glibc:
    blocks from 64 KiB are mapped and returned when freed, so the peak resident set follows the live buffers
    rather than the heap's high-water mark."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, flag, spec, "--threads", "1"]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)


def one_call(L, heads, rows, estimator, gates) -> None:
    """Run in a fresh process (``--memory``): print the peak resident set growth of one call, in MB."""
    x = inputs(L, heads, rows=rows, gates=gates)
    op = DeltaRule(*x)
    with torch.no_grad():  # the libraries' one-time set-up (LAPACK workspaces, thread pools) is not counted
        esswatch.entropy_ess(DeltaRule(*inputs(512, 1, rows=1)), watch_indices(512), estimator=estimator)
        before = peak_rss_mb()
        esswatch.entropy_ess(op, watch_indices(L), estimator=estimator)
    print(peak_rss_mb() - before)


def ess_section(args) -> None:
    contenders = args.contenders.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32 input, N = 128, {args.rows} rows")
    head = " | ".join(f"{c}, s" for c in contenders)
    ratios_head = " | ".join(f"{c} / gram" for c in contenders if c != "gram")
    mem_head = " | peak memory above the inputs, MB (" + ", ".join(contenders) + ")" if args.memory else ""
    ref_head = " | largest rel. difference from float64 exact (gram, exact)" if args.reference64 else ""
    print(f"| L | heads | gates | {head} | {ratios_head} | largest rel. difference from exact{ref_head}{mem_head} |")
    print("|---" * (3 + len(contenders) + len(contenders) - 1 + 1 + bool(args.reference64) + bool(args.memory)) + "|")
    for size, gates in [(s, g) for s in args.ess_sizes.split(",") for g in args.gates.split(",")]:
        L, heads = (int(x) for x in size.split("x"))
        op = DeltaRule(*inputs(L, heads, rows=args.rows, gates=gates))
        idx = watch_indices(L)
        times = {c: [] for c in contenders}
        with torch.no_grad():
            vals = {c: esswatch.entropy_ess(op, idx, estimator=c) for c in contenders}  # also the warm-up
            for _ in range(args.repeats):
                for c in contenders:
                    t0 = time.perf_counter()
                    esswatch.entropy_ess(op, idx, estimator=c)
                    times[c].append(time.perf_counter() - t0)
        cells = [f"{statistics.median(times[c]):.2f} [{min(times[c]):.2f}-{max(times[c]):.2f}]" for c in contenders]
        for c in contenders:
            if c == "gram":
                continue
            r = sorted(b / a for a, b in zip(times["gram"], times[c]))
            cells.append(f"{statistics.median(r):.1f}x [{r[0]:.1f}-{r[-1]:.1f}]")
        ref = vals.get("exact")
        diff = "-" if ref is None else f"{float(((vals['gram'] - ref).abs() / ref).max()):.1e}"
        cells.append(diff)
        if args.reference64:  # untimed: the reference, from float64 inputs
            with torch.no_grad():
                ref64 = esswatch.entropy_ess(op.to(dtype=torch.float64), idx, estimator="exact")
            worst = [float(((vals[c].double() - ref64).abs() / ref64).max()) for c in ("gram", "exact") if c in vals]
            cells.append(", ".join(f"{w:.1e}" for w in worst))
        if args.memory:
            mb = [fresh_mb("--one-call", f"{L},{heads},{args.rows},{c},{gates}") for c in contenders]
            cells.append(", ".join(f"{m:.0f}" for m in mb))
        print(f"| {L} | {heads} | {gates} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="ess", help="ess, materialize or both (comma-separated)")
    ap.add_argument("--sizes", default="512x16,1024x16,2048x8", help="materialize: L x heads, comma-separated")
    ap.add_argument("--ess-sizes", default="1024x16,2048x8,4096x2", help="ess: L x heads, comma-separated")
    ap.add_argument("--gates", default="slow,init", help="ess: slow, init or both (see inputs())")
    ap.add_argument("--rows", type=int, default=2, help="ess: batch rows (the watch's default is 2)")
    ap.add_argument("--contenders", default="gram,randomized,exact", help="ess: estimators, gram first")
    ap.add_argument("--memory", action="store_true", help="also the peak memory of each contender")
    ap.add_argument("--grad", action="store_true", help="materialize: with the backward pass")
    ap.add_argument("--reference64", action="store_true", help="ess: also the errors against float64 exact")
    ap.add_argument("--one-call", help=argparse.SUPPRESS)
    ap.add_argument("--one-build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_call:
        L, heads, rows, est, gates = args.one_call.split(",")
        return one_call(int(L), int(heads), int(rows), est, gates)
    if args.one_build:
        L, heads, name, grad = args.one_build.split(",")
        return one_build(int(L), int(heads), name, grad == "1")
    if "ess" in args.sections.split(","):
        ess_section(args)
    if "materialize" in args.sections.split(","):
        materialize_section(args)


if __name__ == "__main__":
    main()
