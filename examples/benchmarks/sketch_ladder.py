"""Which blocks the randomized estimator's sketch ladder closes, and what its pilot knew beforehand.

    python examples/benchmarks/sketch_ladder.py --threads 1

``estimator="randomized"`` starts each block with a rank-16 pilot sketch (no power iteration,
float32 projection). Where its bounds stay open it may sketch the pilot's rank again with a float64
projection (step 2 of ``esswatch.engine.adaptive``) and then ranks 32, 64, ... with power
iterations (step 3) before the quadrature or an exact SVD. This script runs the old ladder, with
both steps for every block the pilot did not screen out (``SKETCH_REPROJECT_RATIO`` and
``SKETCH_FLAT_TAIL`` set to infinity), on every operator family of ``estimators.py`` and
``calibration.py`` plus exactly low-rank and geometric-spectrum operators, and records per block:

* the pilot's bound ratio ``upper / lower``;
* the pilot's unseen energy in units of its smallest value, ``r^2 / t_16^2`` (largest over the
  heads), divided by ``p``: a flat tail fills many values at that level, a decaying spectrum few;
* which step closed the bounds, if any.

It then counts, at the shipped constants, the closable blocks they send away (to the quadrature or
an exact SVD: slower, never less accurate) and the ladders they save.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch

import esswatch as ew
import esswatch.ess as ess_api
from esswatch.engine import adaptive
from esswatch.operators import Dense, GatedRecurrence, SoftmaxAttention

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from calibration import families  # noqa: E402
from estimators import (  # noqa: E402
    FLAT_TAIL_VARIANTS,
    INIT_VARIANTS,
    attention_at_init,
    clustered_attention,
    interior,
    make_ops,
)


class Recorder:
    """Wraps the adaptive estimator's steps and records, per block, the pilot's numbers and the outcome."""

    def __init__(self):
        self.records, self.cur = [], None
        self.orig = {n: getattr(adaptive, n) for n in ("entropy_bounds", "sketch_singular_values", "_ratio")}
        self.orig_entry = ess_api.randomized_entropy

    def install(self):
        adaptive.entropy_bounds = self._bounds
        adaptive.sketch_singular_values = self._sketch
        adaptive._ratio = self._ratio
        ess_api.randomized_entropy = self._entry

    def uninstall(self):
        for n, f in self.orig.items():
            setattr(adaptive, n, f)
        ess_api.randomized_entropy = self.orig_entry

    def _entry(self, h, *a, **k):
        self.cur = {"p": min(h.shape[-2:]), "ratios": [], "ranks": [], "feature": None}
        out = self.orig_entry(h, *a, **k)
        self.records.append(self.cur)
        return out

    def _bounds(self, t, fro2, p):
        if self.cur["feature"] is None:  # the pilot's
            t64 = t.to(torch.float64)
            r2 = torch.clamp(fro2 - (t64 * t64).sum(-1), min=0)
            self.cur["feature"] = float((r2 / torch.clamp(t64[..., -1] ** 2, min=1e-300)).max()) / p
        return self.orig["entropy_bounds"](t, fro2, p)

    def _sketch(self, *a, **k):
        self.cur["ranks"].append((a[4], a[5], "rmatmul_exact" in k))
        return self.orig["sketch_singular_values"](*a, **k)

    def _ratio(self, lo, hi):
        r = self.orig["_ratio"](lo, hi)
        self.cur["ratios"].append(r)
        return r


def operators():
    f32 = {"dtype": torch.float32}
    g = torch.Generator().manual_seed(5)
    rn = lambda *s: torch.randn(*s, generator=g)
    for L in (1024, 2048):
        yield from ((f"{n}, L {L}", op, L) for n, op in make_ops(L, "cpu").items())
        yield from ((f"{n}, L {L}", clustered_attention(L, **f32, **kw), L) for n, kw in FLAT_TAIL_VARIANTS.items())
        yield from ((f"{n}, L {L}", attention_at_init(L, **f32, **kw), L) for n, kw in INIT_VARIANTS.items())
        for d in (20, 24, 32, 40, 48, 64):  # exactly rank d
            yield f"linear attention d {d}, L {L}", GatedRecurrence(rn(4, L, d), rn(4, L, d)), L
            gates = torch.nn.functional.logsigmoid(rn(4, L, d) + 4.0)
            yield f"gated recurrence N {d}, L {L}", GatedRecurrence(rn(4, L, d), rn(4, L, d), gates), L
        for tau in (2, 4, 8, 16):  # s_j about exp(-j / tau)
            u, v, w = rn(4, L, 128), rn(4, L, 128), torch.exp(-torch.arange(128) / tau)
            yield f"geometric spectrum tau {tau}, L {L}", Dense(torch.tril(torch.einsum("hlr,r,hmr->hlm", u, w, v))), L
        for sharp in (1.0, 2.0, 4.0, 8.0):
            for d in (8, 16):
                q, k = rn(4, L, d), rn(4, L, d)
                yield f"random attention x {sharp}, d {d}, L {L}", SoftmaxAttention(q * sharp / d**0.5, k), L
    for L in (768, 2048):
        for seed in range(2):
            for n, op in families(L, seed).items():
                yield f"calibration: {n}, L {L}, seed {seed}", op, L


def outcome(r) -> str:
    closed = r["ratios"] and r["ratios"][-1] <= 1.02**2
    if not closed:
        return "not closed" if len(r["ratios"]) > 1 else "screened by the pilot (ratio > 1.5)"
    if len(r["ratios"]) == 1:
        return "closed by the pilot"
    return "closed by the float64 re-sketch" if len(r["ratios"]) == 2 else "closed by rank 32 or more"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shipped = adaptive.SKETCH_REPROJECT_RATIO, adaptive.SKETCH_FLAT_TAIL
    adaptive.SKETCH_REPROJECT_RATIO = adaptive.SKETCH_FLAT_TAIL = math.inf  # the old ladder
    rec = Recorder()
    rec.install()
    t0, n_ops = time.perf_counter(), 0
    try:
        for _, op, L in operators():
            ew.entropy_ess(op, interior(L, 8), estimator="randomized", rtol=0.02)
            n_ops += 1
    finally:
        rec.uninstall()
        adaptive.SKETCH_REPROJECT_RATIO, adaptive.SKETCH_FLAT_TAIL = shipped
    R = rec.records
    print(f"{len(R)} blocks of {n_ops} operators (8 interior indices each), {time.perf_counter() - t0:.0f} s\n")
    print("| outcome with the old ladder | blocks | pilot ratio | pilot's unseen energy / (p t_16^2) |")
    print("|---|---|---|---|")
    groups = {}
    for r in R:
        groups.setdefault(outcome(r), []).append(r)
    for name, rs in groups.items():
        ratio = [r["ratios"][0] for r in rs if r["ratios"]]
        feat = [r["feature"] for r in rs if r["feature"] is not None]
        span = lambda x: f"{min(x):.3f}-{max(x):.3f}" if x else "-"
        print(f"| {name} | {len(rs)} | {span(ratio)} | {span(feat)} |")
    reproject, flat = shipped
    ladder = [r for r in R if len(r["ratios"]) > 1]  # every block the old ladder went on with
    resketch = [r for r in ladder if outcome(r) == "closed by the float64 re-sketch"]
    resketch_lost = [r for r in resketch if r["ratios"][0] > reproject]
    sent = [r for r in ladder if outcome(r).startswith("closed") and r["ratios"][0] > reproject and r["feature"] > flat]
    saved = [r for r in ladder if outcome(r) == "not closed" and r["ratios"][0] > reproject and r["feature"] > flat]
    wasted = [r for r in ladder if outcome(r) == "not closed"]
    print(f"\nat the shipped SKETCH_REPROJECT_RATIO = {reproject}, SKETCH_FLAT_TAIL = {flat}:")
    print(f"- re-sketches skipped that would have closed a block: {len(resketch_lost)}")
    print(f"- closable blocks sent to the quadrature or an exact SVD: {len(sent)}")
    print(f"- ladders that could not close and are now skipped: {len(saved)} of {len(wasted)}")


if __name__ == "__main__":
    main()
