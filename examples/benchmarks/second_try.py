"""The randomized estimator's second quadrature try on attention at initialisation.

    python examples/benchmarks/second_try.py --threads 1                 # L = 4096, about 20 minutes
    python examples/benchmarks/second_try.py --threads 1 --length 2048   # a few minutes
    python examples/benchmarks/second_try.py --threads 1 --model gpt2 --contenders with,cap4

A one-layer model of ``scale.py`` (``--model``: ``llama``, the ``LlamaForCausalLM``, or ``gpt2``,
the ``nn.TransformerEncoder``; hidden 768, 12 heads of dimension 64, random init) runs one forward
on random tokens; ``esswatch.capture`` takes its attention operator (2 batch rows x 12 heads, as the
watch does by default). At the watch's 8 indices ``round(j L / 9)`` and with its default
``estimator="auto"``, the contenders (``--contenders``) alternate inside each repeat:

- ``with``: this code (a head the rank-16 quadrature rejects gets a second quadrature with a
  larger deflation, ``esswatch.engine.adaptive``, step 5);
- ``without``: the same code with the second try switched off (``SLQ_RETRY_MIN_SIZE`` set out of
  reach), which is what earlier releases did: those heads go to exact SVDs;
- ``cap4``: the same code with the second try's rank capped at ``p / 4`` (the previous
  ``SLQ_RETRY_RANK_DIVISOR``) instead of ``p / 3``;
- ``batched``: the same code with the quadrature's Golub-Kahan runs in one batched run of all
  heads (``SLQ_CPU_CHUNK_BYTES`` out of reach), as before the CPU chunks of ``golub_kahan.py``;
- ``noscout``: the same code with the full first quadrature tried on every block
  (``SLQ_SCOUT_RATIO`` out of reach), as before the scout of step 5.

Then one ``estimator="exact"`` call gives the reference for the errors. Prints the times (median
[min-max] of ``--repeats``), the per-repeat ratios and the largest relative errors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import esswatch as ew
from esswatch.engine import adaptive, golub_kahan


def attention(model_name: str, L: int, rows: int):
    """The attention operator of ``scale.py``'s one-layer ``model_name`` (built by its ``build``)
    on one forward of ``rows x L`` random tokens."""
    from types import SimpleNamespace

    from scale import build  # this folder is on sys.path when the script runs

    model = build(model_name, SimpleNamespace(vocab=8000, layers=1, lengths=[L]), "cpu")
    ids = torch.randint(0, 8000, (rows, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ew.capture(model, batch_rows=rows) as cap:
        model(ids)
    ((_, op),) = cap.operators.items()
    return op


def use(retry_min_size: int, divisor: int, chunk_bytes: int, scout_ratio: float) -> None:
    adaptive.SLQ_RETRY_MIN_SIZE, adaptive.SLQ_RETRY_RANK_DIVISOR = retry_min_size, divisor
    golub_kahan.SLQ_CPU_CHUNK_BYTES, adaptive.SLQ_SCOUT_RATIO = chunk_bytes, scout_ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama", choices=["llama", "gpt2"])
    ap.add_argument(
        "--contenders", default="without,with", help="comma-separated: without, with, cap4, batched, noscout"
    )
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=2, help="batch rows captured (the watch's default: 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    op = attention(args.model, args.length, args.rows)
    L = args.length
    idx = [round(j * L / 9) for j in range(1, 9)]
    print(
        f"# second try: {args.model} attention at initialisation, L = {L}, {args.rows} rows x 12 heads, "
        f"indices {idx}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    chunk, scout = golub_kahan.SLQ_CPU_CHUNK_BYTES, adaptive.SLQ_SCOUT_RATIO
    # (SLQ_RETRY_MIN_SIZE, SLQ_RETRY_RANK_DIVISOR, SLQ_CPU_CHUNK_BYTES, SLQ_SCOUT_RATIO) of each contender
    settings = {
        "with": (adaptive.SLQ_RETRY_MIN_SIZE, adaptive.SLQ_RETRY_RANK_DIVISOR, chunk, scout),
        "without": (10**9, adaptive.SLQ_RETRY_RANK_DIVISOR, chunk, scout),
        "cap4": (adaptive.SLQ_RETRY_MIN_SIZE, 4, chunk, scout),
        "batched": (adaptive.SLQ_RETRY_MIN_SIZE, adaptive.SLQ_RETRY_RANK_DIVISOR, 2**62, scout),
        "noscout": (adaptive.SLQ_RETRY_MIN_SIZE, adaptive.SLQ_RETRY_RANK_DIVISOR, chunk, float("inf")),
    }
    names = args.contenders.split(",")
    if not set(names) <= set(settings):
        ap.error(f"--contenders: choose from {sorted(settings)}")
    times, out = {k: [] for k in names}, {}
    for _ in range(args.repeats):
        for name in names:
            use(*settings[name])
            t0 = time.perf_counter()
            out[name] = ew.entropy_ess(op, idx)
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    use(*settings["with"])
    t0 = time.perf_counter()
    ref = ew.entropy_ess(op, idx, estimator="exact")
    t_exact = time.perf_counter() - t0
    med = lambda ts: f"{statistics.median(ts):.1f} [{min(ts):.1f}-{max(ts):.1f}]"
    label = {
        "with": "with the second try",
        "without": "without (earlier releases)",
        "cap4": "second try, rank at most p / 4 (the earlier cap)",
        "batched": "with the second try, quadrature runs batched (no CPU chunks)",
        "noscout": "with the second try, the full first quadrature on every block (no scout)",
    }
    print("| contender | time s | max rel err vs exact | entries outside 2% |")
    print("|---|---|---|---|")
    for k in names:
        rel = (out[k] - ref).abs() / ref
        print(f"| {label[k]} | {med(times[k])} | {float(rel.max()):.1e} | {int((rel > 0.02).sum())} of {rel.numel()} |")
    print(f"| `exact` (once) | {t_exact:.1f} | 0 | |")
    for k in names[1:]:
        ratios = [a / b for a, b in zip(times[k], times[names[0]])]
        print(f"ratio {k} / {names[0]}, per repeat: {', '.join(f'{r:.2f}x' for r in ratios)}")
    print(f"ESS {float(ref.min()):.1f}-{float(ref.max()):.1f}")


if __name__ == "__main__":
    main()
