"""The randomized estimator's second quadrature try on attention at initialisation.

    python examples/benchmarks/second_try.py --threads 1                 # L = 4096, about 20 minutes
    python examples/benchmarks/second_try.py --threads 1 --length 2048   # a few minutes

A one-layer ``LlamaForCausalLM`` (hidden 768, 12 heads of dimension 64, random init, as in
``scale.py``) runs one forward on random tokens; ``esswatch.capture`` takes its attention operator
(2 batch rows x 12 heads, as the watch does by default). At the watch's 8 indices
``round(j L / 9)`` and with its default ``estimator="auto"``, two contenders alternate inside each
repeat:

- ``with``: this code (a head the rank-16 quadrature rejects gets a second quadrature with a
  larger deflation, ``esswatch.engine.adaptive``, step 5);
- ``without``: the same code with the second try switched off (``SLQ_RETRY_MIN_SIZE`` set out of
  reach), which is what earlier releases did: those heads go to exact SVDs.

Then one ``estimator="exact"`` call gives the reference for the errors. Prints the times (median
[min-max] of ``--repeats``), the per-repeat ratios and the largest relative errors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import esswatch as ew
from esswatch.engine import adaptive


def llama_attention(L: int, rows: int):
    """The attention operator of ``scale.py``'s one-layer Llama (built by its ``build``) on one
    forward of ``rows x L`` random tokens."""
    from types import SimpleNamespace

    from scale import build  # this folder is on sys.path when the script runs

    model = build("llama", SimpleNamespace(vocab=8000, layers=1, lengths=[L]), "cpu")
    ids = torch.randint(0, 8000, (rows, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ew.capture(model, batch_rows=rows) as cap:
        model(ids)
    ((_, op),) = cap.operators.items()
    return op


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=2, help="batch rows captured (the watch's default: 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    op = llama_attention(args.length, args.rows)
    L = args.length
    idx = [round(j * L / 9) for j in range(1, 9)]
    print(
        f"# second try: Llama attention at initialisation, L = {L}, {args.rows} rows x 12 heads, indices {idx}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    on = adaptive.SLQ_RETRY_MIN_SIZE
    times, out = {"with": [], "without": []}, {}
    for _ in range(args.repeats):
        for name, min_size in (("without", 10**9), ("with", on)):
            adaptive.SLQ_RETRY_MIN_SIZE = min_size
            t0 = time.perf_counter()
            out[name] = ew.entropy_ess(op, idx)
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    adaptive.SLQ_RETRY_MIN_SIZE = on
    t0 = time.perf_counter()
    ref = ew.entropy_ess(op, idx, estimator="exact")
    t_exact = time.perf_counter() - t0
    med = lambda ts: f"{statistics.median(ts):.1f} [{min(ts):.1f}-{max(ts):.1f}]"
    ratios = [a / b for a, b in zip(times["without"], times["with"])]
    err = {k: float(((v - ref).abs() / ref).max()) for k, v in out.items()}
    print("| contender | time s | max rel err vs exact |")
    print("|---|---|---|")
    print(f"| with the second try | {med(times['with'])} | {err['with']:.1e} |")
    print(f"| without (earlier releases) | {med(times['without'])} | {err['without']:.1e} |")
    print(f"| `exact` (once) | {t_exact:.1f} | 0 |")
    print(f"ratio without / with, per repeat: {', '.join(f'{r:.2f}x' for r in ratios)}")
    print(f"ESS {float(ref.min()):.1f}-{float(ref.max()):.1f}")


if __name__ == "__main__":
    main()
