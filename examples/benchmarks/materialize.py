"""The shared cost every estimator pays on softmax attention: materializing ``T`` and trimming
its Hankel blocks, this release against the release before (side by side in one run).

    python examples/benchmarks/materialize.py --threads 1               # L = 2048, 4 heads, d = 32
    python examples/benchmarks/materialize.py --threads 1 --L 1024 --repeats 5

"before" is the previous code, copied here: ``SoftmaxAttention._dense_part`` as an out-of-place
chain (matmul, scale, clamp, expand, masked_fill, softmax: a new ``L x L`` tensor per step) and
``BlockCache.hankel`` scanning every block for zero lines (``trim_zero_lines``). "after" is
the installed package: one fresh tensor filled in place and every block trimmed from one pass
over ``T`` (``nonzero_extents``; the trim rows time it against scanning each block, the
measure behind ``BlockCache``'s ``EXTENTS_FROM``: calls asking for fewer blocks scan them).
The operator is the low-ESS clustered attention of
``estimators.py``, 8 interior indices. Every figure: median [min-max] of ``--repeats`` runs,
before and after timed alternately in each repeat; ratio: median [min-max] of per-repeat ratios.
The outputs of both are compared (``dense``: bit for bit; entropy-ESS: max abs difference).
Two more rows time only how ``dense()`` fills the forbidden scores with ``-inf``: one
broadcast ``L x L`` mask (the fill before) against blocks of rows
(``SoftmaxAttention._fill_forbidden_``), causal and with a window of 128. One more times
``dense()`` with its scores' buffer on plain pages against the huge-page advice of
``esswatch/engine/alloc.py`` (the first touch of a fresh ``L x L`` buffer is page faults).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch

import esswatch as ew
from esswatch.engine import alloc
from esswatch.engine.exact import nonzero_extents, trim_by_extents, trim_zero_lines
from esswatch.ess import blocks
from esswatch.operators import SoftmaxAttention

try:
    from estimators import clustered_attention, interior
except ImportError:  # run from the repository root
    from examples.benchmarks.estimators import clustered_attention, interior


def legacy_dense_part(self, rows, cols):
    """``SoftmaxAttention._dense_part`` of the release before (verbatim but for names)."""
    out_dt = torch.float64 if self.q.dtype == torch.float64 else torch.float32
    dt = out_dt
    if dt == torch.float32:
        bound = (
            self.q.detach().abs().amax().double()
            * self.k.detach().abs().amax().double()
            * self.q.shape[-1]
            * abs(self.scale)
        )
        if float(bound) > 1e36:
            dt = torch.float64
    L = self.seq_len
    r_idx = torch.arange(L, device=self.q.device)[rows]
    c_idx = torch.arange(L, device=self.q.device)[cols]
    q = self.q[..., rows, :]
    k = self.k[..., cols, :]
    fmax = torch.finfo(dt).max
    scores = torch.clamp((q.to(dt) @ k.to(dt).transpose(-1, -2)) * self.scale, -fmax, fmax)
    scores = scores.expand(*self.batch_shape, r_idx.numel(), c_idx.numel())
    diff = r_idx[:, None] - c_idx[None, :]
    ok = diff >= 0
    if self.window is not None:
        ok = ok & (diff < self.window)
    if self.mask is None:
        return torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).to(out_dt)
    mask = self.mask[..., rows, cols]
    if mask.dtype == torch.bool:
        ok = ok & mask
    else:
        scores = scores + mask.to(dt)
        ok = ok & torch.isfinite(mask)
    scores = scores.masked_fill(~ok, float("-inf"))
    row_has = torch.isfinite(scores).any(dim=-1, keepdim=True)
    scores = torch.where(row_has, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1)
    return torch.where(row_has & ok, probs, torch.zeros_like(probs)).to(out_dt)


def legacy_hankel(self, i):
    """``BlockCache.hankel`` of the release before, for an operator without a recurrence."""
    op = self.op
    L = op.seq_len
    rows, cols = op.hankel_support(i)
    narrowed = (rows.indices(L)[:2], cols.indices(L)[:2]) != ((i, L), (0, i))
    if narrowed and self._dense is None:
        return trim_zero_lines(op.block(rows, cols))
    return trim_zero_lines(self.dense()[..., rows, cols])


@contextlib.contextmanager
def before():
    saved = SoftmaxAttention._dense_part, blocks.BlockCache.hankel
    SoftmaxAttention._dense_part, blocks.BlockCache.hankel = legacy_dense_part, legacy_hankel
    try:
        yield
    finally:
        SoftmaxAttention._dense_part, blocks.BlockCache.hankel = saved


def timed(fn, legacy):
    with before() if legacy else contextlib.nullcontext():
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def race(fn, repeats):
    ts = {"before": [], "after": []}
    outs = {}
    for _ in range(repeats):
        for name in ts:
            t, outs[name] = timed(fn, name == "before")
            ts[name].append(t)
    return ts, outs


def med(ts):
    return f"{statistics.median(ts):.3f} [{min(ts):.3f}-{max(ts):.3f}]"


def ratio(ts):
    r = [a / b for a, b in zip(ts["before"], ts["after"])]
    return f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]"


def dense_race(op, kinds, setup):
    """``op.dense()`` timed under each of ``kinds`` (``setup(kind)`` switches), alternating in each repeat."""
    ts, outs = {k: [] for k in kinds}, {}
    for _ in range(args.repeats):
        for kind in kinds:
            setup(kind)
            t0 = time.perf_counter()
            outs[kind] = op.dense()
            ts[kind].append(time.perf_counter() - t0)
    return ts, outs


def trims(att, idx, t):
    """Trimming all blocks ``T[i:, :i]`` (``t``: the dense ``T``), the old way and the new."""
    old = lambda: [trim_zero_lines(t[..., i:, :i]) for i in idx]

    def new():
        first, last = nonzero_extents(t)
        return [trim_by_extents(t, slice(i, att.seq_len), slice(0, i), first, last) for i in idx]

    ts = {"before": [], "after": []}
    for _ in range(args.repeats):
        for name, fn in (("before", old), ("after", new)):
            t0 = time.perf_counter()
            out = fn()
            ts[name].append(time.perf_counter() - t0)
    same = all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(old(), out))
    return ts, same


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    att = clustered_attention(args.L, heads=args.heads, dtype=torch.float32)
    idx = interior(args.L, 8)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
        f"L = {args.L}, {args.heads} heads, d = 32, float32, indices {idx}"
    )
    print(f"time in s: median [min-max] of {args.repeats}; ratio: median [min-max] of per-repeat before/after\n")
    print("| step | before s | after s | ratio before/after | outputs |")
    print("|---|---|---|---|---|")
    ts, out = race(att.dense, args.repeats)
    print(
        f"| dense() | {med(ts['before'])} | {med(ts['after'])} | {ratio(ts)} | bit-identical: "
        f"{torch.equal(out['before'], out['after'])} |",
        flush=True,
    )
    # the forbidden scores: one broadcast mask over L x L (the previous fill) against
    # SoftmaxAttention._fill_forbidden_'s row blocks, both inside the current dense()
    one_mask = lambda self, scores, rows, cols: scores.masked_fill_(self._forbidden(rows, cols), float("-inf"))
    g = torch.Generator().manual_seed(0)
    rn = lambda: torch.randn(args.heads, args.L, 32, generator=g)
    for name, op in (("causal", att), ("window 128", SoftmaxAttention(rn(), rn(), window=128))):
        saved = SoftmaxAttention._fill_forbidden_

        def fill_by(kind):
            SoftmaxAttention._fill_forbidden_ = one_mask if kind == "one mask" else saved

        ts, outs = dense_race(op, ("one mask", "row blocks"), fill_by)
        SoftmaxAttention._fill_forbidden_ = saved
        r = [a / b for a, b in zip(ts["one mask"], ts["row blocks"])]
        print(
            f"| dense(), {name}: forbidden scores by one mask (before) / by row blocks (after) | "
            f"{med(ts['one mask'])} | {med(ts['row blocks'])} | "
            f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}] | "
            f"bit-identical: {torch.equal(outs['one mask'], outs['row blocks'])} |",
            flush=True,
        )
    # the scores' buffer: plain pages (torch.empty) against the huge-page advice of engine/alloc.py
    huge_min = alloc.HUGE_MIN_BYTES
    ts, outs = dense_race(
        att, ("plain", "huge"), lambda kind: setattr(alloc, "HUGE_MIN_BYTES", 2**62 if kind == "plain" else huge_min)
    )
    alloc.HUGE_MIN_BYTES = huge_min
    r = [a / b for a, b in zip(ts["plain"], ts["huge"])]
    print(
        f"| dense(): the scores' buffer on plain pages (before) / advised to huge pages (after) | "
        f"{med(ts['plain'])} | {med(ts['huge'])} | {statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}] | "
        f"bit-identical: {torch.equal(outs['plain'], outs['huge'])} |",
        flush=True,
    )
    for name, blocks_at in (
        ("trim 8 blocks", idx),
        ("trim 4 blocks", idx[::2]),
        ("trim 1 block (i = L/2)", [args.L // 2]),
    ):
        ts, same = trims(att, blocks_at, out["after"])
        print(f"| {name} | {med(ts['before'])} | {med(ts['after'])} | {ratio(ts)} | same blocks: {same} |", flush=True)
    ts, out = race(lambda: ew.entropy_ess(att, idx, estimator="exact"), args.repeats)
    diff = float((out["before"] - out["after"]).abs().max())
    print(
        f"| entropy_ess exact, 8 indices | {med(ts['before'])} | {med(ts['after'])} | {ratio(ts)} | "
        f"max abs diff {diff:.1e} |",
        flush=True,
    )
