"""Windows near the index (``esswatch.ess.near``) for the gated delta rule, against the routes they replace.

    python examples/benchmarks/near_window.py --threads 1 --repeats 3
    python examples/benchmarks/near_window.py --threads 1 --repeats 3 --sections grad --memory

Where the gates forget within a few steps (Qwen3-Next's gate at initialisation), ``H_i`` is taken from a
window of a few rows and columns around ``i`` (two segments' closed forms, then an SVD of the window), with a
bound of ``1e-12 ||H_i||_F`` on what it leaves out. The contenders alternate inside one run (median [min-max]
of ``--repeats`` after a warm-up, and the per-repeat ratios):

* ``windows``: the current ``entropy_ess`` (``auto``, which takes the windows where they cost less);
* ``gramians``: the same call with the windows switched off (``NEAR_COST = 0`` and no window for the entries
  whose Gramians do not factor): the previous release's route, the Gramian recurrence over the whole
  sequence, and with gradients ``T`` materialized wherever neither Gramian factors;
* ``exact``: ``T``, then ``svdvals`` of every block (the reference).

``--sections nograd``: one ``entropy_ess`` call at the watch's 8 indices (what a sampled step costs).
``--sections grad``: the same call and its backward pass (what the ESS regularizer costs per step), with
``--memory`` the peak resident set of each in a fresh process. ``--sections cross``: constant decays
``--decays``, so that the window widths grow, windows forced on against the Gramians: where the windows stop
paying (``NEAR_COST``). Sizes as in ``delta_rule.py`` (``inputs``): N = 128, 2 batch rows.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from delta_rule import inputs, peak_rss_mb, watch_indices

import esswatch
import esswatch.ess.near as near
import esswatch.ess.plan as plan
from esswatch.engine.envelope import Envelope
from esswatch.operators import DeltaRule


@contextlib.contextmanager
def route(name):
    """``windows`` (as shipped), ``forced`` (windows whatever they cost) or ``gramians`` (no windows)."""
    cost, block = near.NEAR_COST, plan.near_block
    if name == "gramians":
        near.NEAR_COST, plan.near_block = 0, (lambda *a: None)
    elif name == "forced":
        near.NEAR_COST = math.inf
    try:
        yield
    finally:
        near.NEAR_COST, plan.near_block = cost, block


def call(op_inputs, idx, contender, grad):
    xs = [x.clone().requires_grad_(grad) for x in op_inputs]
    est = "exact" if contender == "exact" else "auto"
    with route(contender), torch.set_grad_enabled(grad):
        e = esswatch.entropy_ess(DeltaRule(*xs), idx, estimator=est)
        if grad:
            e.sum().backward()
    return e.detach(), (xs[0].grad if grad else None)


def timed(x, idx, contenders, grad, repeats):
    vals = {c: call(x, idx, c, grad) for c in contenders}  # also the warm-up
    times = {c: [] for c in contenders}
    for _ in range(repeats):
        for c in contenders:
            t0 = time.perf_counter()
            call(x, idx, c, grad)
            times[c].append(time.perf_counter() - t0)
    return vals, times


def cell(ts):
    return f"{statistics.median(ts):.2f} [{min(ts):.2f}-{max(ts):.2f}]"


def ratio(a, b):
    r = sorted(y / x for x, y in zip(a, b))
    return f"{statistics.median(r):.1f}x [{r[0]:.1f}-{r[-1]:.1f}]"


def reference_grad(x, idx, per=4):
    """The gradient of the summed entropy-ESS with respect to ``q`` by ``exact`` in float64, ``per`` matrices
    (batch row, head) at a time: each entry depends on its own matrix only."""
    flat = [t.reshape(-1, *t.shape[2:]) for t in x]
    out = []
    for s in range(0, flat[0].shape[0], per):
        xs = [t[s : s + per].double().requires_grad_(j == 0) for j, t in enumerate(flat)]
        esswatch.entropy_ess(DeltaRule(*xs), idx, estimator="exact").sum().backward()
        out.append(xs[0].grad)
    return torch.cat(out).reshape(x[0].shape)


def one_call(L, heads, gates, contender):
    """In a fresh process (``--memory``): the peak resident set growth of one call with its backward, MB."""
    call(inputs(256, 1, rows=1, gates=gates), watch_indices(256), contender, True)  # libraries' set-up
    x = inputs(L, heads, gates=gates)
    before = peak_rss_mb()
    call(x, watch_indices(L), contender, True)
    print(peak_rss_mb() - before)


def memory(L, heads, gates, contender):
    cmd = [sys.executable, __file__, "--one-call", f"{L},{heads},{gates},{contender}", "--threads", "1"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)


def section(args, grad):
    contenders = ["windows", "gramians", "exact"]
    what = "entropy_ess and its backward" if grad else "entropy_ess (no gradient)"
    print(f"\n{what}: torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32 input, N = 128, 2 rows")
    mem = " | peak MB above the inputs (windows, gramians, exact)" if args.memory and grad else ""
    diff = (
        "largest gradient error (of q) against float64 exact, relative to its largest entry (windows, float32 exact)"
        if grad
        else "largest rel. difference from exact"
    )
    print(
        "| L | heads | gates | windows, s | gramians, s | exact, s | gramians / windows | exact / windows | "
        f"{diff}{mem} |"
    )
    print("|---" * (10 + bool(mem)) + "|")
    for size, gates in [(s, g) for s in args.sizes.split(",") for g in args.gates.split(",")]:
        L, heads = (int(v) for v in size.split("x"))
        x = inputs(L, heads, gates=gates)
        vals, times = timed(x, watch_indices(L), contenders, grad, args.repeats)
        if grad:  # against float64 exact gradients (untimed), a few matrices at a time (memory)
            ref = reference_grad(x, watch_indices(L))
            m = ref.abs().max()
            d = ", ".join(f"{float((vals[c][1].double() - ref).abs().max() / m):.1e}" for c in ("windows", "exact"))
        else:
            d = f"{float(((vals['windows'][0] - vals['exact'][0]).abs() / vals['exact'][0]).max()):.1e}"
        cells = [cell(times[c]) for c in contenders]
        cells += [ratio(times["windows"], times["gramians"]), ratio(times["windows"], times["exact"]), d]
        if mem:
            cells.append(", ".join(f"{memory(L, heads, gates, c):.0f}" for c in contenders))
        print(f"| {L} | {heads} | {gates} | " + " | ".join(cells) + " |", flush=True)


def cross_section(args):
    L, heads = (int(v) for v in args.cross_size.split("x"))
    idx = watch_indices(L)
    print(f"\nconstant decays, L = {L}, {heads} heads, 2 rows, N = 128: windows forced on against the Gramians")
    print(
        "| decay per step | window width (rows + columns) at the middle index | windows, s | gramians, s "
        "| gramians / windows |"
    )
    print("|---|---|---|---|---|")
    for c in (float(v) for v in args.decays.split(",")):
        q, k, beta, ld = inputs(L, heads)
        x = (q, k, beta, torch.full_like(ld, -c))
        env = Envelope(*DeltaRule(*x).envelope())
        i = idx[len(idx) // 2]
        a, b = env.window(i, env.bound_norm(i) + math.log(near.NEAR_RTOL * near.FIRST_GUESS))
        vals, times = timed(x, idx, ["forced", "gramians"], False, args.repeats)
        print(
            f"| {c:g} | {a + b} | {cell(times['forced'])} | {cell(times['gramians'])} | "
            f"{ratio(times['forced'], times['gramians'])} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="nograd,grad,cross", help="nograd, grad, cross (comma-separated)")
    ap.add_argument("--sizes", default="1024x16,2048x8,4096x2", help="L x heads, comma-separated")
    ap.add_argument("--gates", default="init,slow", help="init, slow or both (delta_rule.py's inputs())")
    ap.add_argument("--memory", action="store_true", help="grad: also the peak memory of each contender")
    ap.add_argument("--cross-size", default="2048x8")
    ap.add_argument("--decays", default="0.4,0.2,0.13,0.1")
    ap.add_argument("--one-call", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_call:
        L, heads, gates, c = args.one_call.split(",")
        return one_call(int(L), int(heads), gates, c)
    sections = args.sections.split(",")
    if "nograd" in sections:
        section(args, grad=False)
    if "grad" in sections:
        section(args, grad=True)
    if "cross" in sections:
        cross_section(args)


if __name__ == "__main__":
    main()
