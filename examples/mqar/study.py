"""Does ESS per key-value pair predict MQAR accuracy, within each mixer family that learns the task?

    python examples/mqar/study.py                          # CPU default sweep (see results.md for its time)
    python examples/mqar/study.py --shard 0/2 &            # the same sweep in two processes:
    python examples/mqar/study.py --shard 1/2 &            #   each appends to its own shard file,
    python examples/mqar/study.py --report                 #   then merge and write the results
    python examples/mqar/study.py --regularizer            # the regularizer experiment (regularizer.*)
    python examples/mqar/study.py --quick --out /tmp/q     # under a minute: the whole pipeline, tiny runs
    python examples/mqar/study.py --large --device cuda    # a larger sweep for a GPU

Trains :class:`esswatch.layers.SequenceModel` (2 layers) with each reference mixer family
(softmax attention, linear attention, gated linear attention, a selective SSM) on
multi-query associative recall. Each family has its own list of configurations (state
size: width / heads / key width / ``d_state``; difficulty: number of key-value pairs
``kv`` and sequence length ``L``), its own learning rate and step count, chosen from a
pilot (documented in results.md) so that each family spans failing to solving runs.
Every configuration runs with several seeds. :class:`esswatch.ESSWatch` is attached (a
fixed held-out probe batch; TensorBoard logs under ``--logdir``, readable with
``esswatch report``). The last measurement (after the final step) gives, per run:

- ``ess``: entropy-ESS at index ``i = 2 * kv`` (the first query position: every pair has
  been seen), summed over heads / channels (a head counts once per value channel) and
  layers, averaged over the probe rows;
- ``tss``: the theoretical state size summed the same way (state width ``N`` per channel
  for the recurrences, the ``i`` cached tokens per channel for attention);
- ``ess_per_kv``, ``tss_per_kv``; ``utilization``: the watch's ``ESS / min(TSS, i, L - i)``,
  mean over layers, channels and rows; ``accuracy`` on 512 held-out sequences;
- ``diagnosis``: for a failed run (accuracy < 0.5) the label of
  :func:`esswatch.tools.diagnosis.diagnose` (saturated / intermediate / collapsed).

Statistics (NumPy only): Pearson and Spearman (average ranks for ties) of accuracy against
ESS/kv and TSS/kv, per family and overall, with percentile bootstrap intervals over runs
(fixed bootstrap seed). Deterministic on CPU: one torch thread,
``torch.use_deterministic_algorithms(True)``, seeded model, data and probe; a rerun
reproduces every printed number except the seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import esswatch
from esswatch.demo.train import TrainConfig, build_model, heldout_batch, train_mqar
from esswatch.tools.diagnosis import COLLAPSED_BELOW, SATURATED_AT, diagnose

HERE = Path(__file__).resolve().parent
MIXER_ORDER = ("attention", "linear_attention", "gla", "ssm")
FIELDS = [
    "mixer",
    "config",
    "d_model",
    "mixer_kwargs",
    "num_kv",
    "seq_len",
    "vocab",
    "seed",
    "steps",
    "lr",
    "index",
    "accuracy",
    "loss",
    "ess",
    "tss",
    "ess_per_kv",
    "tss_per_kv",
    "utilization",
    "diagnosis",
    "seconds",
]
REG_FIELDS = ["seed", "weight", "accuracy", "loss", "ess", "utilization", "seconds", "seconds_per_step"]
INT_FIELDS = {"d_model", "num_kv", "seq_len", "vocab", "seed", "steps", "index"}
STR_FIELDS = {"mixer", "config", "mixer_kwargs", "diagnosis"}
FAIL_BELOW, SOLVED_AT = 0.5, 0.9
BOOTSTRAP, BOOTSTRAP_SEED = 2000, 0


def C(d_model: int, kv: int, L: int, **kwargs) -> Dict:
    return dict(d_model=d_model, num_kv=kv, seq_len=L, kwargs=kwargs)


#: sweep -> common settings and, per family, learning rate, steps and configurations
SWEEPS: Dict[str, Dict] = {
    "quick": dict(
        vocab=16,
        batch=16,
        seeds=(0, 1),
        families={
            "attention": dict(lr=1e-2, steps=40, configs=[C(8, 2, 8, n_heads=2), C(16, 2, 8, n_heads=2)]),
            "linear_attention": dict(lr=1e-2, steps=40, configs=[C(8, 2, 8, n_heads=4, d_conv=3)]),
            "gla": dict(lr=1e-2, steps=40, configs=[C(8, 2, 8, n_heads=2, key_dim=2, d_conv=3)]),
            "ssm": dict(lr=1e-2, steps=40, configs=[C(8, 2, 8, d_state=2)]),
        },
        regularizer=dict(
            mixer="gla",
            d_model=8,
            num_kv=2,
            seq_len=8,
            kwargs=dict(n_heads=2),
            lr=1e-2,
            steps=20,
            weight=0.1,
            seeds=(0, 1, 2),
        ),
    ),
    "cpu": dict(
        vocab=32,
        batch=32,
        seeds=(0, 1, 2),
        families={
            "attention": dict(
                lr=1e-2,
                steps=1000,
                configs=[
                    C(8, 8, 32, n_heads=2),
                    C(16, 8, 32, n_heads=2),
                    C(32, 8, 32, n_heads=2),
                    C(64, 8, 32, n_heads=2),
                    C(64, 4, 32, n_heads=2),
                ],
            ),
            "linear_attention": dict(
                lr=1e-2,
                steps=600,
                configs=[
                    C(16, 8, 32, n_heads=16, d_conv=3),
                    C(16, 8, 32, n_heads=8, d_conv=3),
                    C(16, 8, 32, n_heads=4, d_conv=3),
                    C(32, 8, 32, n_heads=8, d_conv=3),
                    C(32, 8, 32, n_heads=2, d_conv=3),
                ],
            ),
            "gla": dict(
                lr=1e-2,
                steps=700,
                configs=[
                    C(32, 8, 32, n_heads=2, key_dim=1, d_conv=3),
                    C(32, 8, 32, n_heads=2, key_dim=2, d_conv=3),
                    C(32, 8, 32, n_heads=2, key_dim=4, d_conv=3),
                    C(32, 8, 32, n_heads=2, key_dim=16, d_conv=3),
                ],
            ),
            "ssm": dict(
                lr=3e-3,
                steps=3000,
                configs=[
                    C(8, 4, 16, d_state=1, expand=1),
                    C(16, 4, 16, d_state=1, expand=1),
                    C(32, 4, 16, d_state=1, expand=2),
                    C(32, 4, 16, d_state=8, expand=2),
                ],
            ),
        },
        regularizer=dict(
            mixer="linear_attention",
            d_model=32,
            num_kv=4,
            seq_len=24,
            kwargs=dict(n_heads=2),
            lr=1e-2,
            steps=600,
            weight=0.1,
            seeds=(0, 1, 2),
        ),
    ),
}
SWEEPS["large"] = dict(
    vocab=256,
    batch=128,
    seeds=(0, 1, 2),
    families={
        m: dict(
            lr=f["lr"],
            steps=4 * f["steps"],
            configs=[dict(c, num_kv=4 * c["num_kv"], seq_len=4 * c["seq_len"]) for c in f["configs"]],
        )
        for m, f in SWEEPS["cpu"]["families"].items()
    },
    regularizer=dict(SWEEPS["cpu"]["regularizer"], steps=4000, seeds=(0, 1, 2, 3)),
)


def config_name(mixer: str, c: Dict) -> str:
    kw = ",".join(f"{k}={v}" for k, v in sorted(c["kwargs"].items()))
    return f"{mixer}-d{c['d_model']}-kv{c['num_kv']}-L{c['seq_len']}-{kw}"


def plan(sweep: Dict, mixers: Sequence[str], seeds: Optional[Sequence[int]] = None) -> List[Tuple[str, Dict, int]]:
    """Every (mixer, configuration, seed) of the sweep, in a fixed order."""
    out = []
    for m in MIXER_ORDER:
        if m not in mixers or m not in sweep["families"]:
            continue
        fam = sweep["families"][m]
        for c in fam["configs"]:
            for s in seeds or sweep["seeds"]:
                out.append((m, dict(c, lr=fam["lr"], steps=fam["steps"]), s))
    return out


def train_config(mixer: str, c: Dict, seed: int, sweep: Dict) -> TrainConfig:
    return TrainConfig(
        mixer=mixer,
        d_model=c["d_model"],
        seq_len=c["seq_len"],
        num_kv=c["num_kv"],
        vocab_size=sweep["vocab"],
        batch_size=sweep["batch"],
        steps=c["steps"],
        lr=c["lr"],
        seed=seed,
        mixer_kwargs=dict(c["kwargs"]),
        eval_every=0,
        eval_size=512,
    )


def run_one(
    cfg: TrainConfig, logdir: Path, device: str, samples: int = 4, regularizer: float = 0.0, name: Optional[str] = None
) -> Dict:
    """Train one configuration with ESSWatch (regularizer weight ``regularizer``, 0 = off); final ESS / TSS at
    ``i = 2 * num_kv`` on the held-out probe batch."""
    index = 2 * cfg.num_kv
    every = max(1, cfg.steps // samples)
    probe = heldout_batch(cfg, 16)[0].to(device)
    model = build_model(cfg, device)
    run_dir = logdir / (name or f"{cfg.mixer}-d{cfg.d_model}-kv{cfg.num_kv}-L{cfg.seq_len}-s{cfg.seed}")
    with esswatch.ESSWatch(
        model,
        logdir=str(run_dir),
        every_n_steps=every,
        probe_batch=probe,
        batch_rows=None,
        indices=[index],
        histograms=False,
        images=False,
        regularizer=regularizer or None,
    ) as watch:
        out = train_mqar(model, cfg, watch=watch, device=device)
        watch.set_step(every * ((cfg.steps + every - 1) // every))  # measure the trained model
        final = watch.step()
    ess = tss = util = 0.0
    for lay in final["layers"].values():
        e = lay["entropy"]
        ess += e["total"]
        util += e["utilization"] / len(final["layers"])
        per_channel = lay["state_size"] if lay["state_size"] is not None else index  # attention: i cached tokens
        tss += lay["heads"] * lay["value_dim"] * per_channel
    acc = out["accuracy"]
    return dict(
        mixer=cfg.mixer,
        d_model=cfg.d_model,
        mixer_kwargs=json.dumps(cfg.mixer_kwargs, sort_keys=True),
        num_kv=cfg.num_kv,
        seq_len=cfg.seq_len,
        vocab=cfg.vocab_size,
        seed=cfg.seed,
        steps=cfg.steps,
        lr=cfg.lr,
        index=index,
        accuracy=acc,
        loss=out["loss"],
        ess=ess,
        tss=tss,
        ess_per_kv=ess / cfg.num_kv,
        tss_per_kv=tss / cfg.num_kv,
        utilization=util,
        diagnosis=diagnose(util)[0] if acc < FAIL_BELOW else "-",
        seconds=out["seconds"],
    )


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


def bootstrap_ci(x, y, fn, n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED, level: float = 0.95):
    """Percentile interval of ``fn(x, y)`` over ``n`` resamples of the runs (with replacement); resamples where
    ``fn`` is undefined (a constant column) are dropped. ``(lo, hi, kept)``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(x), len(x))
        v = fn(x[i], y[i])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan"), 0
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a)), len(vals)


def bootstrap_diff_ci(acc, a, b, fn, n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED, level: float = 0.95):
    """Percentile interval of ``fn(acc, a) - fn(acc, b)`` over paired resamples of the runs (the same resampled
    runs for both), dropping undefined resamples. ``(lo, hi, kept)``."""
    acc, a, b = (np.asarray(v, float) for v in (acc, a, b))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(acc), len(acc))
        v = fn(acc[i], a[i]) - fn(acc[i], b[i])
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan"), 0
    q = (1 - level) / 2
    return float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q)), len(vals)


def correlations(rows: List[Dict]) -> Dict[str, Dict[str, float]]:
    acc = [r["accuracy"] for r in rows]
    out = {}
    for key in ("ess_per_kv", "tss_per_kv"):
        v = [r[key] for r in rows]
        d = {}
        for name, fn in (("pearson", pearson), ("spearman", spearman)):
            lo, hi, kept = bootstrap_ci(acc, v, fn)
            d[name], d[name + "_lo"], d[name + "_hi"], d[name + "_kept"] = fn(acc, v), lo, hi, kept
        out[key] = d
    e, t = [r["ess_per_kv"] for r in rows], [r["tss_per_kv"] for r in rows]
    d = {}
    for name, fn in (("pearson", pearson), ("spearman", spearman)):
        lo, hi, kept = bootstrap_diff_ci(acc, e, t, fn)
        d[name], d[name + "_lo"], d[name + "_hi"], d[name + "_kept"] = fn(acc, e) - fn(acc, t), lo, hi, kept
    out["difference"] = d
    return out


# -- files ----------------------------------------------------------------------------------
def read_rows(path: Path, fields: Sequence[str] = FIELDS) -> List[Dict]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in fields:
            if k not in STR_FIELDS:
                r[k] = int(r[k]) if k in INT_FIELDS else float(r[k])
    return rows


def append_row(path: Path, row: Dict, fields: Sequence[str] = FIELDS) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in fields})


def write_rows(path: Path, rows: List[Dict], fields: Sequence[str] = FIELDS) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    for r in rows:
        append_row(tmp, r, fields)
    tmp.replace(path)


def run_key(r: Dict) -> Tuple:
    return (r["mixer"], r["config"], r["seed"])


# -- the report ---------------------------------------------------------------------------------
def _ci(d: Dict, name: str) -> str:
    if not np.isfinite(d[name]):
        return "undefined"
    return f"{d[name]:.2f} [{d[name + '_lo']:.2f}, {d[name + '_hi']:.2f}]"


def bigger_state_solved(run: Dict, rows: List[Dict]) -> str:
    """ "yes" when a configuration of the same family with a larger TSS on the same task solved it (mean accuracy
    over its seeds >= SOLVED_AT), "no" when larger ones exist but none did, "none larger" otherwise."""
    by_config: Dict[str, List[Dict]] = {}
    for r in rows:
        if (r["mixer"], r["num_kv"], r["seq_len"]) == (run["mixer"], run["num_kv"], run["seq_len"]) and r["tss"] > run[
            "tss"
        ]:
            by_config.setdefault(r["config"], []).append(r)
    if not by_config:
        return "none larger"
    return "yes" if any(np.mean([r["accuracy"] for r in rs]) >= SOLVED_AT for rs in by_config.values()) else "no"


def corr_table(groups: List[Tuple[str, List[Dict]]]) -> List[str]:
    lines = [
        "| runs | n | Pearson ESS/kv | Pearson TSS/kv | difference | Spearman ESS/kv | Spearman TSS/kv | difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in groups:
        if len(rows) < 3:
            continue
        c = correlations(rows)
        e, t, d = c["ess_per_kv"], c["tss_per_kv"], c["difference"]
        lines.append(
            f"| {name} | {len(rows)} | {_ci(e, 'pearson')} | {_ci(t, 'pearson')} | {_ci(d, 'pearson')} | "
            f"{_ci(e, 'spearman')} | {_ci(t, 'spearman')} | {_ci(d, 'spearman')} |"
        )
    return lines


def write_markdown(rows: List[Dict], path: Path, args, sweep: Dict, planned: int, pilot: str = "") -> str:
    mixers = [m for m in MIXER_ORDER if any(r["mixer"] == m for r in rows)]
    lines = [
        "# MQAR: accuracy against ESS/kv and TSS/kv, each mixer family from failing to solving",
        "",
        f"Sweep `{args.sweep}`, device {args.device}, one torch thread, deterministic algorithms on. "
        f"{len(rows)} of {planned} planned runs"
        + (" (**incomplete**: the missing runs are listed at the end)." if len(rows) < planned else "."),
        "Every number below except the seconds is reproduced exactly by rerunning on CPU: "
        f"`python examples/mqar/study.py{'' if args.sweep == 'cpu' else ' --' + args.sweep}` (or the same with "
        "`--shard 0/2` and `--shard 1/2` in two processes, then `--report`; the shards give the same rows).",
        "",
        f"Common: 2 layers, vocab {sweep['vocab']}, batch {sweep['batch']}, AdamW (weight decay 0.1, betas "
        "0.9/0.98), 10% linear warm-up then cosine decay, gradient clipping 1.0, seeds "
        f"{sorted({r['seed'] for r in rows})}. Accuracy on 512 held-out sequences. ESS and TSS after the last "
        "step on a fixed held-out probe batch of 16 at index i = 2 kv, summed over heads/channels (a head "
        "counts once per value channel) and layers; TSS counts i cached tokens per channel for attention.",
        "",
        "## Per family: accuracy range and settings",
        "",
        "| family | lr | steps | configurations x seeds | accuracy min - max | failed (< 0.5) | "
        f"solved (>= {SOLVED_AT}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in mixers:
        fam = sweep["families"][m]
        sel = [r for r in rows if r["mixer"] == m]
        acc = [r["accuracy"] for r in sel]
        lines.append(
            f"| {m} | {fam['lr']:g} | {fam['steps']} | {len({r['config'] for r in sel})} x "
            f"{len({r['seed'] for r in sel})} | {min(acc):.3f} - {max(acc):.3f} | "
            f"{sum(a < FAIL_BELOW for a in acc)} | {sum(a >= SOLVED_AT for a in acc)} |"
        )
    if pilot:
        lines += ["", "## How the settings were chosen", "", pilot.strip()]
    lines += [
        "",
        "## Correlation of accuracy with ESS/kv and TSS/kv",
        "",
        f"Value [95% percentile bootstrap interval over runs, {BOOTSTRAP} resamples, NumPy seed "
        f"{BOOTSTRAP_SEED}; resamples with a constant column are dropped]. Spearman uses average ranks "
        "for ties. *difference* = correlation with ESS/kv minus correlation with TSS/kv, its interval from "
        "paired resamples (the same runs for both): an interval above 0 means ESS/kv correlates more "
        "strongly. Seeds of one configuration are resampled as independent runs, so the intervals are "
        "somewhat too narrow.",
        "",
    ]
    lines += corr_table([("all", rows)] + [(m, [r for r in rows if r["mixer"] == m]) for m in mixers])
    failed = [r for r in rows if r["accuracy"] < FAIL_BELOW]
    for r in rows:
        r["bigger_solved"] = bigger_state_solved(r, rows) if r in failed else "-"
    lines += [
        "",
        f"## Failed runs (accuracy < {FAIL_BELOW}): saturation or collapse",
        "",
        f"`esswatch.tools.diagnosis.diagnose(utilization)`: saturated when utilization >= {SATURATED_AT} "
        f"(the state the model has is full: give it more state, i.e. more heads, a wider key/state "
        f"dimension or a larger d_state, or fewer items to hold), collapsed when < {COLLAPSED_BELOW} "
        "(capacity is there but unused: change the training, i.e. learning rate, steps, warm-up, "
        "gate/step-size initialization, a short convolution, the ESS regularizer), intermediate between. "
        "Utilization = ESS / min(TSS, i, L - i) per channel at i = 2 kv, mean over layers, channels and "
        "probe rows. `esswatch report <logdir>/<run>` prints the same diagnosis per layer.",
        "",
        "Check of the advice against the sweep itself: *size fixed it* = a configuration of the same family "
        f"with a larger TSS on the same task (kv, L) reached >= {SOLVED_AT} (mean over its seeds), i.e. more "
        "state was a fix that worked, which the diagnosis should call saturation.",
        "",
        "| family | runs | failed | saturated | intermediate | collapsed | size fixed it (sat. / int. / coll.) | "
        "utilization of failed (mean) | utilization of solved (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in mixers:
        sel = [r for r in rows if r["mixer"] == m]
        fail = [r for r in failed if r["mixer"] == m]
        ok = [r for r in sel if r["accuracy"] >= SOLVED_AT]
        counts = [sum(r["diagnosis"] == k for r in fail) for k in ("saturated", "intermediate", "collapsed")]
        mu = lambda rs: f"{np.mean([r['utilization'] for r in rs]):.3f}" if rs else "-"
        fixed = [
            sum(r["diagnosis"] == k and r["bigger_solved"] == "yes" for r in fail)
            for k in ("saturated", "intermediate", "collapsed")
        ]
        lines.append(
            f"| {m} | {len(sel)} | {len(fail)} | "
            + " | ".join(map(str, counts))
            + " | "
            + " / ".join(map(str, fixed))
            + f" | {mu(fail)} | {mu(ok)} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| family | configuration | seed | accuracy | ESS | TSS | ESS/kv | TSS/kv | utilization | diagnosis | "
        "size fixed it | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mixer']} | {r['config']} | {r['seed']} | {r['accuracy']:.3f} | {r['ess']:.1f} | "
            f"{r['tss']:.0f} | {r['ess_per_kv']:.2f} | {r['tss_per_kv']:.1f} | {r['utilization']:.3f} | "
            f"{r['diagnosis']} | {r['bigger_solved']} | {r['seconds']:.0f} |"
        )
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
    mixers = [m for m in MIXER_ORDER if any(r["mixer"] == m for r in rows)]
    fig, axes = plt.subplots(2, len(mixers) + 1, figsize=(3.2 * (len(mixers) + 1), 6.2), sharey=True, squeeze=False)
    markers = dict(zip(MIXER_ORDER, "osD^"))
    for row, (key, label) in enumerate((("ess_per_kv", "ESS / kv"), ("tss_per_kv", "TSS / kv"))):
        for col, group in enumerate(["all"] + mixers):
            ax = axes[row, col]
            for m in mixers if group == "all" else [group]:
                sel = [r for r in rows if r["mixer"] == m]
                ax.scatter(
                    [r[key] for r in sel],
                    [r["accuracy"] for r in sel],
                    marker=markers[m],
                    label=m,
                    alpha=0.75,
                    color=f"C{MIXER_ORDER.index(m)}",
                )
            sel = rows if group == "all" else [r for r in rows if r["mixer"] == group]
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.axhline(FAIL_BELOW, color="gray", lw=0.6, ls=":")
            ax.set_xlabel(label + " (log)")
            rho = spearman([r["accuracy"] for r in sel], [r[key] for r in sel]) if len(sel) >= 3 else float("nan")
            ax.set_title(f"{group}: Spearman {rho:.2f}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel("MQAR accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- the regularizer experiment -------------------------------------------------------------
def regularizer_experiment(sweep: Dict, args, out: Path) -> str:
    rc = sweep["regularizer"]
    csv_path = out / "regularizer.csv"
    if not args.resume:
        csv_path.unlink(missing_ok=True)
    done = {(r["seed"], r["weight"]) for r in read_rows(csv_path, REG_FIELDS)}
    for seed in rc["seeds"]:
        for weight in (0.0, rc["weight"]):
            if (seed, weight) in done:
                continue
            cfg = TrainConfig(
                mixer=rc["mixer"],
                d_model=rc["d_model"],
                seq_len=rc["seq_len"],
                num_kv=rc["num_kv"],
                vocab_size=sweep["vocab"],
                batch_size=sweep["batch"],
                steps=rc["steps"],
                lr=rc["lr"],
                seed=seed,
                mixer_kwargs=dict(rc["kwargs"]),
                eval_every=0,
                eval_size=512,
            )
            r = run_one(
                cfg, Path(args.logdir) / "regularizer", args.device, regularizer=weight, name=f"w{weight:g}-s{seed}"
            )
            row = dict(
                seed=seed,
                weight=weight,
                accuracy=r["accuracy"],
                loss=r["loss"],
                ess=r["ess"],
                utilization=r["utilization"],
                seconds=r["seconds"],
                seconds_per_step=r["seconds"] / rc["steps"],
            )
            append_row(csv_path, row, REG_FIELDS)
            print(
                "[regularizer] "
                + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                flush=True,
            )
    rows = read_rows(csv_path, REG_FIELDS)
    kw = ", ".join(f"{k}={v}" for k, v in sorted(rc["kwargs"].items()))
    lines = [
        "# The ESS regularizer on a collapsing MQAR configuration",
        "",
        f"{rc['mixer']} (d_model {rc['d_model']}, {kw}, 2 layers, no short convolution) on MQAR (kv "
        f"{rc['num_kv']}, L {rc['seq_len']}, vocab {sweep['vocab']}), batch {sweep['batch']}, {rc['steps']} "
        f"steps, lr {rc['lr']:g}, device {args.device}, one torch thread; `ESSWatch(regularizer=w)` with "
        f"`loss + watch.penalty()`, w = 0 (off) and w = {rc['weight']:g}, same seeds, data and "
        "initialization. Accuracy on 512 held-out sequences; ESS (summed over heads and layers) and utilization "
        "at i = 2 kv on the probe batch after the last step. Seconds are wall-clock on a shared machine (the "
        "only numbers a rerun does not reproduce).",
        "",
        "| seed | weight | accuracy | utilization | ESS | seconds/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], r["weight"])):
        lines.append(
            f"| {r['seed']} | {r['weight']:g} | {r['accuracy']:.3f} | {r['utilization']:.3f} | "
            f"{r['ess']:.1f} | {r['seconds_per_step'] * 1e3:.1f} ms |"
        )
    summary = {}
    for w in sorted({r["weight"] for r in rows}):
        sel = [r for r in rows if r["weight"] == w]
        summary[w] = sel
        lines.append(
            f"| mean ({len(sel)} seeds) | {w:g} | {np.mean([r['accuracy'] for r in sel]):.3f} | "
            f"{np.mean([r['utilization'] for r in sel]):.3f} | {np.mean([r['ess'] for r in sel]):.1f} | "
            f"{np.median([r['seconds_per_step'] for r in sel]) * 1e3:.1f} ms (median) |"
        )
    if len(summary) == 2:
        off, on = summary[0.0], summary[rc["weight"]]
        pairs = [(a, b) for a in off for b in on if a["seed"] == b["seed"]]
        if pairs:
            gain = [b["accuracy"] - a["accuracy"] for a, b in pairs]
            ratio = [b["seconds_per_step"] / a["seconds_per_step"] for a, b in pairs]
            lines += [
                "",
                f"Accuracy with minus without, per seed: {', '.join(f'{g:+.3f}' for g in gain)} "
                f"(mean {np.mean(gain):+.3f}; better in {sum(g > 0 for g in gain)} of {len(gain)} seeds). "
                f"Cost: seconds per step with / without, per seed: "
                f"{', '.join(f'{x:.2f}' for x in ratio)} (median {np.median(ratio):.2f}x; shared machine).",
            ]
    cost = regularizer_cost(sweep, args.device)
    with (out / "regularizer_cost.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["repeat", "weight", "seconds_per_step"])
        w.writeheader()
        w.writerows(cost)
    ratios = [
        next(c["seconds_per_step"] for c in cost if c["repeat"] == r and c["weight"] > 0)
        / next(c["seconds_per_step"] for c in cost if c["repeat"] == r and c["weight"] == 0)
        for r in sorted({c["repeat"] for c in cost})
    ]
    base = np.median([c["seconds_per_step"] for c in cost if c["weight"] == 0])
    lines += [
        "",
        f"Cost, timed separately (`regularizer_cost.csv`): {len(ratios)} repeats, each a fresh model run "
        "without and with the regularizer in alternating order, median time of steps 3-29; one torch "
        f"thread, shared machine. Regularized / plain step time: median {np.median(ratios):.2f}x "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); plain step median {base * 1e3:.1f} ms.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "regularizer.md").write_text(text)
    return text


def regularizer_cost(sweep: Dict, device: str, repeats: int = 5, steps: int = 30) -> List[Dict]:
    """Seconds per training step without and with the regularizer, interleaved (off, on, on, off, ...) so that
    the shared machine's load hits both alike: per repeat, the median step time of steps 3..steps-1 of a fresh
    model (seed 0) with ``ESSWatch`` attached (measuring only at step 0)."""
    import torch.nn.functional as F

    from esswatch.demo.mqar import MQAR

    rc = sweep["regularizer"]
    out = []
    for rep in range(repeats):
        for weight in (0.0, rc["weight"]) if rep % 2 == 0 else (rc["weight"], 0.0):
            cfg = TrainConfig(
                mixer=rc["mixer"],
                d_model=rc["d_model"],
                seq_len=rc["seq_len"],
                num_kv=rc["num_kv"],
                vocab_size=sweep["vocab"],
                batch_size=sweep["batch"],
                steps=steps,
                lr=rc["lr"],
                seed=0,
                mixer_kwargs=dict(rc["kwargs"]),
            )
            model = build_model(cfg, device)
            opt = torch.optim.AdamW(model.parameters(), lr=rc["lr"])
            data = MQAR(cfg.seq_len, cfg.num_kv, cfg.vocab_size, cfg.batch_size, seed=0)
            times = []
            with esswatch.ESSWatch(
                model, every_n_steps=10**9, histograms=False, images=False, regularizer=weight or None
            ) as watch:
                for _ in range(steps):
                    t0 = time.perf_counter()
                    x, y = (t.to(device) for t in data.batch())
                    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
                    (loss + watch.penalty()).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    watch.step()
                    times.append(time.perf_counter() - t0)
            out.append(dict(repeat=rep, weight=weight, seconds_per_step=float(np.median(times[3:]))))
    return out


# -- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--large", action="store_const", const="large", dest="sweep", help="the GPU-sized sweep")
    g.add_argument("--quick", action="store_const", const="quick", dest="sweep", help="under a minute, tiny runs")
    ap.set_defaults(sweep="cpu")
    ap.add_argument("--mixers", nargs="+", default=list(MIXER_ORDER), choices=MIXER_ORDER)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shard", default="0/1", help="k/n: run every n-th planned run starting at k (own shard file)")
    ap.add_argument("--report", action="store_true", help="no training: merge the shard files and write the results")
    ap.add_argument("--regularizer", action="store_true", help="run the regularizer experiment instead of the sweep")
    ap.add_argument("--logdir", default="runs/mqar_study")
    ap.add_argument("--out", default=str(HERE), help="folder for results.csv, results.md, plot.png, regularizer.*")
    ap.add_argument("--resume", action="store_true", help="keep finished runs and skip them")
    args = ap.parse_args(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(args.device == "cpu" or deterministic)
    try:
        return _main(args)
    finally:  # leave the caller's process as it was (tests call main())
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _main(args) -> int:
    sweep = SWEEPS[args.sweep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.regularizer:
        print(regularizer_experiment(sweep, args, out))
        return 0
    k, n = (int(v) for v in args.shard.split("/"))
    if not 0 <= k < n:
        raise SystemExit(f"--shard must be k/n with 0 <= k < n, got {args.shard}")
    runs = plan(sweep, args.mixers)
    shard_path = out / f"results.shard{k}of{n}.csv"
    if not args.report:
        if not args.resume:
            shard_path.unlink(missing_ok=True)
        done = {run_key(r) for p in out.glob("results*.csv") for r in read_rows(p)} if args.resume else set()
        t0 = time.perf_counter()
        mine = runs[k::n]
        for j, (mixer, c, seed) in enumerate(mine, 1):
            name = config_name(mixer, c)
            if (mixer, name, seed) in done:
                continue
            row = run_one(train_config(mixer, c, seed, sweep), Path(args.logdir), args.device, name=f"{name}-s{seed}")
            row["config"] = name
            append_row(shard_path, row)
            print(
                f"[{j}/{len(mine)} {time.perf_counter() - t0:.0f}s] "
                + json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}),
                flush=True,
            )
        if n > 1:
            print(f"shard {k}/{n} done; merge with --report")
            return 0
    # merge: results.csv and every shard file, in the planned order
    found = {}
    for p in [out / "results.csv"] + sorted(out.glob("results.shard*.csv")):
        for r in read_rows(p):
            found[run_key(r)] = r
    order = {(m, config_name(m, c), s): i for i, (m, c, s) in enumerate(runs)}
    rows = sorted((r for key, r in found.items() if key in order), key=lambda r: order[run_key(r)])
    write_rows(out / "results.csv", rows)
    for p in out.glob("results.shard*.csv"):
        p.unlink()
    pilot_path = HERE / "pilot.md"
    pilot = pilot_path.read_text() if args.sweep == "cpu" and pilot_path.exists() else ""
    text = write_markdown(rows, out / "results.md", args, sweep, len(runs), pilot)
    missing = [f"{m} {config_name(m, c)} seed {s}" for (m, c, s) in runs if (m, config_name(m, c), s) not in found]
    if missing:
        with (out / "results.md").open("a") as f:
            f.write("\n## Missing runs\n\n" + "\n".join(f"- {x}" for x in missing) + "\n")
    plot(rows, out / "plot.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
