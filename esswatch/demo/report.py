"""``esswatch report LOGDIR``: the latest per-layer ESS of TensorBoard runs, as a text table.

Reads the event files only (TensorBoard's ``EventAccumulator``), so it works over SSH
on any run ESSWatch wrote: plain loops, the Lightning ``TensorBoardLogger`` and the
Hugging Face callback use the same tags (:mod:`esswatch.watch.tags`). Every directory
under ``LOGDIR`` holding ``events.out.tfevents.*`` files is one run.

Per run, metric and layer (``ess/<metric>/<stat>/<layer>``) it shows the last logged
step, the average ESS, the total ESS, the utilization ESS / TSS and, as the trend, the
change of the average ESS and of the utilization over the last ``k`` logged points
(last value minus the value ``k - 1`` points earlier). The model-wide line comes last.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

from .diagnosis import diagnose_summary, diagnosis_lines

__all__ = ["find_runs", "read_run", "format_report", "report"]

_STATS = ("avg", "max", "total", "utilization")


def find_runs(logdir: str | os.PathLike) -> List[Path]:
    """Directories under ``logdir`` (itself included) that contain TensorBoard event files."""
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(f.startswith("events.out.tfevents") for f in filenames):
            runs.append(Path(dirpath))
    return runs


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _load(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
    acc.Reload()
    return acc


def read_run(run: str | os.PathLike, k: int = 5) -> Dict[str, Any]:
    """Summary of one run directory::

        {"run": path, "metrics": {metric: {layer: {"step", "points", "avg", "max", "total",
                                                  "utilization", "trend_avg", "trend_utilization"}}},
         "failures": float | None, "other": {tag: (step, value)}}

    ``layer`` is the tag's layer component (``model`` = the whole model). Values are the
    event file's latest values; trends are ``None`` with fewer than two points.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    acc = _load(Path(run))
    metrics: Dict[str, Dict[str, Dict[str, Any]]] = {}
    other: Dict[str, Any] = {}
    failures = None
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        if not events:
            continue
        parts = tag.split("/", 3)
        if len(parts) == 4 and parts[0] == "ess" and parts[2] in _STATS:
            _, metric, stat, layer = parts
            row = metrics.setdefault(metric, {}).setdefault(layer, {})
            row[stat] = events[-1].value
            row["step"] = max(row.get("step", -1), events[-1].step)
            row["points"] = len(events)
            if stat in ("avg", "utilization"):
                window = events[-k:]
                row[f"trend_{stat}"] = window[-1].value - window[0].value if len(window) > 1 else None
        elif tag == "ess/failures":
            failures = events[-1].value
        elif not tag.startswith("ess/"):
            other[tag] = (events[-1].step, events[-1].value)
    ordered = {}
    for metric in sorted(metrics):
        layers = metrics[metric]
        names = sorted((n for n in layers if n != "model"), key=_natural) + (["model"] if "model" in layers else [])
        ordered[metric] = {n: layers[n] for n in names}
    return {"run": str(run), "metrics": ordered, "failures": failures, "other": other}


def _num(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_report(summaries: Sequence[Dict[str, Any]], k: int = 5, root: Optional[str] = None) -> str:
    """The text tables of :func:`report`."""
    out: List[str] = []
    for s in summaries:
        name = os.path.relpath(s["run"], root) if root else s["run"]
        out.append(f"run: {name}")
        if not s["metrics"]:
            out.append("  (no ESS scalars: not an ESSWatch run?)")
        for metric, layers in s["metrics"].items():
            header = ["layer", "step", "ESS avg", f"d avg/{k}", "ESS total", "util", f"d util/{k}"]
            rows = [[layer, str(r.get("step", "-")), _num(r.get("avg")), _num(r.get("trend_avg"), True),
                     _num(r.get("total")), _num(r.get("utilization")), _num(r.get("trend_utilization"), True)]
                    for layer, r in layers.items()]
            out.append(f"  {metric}-ESS (d = change over the last {k} logged points)")
            out.extend("    " + ln for ln in _table(header, rows))
        out.extend(diagnosis_lines(s))   # saturation / collapse per layer (esswatch.demo.diagnosis)
        if s["failures"]:
            out.append(f"  skipped layer measurements: {int(s['failures'])}")
        if s["other"]:
            shown = ", ".join(f"{t} {v:.4g} (step {st})" for t, (st, v) in sorted(s["other"].items())[:12])
            out.append(f"  other scalars: {shown}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def report(logdir: str, k: int = 5, as_json: bool = False, stream: Optional[TextIO] = None) -> int:
    """Print the report of every run under ``logdir``; returns a process exit code."""
    import sys

    stream = sys.stdout if stream is None else stream
    runs = find_runs(logdir)
    if not runs:
        print(f"esswatch report: no TensorBoard event files under {logdir}", file=sys.stderr)
        return 1
    summaries = [read_run(r, k) for r in runs]
    if as_json:
        for s in summaries:
            s["run"] = os.path.relpath(s["run"], logdir)
            s["other"] = {t: {"step": st, "value": v} for t, (st, v) in s["other"].items()}
            s["diagnosis"] = diagnose_summary(s)   # {layer: {utilization, label, advice}}
        json.dump(summaries, stream, indent=1)
        stream.write("\n")
    else:
        stream.write(format_report(summaries, k, root=logdir))
    return 0 if any(s["metrics"] for s in summaries) else 1
