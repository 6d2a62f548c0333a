"""Where the randomized estimator's first quadrature (rank-16 deflation) can succeed, and what its scout picks.

    python examples/benchmarks/first_try.py --threads 1

Blocks whose rank-16 pilot leaves a long tail (``upper / lower > 1.5``) and whose smaller side is at
least 384 go to the deflated stochastic Lanczos quadrature (``esswatch.engine.slq``), deflated by the
pilot's basis; heads it rejects may get a second try of rank 128 or more, chosen from the first
try's estimates (``esswatch.engine.adaptive``, step 5). Where the pilot's ratio is above
``SLQ_SCOUT_RATIO`` and its tail is not flat (``SKETCH_FLAT_TAIL``), the estimator does not try the
first quadrature: a ``SLQ_SCOUT_STEPS``-step run only estimates, for the second try's rank. This
script shows why. For every such block of ``calibration.py``'s families (L = 1024 and 1536, two seeds)
and ``estimators.py``'s variants (L = 2048), in float32, it runs the first quadrature as before the
change (acceptance checks from step 4) and the scout, and prints per family: the pilot's ratios,
the share of heads the first quadrature accepted above and below ``SLQ_SCOUT_RATIO``, and on blocks
with a second try whether the scout's estimates pick the same rank as the first try's.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

from esswatch.engine import adaptive

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from small_blocks import arguments, operators, pilot  # noqa: E402


def block(T, i, seed, rtol):
    """``(pilot ratio, flat tail, accepted share, same rank)`` of ``T[..., i:, :i]`` (``same rank``:
    ``None`` without a second try), or ``None`` where the pilot's ratio is at most 1.5."""
    h, p, g, fro2, t, basis, ratio = pilot(T, i, seed)
    if ratio <= adaptive.SKETCH_HOPELESS_RATIO:
        return None
    flat = adaptive._flat_tail(t, fro2, p)
    state = g.get_state()
    est, _, _, ok = adaptive._slq_try(h, fro2, math.log1p(rtol), g, adaptive.SLQ_RANK, basis)
    g.set_state(state)  # the scout draws the same probes
    scout = adaptive._scout(h, fro2, g, basis)[0]
    k_first = adaptive._retry_rank(est[~ok], p)
    k_scout = adaptive._retry_rank(scout.reshape(-1), p)
    same = None if k_scout == 0 else (k_first == k_scout or bool(ok.all()))
    return ratio, flat, float(ok.float().mean()), same


def main():
    args = arguments(__doc__, seeds=2)
    cut = adaptive.SLQ_SCOUT_RATIO
    t0 = time.perf_counter()
    fams = {}
    for n, (name, L, T) in enumerate(operators(args.seeds, lengths=(1024, 1536))):
        T = T if T.dim() == 3 else T[None]
        for i in sorted({L // 4, L // 2, 3 * L // 4, 400, L - 400}):
            if min(i, L - i) >= adaptive.SLQ_MIN_SIZE:
                out = block(T, i, n, args.rtol)
                if out is not None:
                    fams.setdefault(name, []).append(out)
    print(
        f"blocks with p >= {adaptive.SLQ_MIN_SIZE} and a pilot ratio above {adaptive.SKETCH_HOPELESS_RATIO}, float32, "
        f"rtol {args.rtol}; the first quadrature's accepted share at ratios up to {cut} and above it (flat tails "
        f"apart: they keep the first try); blocks with a second try where the {adaptive.SLQ_SCOUT_STEPS}-step scout "
        "picks the same rank"
    )
    head = ["family", "pilot ratios (blocks)", "flat tails", "accepted, ratio <= cut", "accepted, above (not flat)"]
    print("| " + " | ".join(head + ["same rank"]) + " |")
    print("|---|---|---|---|---|---|")
    for name, rows in fams.items():
        ratios = [r[0] for r in rows]
        below = [r[2] for r in rows if r[0] <= cut or r[1]]
        above = [r[2] for r in rows if r[0] > cut and not r[1]]
        same = [r[3] for r in rows if r[3] is not None]
        share = lambda xs: f"{sum(xs) / len(xs):.2f} ({len(xs)})" if xs else "-"
        print(
            f"| {name} | {min(ratios):.1f}-{max(ratios):.1f} ({len(rows)}) | {sum(r[1] for r in rows)} | "
            f"{share(below)} | {share(above)} | {f'{sum(same)} of {len(same)}' if same else '-'} |",
            flush=True,
        )
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
