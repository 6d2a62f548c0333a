"""Does ESS per key-value pair predict MQAR accuracy better than TSS per key-value pair?

    python examples/mqar/study.py --threads 1            # CPU default: 36 runs, 40 min on one busy core
    python examples/mqar/study.py --large --device cuda  # the larger sweep, for a GPU
    python examples/mqar/study.py --smoke                # one-minute check of the pipeline

Trains :class:`esswatch.layers.SequenceModel` with each reference mixer (softmax
attention, linear attention, gated linear attention, selective SSM) across model
widths and task difficulties (number of key-value pairs, sequence length) on
multi-query associative recall, with :class:`esswatch.ESSWatch` attached (a fixed
held-out probe batch, measured every ``steps / 10`` steps, TensorBoard logs under
``--logdir``). The last measurement (after the final step) gives, per run:

- ``ess``: entropy-ESS at index ``i = 2 * num_kv`` (the first query position, where
  the state must hold every key-value pair), summed over heads / channels (a head
  counts once per value channel) and over layers, averaged over the probe rows;
- ``tss``: the theoretical state size, summed the same way: the state width ``N`` per
  channel for the recurrences, the ``i`` cached tokens per channel for attention (the
  model's capacity, not capped by the ``min(i, L - i)`` bound that caps ESS);
- ``ess_per_kv = ess / num_kv``, ``tss_per_kv = tss / num_kv``, ``ess_over_tss = ess / tss``;
- ``utilization``: the watch's utilization, mean over layers, channels and rows of
  ``ESS / TSS_i`` with ``TSS_i = min(TSS, i, L - i)`` (how full the state that can be
  used at this index is);
- ``accuracy``: query accuracy on 512 held-out sequences.

Then the Pearson and Spearman correlations of accuracy with ESS/kv and with TSS/kv
(NumPy only; Spearman = Pearson of average ranks), and a failure analysis: a run
with accuracy below ``--fail-below`` is "saturated" when its utilization is >= 0.5
(the state is full: more state would help) and "collapsed" when it is < 0.25 (the
state is there but unused), else "intermediate". Writes results.csv, results.md and plot.png to
``--out`` (rows are appended as runs finish; ``--resume`` skips runs already there).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

import esswatch
from esswatch.demo.train import TrainConfig, build_model, heldout_batch, train_mqar

HERE = Path(__file__).resolve().parent
MIXER_ORDER = ("attention", "linear_attention", "gla", "ssm")
FIELDS = ["mixer", "d_model", "num_kv", "seq_len", "seed", "steps", "index", "accuracy", "loss", "ess", "tss",
          "ess_per_kv", "tss_per_kv", "ess_over_tss", "utilization", "ess_avg", "seconds"]

#: sweeps: widths x (num_kv, seq_len) x mixers, with the training budget.
SWEEPS = {
    "smoke": dict(widths=(16,), tasks=((2, 16),), steps=60, batch=16, vocab=32, lr=3e-3),
    "cpu": dict(widths=(16, 32, 64), tasks=((4, 32), (8, 32), (12, 48)), steps=800, batch=32, vocab=64, lr=3e-3),
    "large": dict(widths=(32, 64, 128), tasks=((8, 64), (16, 64), (32, 128), (64, 256)), steps=4000, batch=128,
                  vocab=8192, lr=3e-3),
}


def mixer_kwargs(mixer: str, d_model: int) -> Dict:
    """Per-mixer settings: 2 heads for the attention-like mixers, SSM state width 8."""
    return {"d_state": 8} if mixer == "ssm" else {"n_heads": 2}


def run_one(cfg: TrainConfig, logdir: Path, device: str, samples: int = 10) -> Dict:
    """Train one configuration with ESSWatch on a held-out probe batch; final ESS / TSS at i = 2 * num_kv."""
    index = 2 * cfg.num_kv
    every = max(1, cfg.steps // samples)
    probe = heldout_batch(cfg, 16)[0].to(device)
    model = build_model(cfg, device)
    run_dir = logdir / f"{cfg.mixer}-d{cfg.d_model}-kv{cfg.num_kv}-L{cfg.seq_len}-s{cfg.seed}"
    with esswatch.ESSWatch(model, logdir=str(run_dir), every_n_steps=every, probe_batch=probe, batch_rows=None,
                           indices=[index], histograms=False, images=False) as watch:
        out = train_mqar(model, cfg, watch=watch, device=device)
        # the final measurement: step() after the last optimizer step measures the trained model
        watch.set_step(every * ((cfg.steps + every - 1) // every))
        final = watch.step()
    ess = tss = avg = util = 0.0
    for lay in final["layers"].values():
        e = lay["entropy"]
        ess += e["total"]
        util += e["utilization"] / len(final["layers"])
        per_channel = lay["state_size"] if lay["state_size"] is not None else index   # attention: i cached tokens
        tss += lay["heads"] * lay["value_dim"] * per_channel
        avg += e["avg"] / len(final["layers"])
    acc = out["accuracy"]
    return dict(mixer=cfg.mixer, d_model=cfg.d_model, num_kv=cfg.num_kv, seq_len=cfg.seq_len, seed=cfg.seed,
                steps=cfg.steps, index=index, accuracy=acc, loss=out["loss"], ess=ess, tss=tss,
                ess_per_kv=ess / cfg.num_kv, tss_per_kv=tss / cfg.num_kv, ess_over_tss=ess / tss, utilization=util,
                ess_avg=avg, seconds=out["seconds"])


# -- statistics (NumPy only) ------------------------------------------------------------
def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def ranks(x) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float:
    return pearson(ranks(x), ranks(y))


# -- outputs ------------------------------------------------------------------------------
def read_rows(path: Path) -> List[Dict]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in FIELDS:
            if k in ("mixer",):
                continue
            r[k] = float(r[k]) if k not in ("d_model", "num_kv", "seq_len", "seed", "steps", "index") else int(r[k])
    return rows


def append_row(path: Path, row: Dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in FIELDS})


def failure_kind(util: float) -> str:
    return "saturated (ESS ~ TSS)" if util >= 0.5 else "collapsed (ESS << TSS)" if util < 0.25 else "intermediate"


def correlations(rows: List[Dict]) -> Dict[str, Dict[str, float]]:
    acc = [r["accuracy"] for r in rows]
    out = {}
    for key in ("ess_per_kv", "tss_per_kv"):
        v = [r[key] for r in rows]
        out[key] = {"pearson": pearson(acc, v), "spearman": spearman(acc, v),
                    "pearson_log": pearson(acc, np.log10(np.maximum(v, 1e-12)))}
    return out


def write_markdown(rows: List[Dict], path: Path, command: str, args, fail_below: float) -> str:
    corr = correlations(rows)
    e, t = corr["ess_per_kv"], corr["tss_per_kv"]
    def stronger(kind):   # ESS/kv correlates positively and more strongly than TSS/kv (NaN counts as 0)
        ev, tv = np.nan_to_num(e[kind]), np.nan_to_num(t[kind])
        return ev > 0 and ev > abs(tv)

    reproduced = stronger("pearson") and stronger("spearman")
    partly = stronger("pearson") or stronger("spearman")
    sweep = SWEEPS[args.sweep]
    lines = [
        "# MQAR: accuracy against ESS per key-value pair and TSS per key-value pair", "",
        f"Command: `{command}`", "",
        f"Sweep `{args.sweep}`: mixers {', '.join(sorted({r['mixer'] for r in rows}, key=MIXER_ORDER.index))}; "
        f"widths {sorted({r['d_model'] for r in rows})}; (num_kv, seq_len) in "
        f"{sorted({(r['num_kv'], r['seq_len']) for r in rows})}; 2 layers, {sweep['steps']} steps, batch "
        f"{sweep['batch']}, vocab {sweep['vocab']}, lr {sweep['lr']}, seeds {sorted({r['seed'] for r in rows})}; "
        f"device {args.device}, torch threads {torch.get_num_threads()}. {len(rows)} runs.", "",
        "ESS and TSS are measured by `esswatch.ESSWatch` on a fixed held-out probe batch after the last step, "
        "at index i = 2 * num_kv (the first query position: every key-value pair has been seen), summed over "
        "heads/channels (a head counts once per value channel) and layers; TSS is the model's state capacity "
        "summed the same way (state width N per channel for the recurrences, i cached tokens per channel for "
        "attention). Accuracy: 512 held-out sequences.", "",
        "## Correlation with accuracy", "",
        "| quantity | Pearson | Spearman | Pearson (log10 x) |", "|---|---|---|---|",
        f"| ESS/kv | {e['pearson']:.3f} | {e['spearman']:.3f} | {e['pearson_log']:.3f} |",
        f"| TSS/kv | {t['pearson']:.3f} | {t['spearman']:.3f} | {t['pearson_log']:.3f} |", "",
    ]
    if reproduced:
        verdict = ("**The finding reproduced:** ESS/kv correlates with accuracy more strongly than TSS/kv, "
                   "in both Pearson and Spearman correlation.")
    elif partly:
        verdict = ("**The finding reproduced only in part:** ESS/kv correlates more strongly than TSS/kv in one of "
                   "the two correlation measures, not in both.")
    else:
        verdict = ("**The finding did not reproduce:** ESS/kv does not correlate (positively) with accuracy more "
                   "strongly than TSS/kv in either correlation measure.")
    lines += [verdict, ""]
    per_mixer = []
    for m in MIXER_ORDER:
        sel = [r for r in rows if r["mixer"] == m]
        if len(sel) >= 3:
            c = correlations(sel)
            per_mixer.append(f"| {m} | {len(sel)} | {c['ess_per_kv']['spearman']:.3f} | "
                             f"{c['tss_per_kv']['spearman']:.3f} |")
    if per_mixer:
        lines += ["Within one mixer (Spearman):", "", "| mixer | runs | ESS/kv | TSS/kv |", "|---|---|---|---|",
                  *per_mixer, ""]
    failed = [r for r in rows if r["accuracy"] < fail_below]
    lines += [f"## Failure analysis (accuracy < {fail_below})", ""]
    if failed:
        kinds = ("saturated", "intermediate", "collapsed")
        lines += ["| mixer | runs | failed | saturated | intermediate | collapsed | mean utilization of failed |",
                  "|---|---|---|---|---|---|---|"]
        for m in MIXER_ORDER:
            sel = [r for r in rows if r["mixer"] == m]
            fail = [r for r in failed if r["mixer"] == m]
            if not sel:
                continue
            counts = [sum(failure_kind(r["utilization"]).startswith(k) for r in fail) for k in kinds]
            mean_u = f"{np.mean([r['utilization'] for r in fail]):.3f}" if fail else "-"
            lines.append(f"| {m} | {len(sel)} | {len(fail)} | " + " | ".join(map(str, counts)) + f" | {mean_u} |")
        ok = [r for r in rows if r["accuracy"] >= fail_below]
        lines += ["", f"Runs at or above {fail_below}: {len(ok)}"
                  + (f", mean utilization {np.mean([r['utilization'] for r in ok]):.3f}." if ok else "."), "",
                  "Utilization = ESS / min(TSS, i, L - i) per channel, averaged (the watch's "
                  "`ess/entropy/utilization` tag). Saturated = utilization >= 0.5 (the usable state is nearly "
                  "full: a larger state should help); collapsed = utilization < 0.25 (capacity is there but "
                  "unused: a training/initialization problem, not a size problem)."]
    else:
        lines.append("No run failed.")
    lines += ["", "## Runs", "",
              "| mixer | d_model | kv | L | accuracy | ESS | TSS | ESS/kv | TSS/kv | ESS/TSS | utilization | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (MIXER_ORDER.index(r["mixer"]), r["num_kv"], r["seq_len"], r["d_model"])):
        lines.append(f"| {r['mixer']} | {r['d_model']} | {r['num_kv']} | {r['seq_len']} | {r['accuracy']:.3f} | "
                     f"{r['ess']:.1f} | {r['tss']:.0f} | {r['ess_per_kv']:.2f} | {r['tss_per_kv']:.1f} | "
                     f"{r['ess_over_tss']:.3f} | {r['utilization']:.3f} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(rows: List[Dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    corr = correlations(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = dict(zip(MIXER_ORDER, "osD^"))
    for ax, key, label in ((axes[0], "ess_per_kv", "ESS / kv"), (axes[1], "tss_per_kv", "TSS / kv")):
        for m in MIXER_ORDER:
            sel = [r for r in rows if r["mixer"] == m]
            if sel:
                ax.scatter([r[key] for r in sel], [r["accuracy"] for r in sel], marker=markers[m], label=m, alpha=.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label + " (log scale)")
        c = corr[key]
        ax.set_title(f"{label}: Pearson {c['pearson']:.2f}, Spearman {c['spearman']:.2f}")
        ax.grid(alpha=.3)
    axes[0].set_ylabel("MQAR accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--large", action="store_const", const="large", dest="sweep", help="the GPU-sized sweep")
    g.add_argument("--smoke", action="store_const", const="smoke", dest="sweep", help="a one-minute check")
    ap.set_defaults(sweep="cpu")
    ap.add_argument("--mixers", nargs="+", default=list(MIXER_ORDER), choices=MIXER_ORDER)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, help="override the sweep's steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (e.g. 1 on a shared machine)")
    ap.add_argument("--fail-below", type=float, default=0.5, help="accuracy under which a run counts as failed")
    ap.add_argument("--logdir", default="runs/mqar_study")
    ap.add_argument("--out", default=str(HERE), help="folder for results.csv, results.md, plot.png")
    ap.add_argument("--resume", action="store_true", help="keep results.csv and skip runs already in it")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = dict(SWEEPS[args.sweep])
    if args.steps:
        sweep["steps"] = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    if not args.resume and csv_path.exists():
        csv_path.unlink()
    done = {(r["mixer"], r["d_model"], r["num_kv"], r["seq_len"], r["seed"]) for r in read_rows(csv_path)}
    command = "python examples/mqar/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    configs = list(itertools.product(sweep["tasks"], sweep["widths"], args.mixers, args.seeds))
    t0 = time.perf_counter()
    for n, ((kv, L), d, mixer, seed) in enumerate(configs, 1):
        if (mixer, d, kv, L, seed) in done:
            continue
        cfg = TrainConfig(mixer=mixer, d_model=d, seq_len=L, num_kv=kv, vocab_size=sweep["vocab"],
                          batch_size=sweep["batch"], steps=sweep["steps"], lr=sweep["lr"], seed=seed,
                          mixer_kwargs=mixer_kwargs(mixer, d), eval_every=0, eval_size=512)
        row = run_one(cfg, Path(args.logdir), args.device)
        append_row(csv_path, row)
        print(f"[{n}/{len(configs)} {time.perf_counter() - t0:.0f}s] " + json.dumps(
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    rows = read_rows(csv_path)
    text = write_markdown(rows, out / "results.md", command.strip(), args, args.fail_below)
    plot(rows, out / "plot.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
