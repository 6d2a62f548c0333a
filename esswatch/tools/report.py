"""``esswatch report LOGDIR``: the latest per-layer ESS of TensorBoard runs, as a text table.

Reads the event files only (TensorBoard's ``EventAccumulator``), so it works over SSH
on any run ESSWatch wrote: plain loops, the Lightning loggers and the Hugging Face
callback (which writes the plain ``ess/...`` tags through the Trainer's own TensorBoard
writer), also a logdir that mixes them. Every directory under ``LOGDIR`` holding
``events.out.tfevents.*`` files is one run. Tags are parsed only by
:func:`esswatch.watch.tags.parse_tag` (statistics: :data:`esswatch.watch.tags.STATS`),
under any logger prefix: ``ess/...`` as esswatch writes them, or ``<prefix>/ess/...``
when another logger put its namespace in front (e.g. ``train/ess/...`` from a Trainer
``report_to`` integration fed by the log stream); a run whose ESS tags come under two
prefixes gives one report per prefix.

Per run, metric and layer it shows the last logged step, the average ESS, the total ESS,
the utilization ESS / TSS and, as the trend, the change of the average ESS and of the
utilization over the last ``k`` logged points (last value minus the value ``k - 1``
points earlier). The model-wide line comes last. A damaged event file is named, and what
could be read before the damage is reported. ``--json`` is strict JSON: NaN and
infinities are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

from ..watch.tags import MODEL, parse_tag
from .diagnosis import diagnose_summary, diagnosis_lines
from .events import check_event_file, event_files, loader_stops

__all__ = ["find_runs", "read_run", "read_runs", "format_report", "report", "validate_window"]


def validate_window(k: Any) -> int:
    """``k`` (the trend window) as an int >= 2, else ``ValueError`` saying what is allowed."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"--last must be an integer >= 2 (the trend window, in logged points), got {k!r}")
    return k


def find_runs(logdir: str | os.PathLike) -> List[Path]:
    """Directories under ``logdir`` (itself included) that contain TensorBoard event files."""
    root = Path(logdir)
    if root.is_file() and root.name.startswith("events.out.tfevents"):  # one event file, as TensorBoard takes it
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory or event file: {root}")
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


def _finite(v: Optional[float]) -> Optional[float]:
    return v if v is None or math.isfinite(v) else None


def read_runs(run: str | os.PathLike, k: int = 5) -> List[Dict[str, Any]]:
    """Summaries of one run directory, one per tag prefix (at least one)::

        {"run": path, "prefix": "" | "train/" | ..., "metrics": {metric: {layer: {"step", "points",
            "avg", "max", "total", "utilization", "trend_avg", "trend_utilization"}}},
         "failures": float | None, "other": {tag: (step, value)}, "corrupt": [{"file", "error",
            "events_before"}]}

    ``layer`` is the tag's layer component (``model`` = the whole model). Values are the
    event files' latest values (NaN stays NaN here); trends are ``None`` with fewer than two
    points. ``other`` holds the run's non-ESS scalars (shown once, on the first summary).
    """
    k = validate_window(k)
    with loader_stops() as stopped:
        try:
            acc = _load(Path(run))
            failed = None
        except Exception as e:  # noqa: BLE001 - e.g. a record that is not an Event: report what is known
            acc, failed = None, e
    files = event_files(run)
    suspects = files if failed is not None else [f for f in files if os.path.realpath(f) in stopped]
    corrupt = [c for c in (check_event_file(f) for f in suspects) if c is not None]
    if failed is not None and not corrupt:
        corrupt = [
            {
                "file": str(run),
                "error": f"TensorBoard could not read it ({type(failed).__name__}: {failed})",
                "events_before": None,
            }
        ]
    by_prefix: Dict[str, Dict[str, Any]] = {}
    other: Dict[str, Any] = {}

    def summary(prefix: str) -> Dict[str, Any]:
        return by_prefix.setdefault(prefix, {"metrics": {}, "failures": None})

    for tag in acc.Tags().get("scalars", []) if acc is not None else []:
        events = acc.Scalars(tag)
        if not events:
            continue
        t = parse_tag(tag)
        if t is None:
            other[tag] = (events[-1].step, events[-1].value)
        elif t.kind == "stat":
            row = summary(t.prefix)["metrics"].setdefault(t.metric, {}).setdefault(t.layer, {})
            row[t.stat] = events[-1].value
            row["step"] = max(row.get("step", -1), events[-1].step)
            row["points"] = len(events)
            if t.stat in ("avg", "utilization"):
                window = events[-k:]
                row[f"trend_{t.stat}"] = window[-1].value - window[0].value if len(window) > 1 else None
        elif t.kind == "failures":
            summary(t.prefix)["failures"] = events[-1].value
    out = []
    for prefix in sorted(by_prefix) or [""]:
        s = by_prefix.get(prefix, {"metrics": {}, "failures": None})
        ordered = {}
        for metric in sorted(s["metrics"]):
            layers = s["metrics"][metric]
            names = sorted((n for n in layers if n != MODEL), key=_natural) + ([MODEL] if MODEL in layers else [])
            ordered[metric] = {n: layers[n] for n in names}
        out.append(
            {
                "run": str(run),
                "prefix": prefix,
                "metrics": ordered,
                "failures": s["failures"],
                "other": other if not out else {},
                "corrupt": corrupt if not out else [],
            }
        )
    return out


def read_run(run: str | os.PathLike, k: int = 5) -> Dict[str, Any]:
    """The first summary of :func:`read_runs` (the run's only one unless it mixes prefixes)."""
    return read_runs(run, k)[0]


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
        out.append(f"run: {name}" + (f"  (tags under {s['prefix']})" if s.get("prefix") else ""))
        for c in s.get("corrupt", ()):
            fname = os.path.relpath(c["file"], root) if root else c["file"]
            before = "" if c["events_before"] is None else f" ({c['events_before']} events before the damage)"
            out.append(f"  corrupt event file: {fname}: {c['error']}; reporting what could be read{before}")
        if not s["metrics"]:
            out.append("  (no ESS scalars: not an ESSWatch run?)")
        for metric, layers in s["metrics"].items():
            header = ["layer", "step", "ESS avg", f"d avg/{k}", "ESS total", "util", f"d util/{k}"]
            rows = [
                [
                    layer,
                    str(r.get("step", "-")),
                    _num(r.get("avg")),
                    _num(r.get("trend_avg"), True),
                    _num(r.get("total")),
                    _num(r.get("utilization")),
                    _num(r.get("trend_utilization"), True),
                ]
                for layer, r in layers.items()
            ]
            out.append(f"  {metric}-ESS (d = change over the last {k} logged points)")
            out.extend("    " + ln for ln in _table(header, rows))
        out.extend(diagnosis_lines(s))  # saturation / collapse per layer (esswatch.tools.diagnosis)
        if s["failures"]:
            out.append(f"  skipped layer measurements: {int(s['failures'])}")
        if s["other"]:
            shown = ", ".join(f"{t} {v:.4g} (step {st})" for t, (st, v) in sorted(s["other"].items())[:12])
            out.append(f"  other scalars: {shown}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _strict(x: Any) -> Any:
    """``x`` with every non-finite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(x, float):
        return _finite(x)
    if isinstance(x, dict):
        return {key: _strict(v) for key, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def to_json(summaries: Sequence[Dict[str, Any]], logdir: str) -> List[Dict[str, Any]]:
    """The ``--json`` document: strict JSON data (NaN and infinities as ``None``), run paths
    relative to ``logdir``."""
    out = []
    for s in summaries:
        s = dict(
            s,
            run=os.path.relpath(s["run"], logdir),
            other={t: {"step": st, "value": v} for t, (st, v) in s["other"].items()},
            corrupt=[dict(c, file=os.path.relpath(c["file"], logdir)) for c in s.get("corrupt", ())],
            diagnosis=diagnose_summary(s),
        )  # {layer: {utilization, label, advice}}
        out.append(_strict(s))
    return out


def report(logdir: str, k: int = 5, as_json: bool = False, stream: Optional[TextIO] = None) -> int:
    """Print the report of every run under ``logdir``; returns a process exit code (0: some
    run has ESS scalars, 1: none has)."""
    import sys

    k = validate_window(k)
    stream = sys.stdout if stream is None else stream
    runs = find_runs(logdir)
    if not runs:
        print(f"esswatch report: no TensorBoard event files under {logdir}", file=sys.stderr)
        return 1
    summaries = [s for r in runs for s in read_runs(r, k)]
    if as_json:
        json.dump(to_json(summaries, logdir), stream, indent=1, allow_nan=False)
        stream.write("\n")
    else:
        stream.write(format_report(summaries, k, root=logdir))
    return 0 if any(s["metrics"] for s in summaries) else 1
