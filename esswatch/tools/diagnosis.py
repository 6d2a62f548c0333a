"""Saturation or collapse: what a layer's ESS utilization says about a model that fails to recall.

The ESS paper (Parnichkun et al., ICML 2025) explains a recall failure in one of two
ways, from the utilization ``ESS / TSS`` (effective over theoretical state size):

- **saturation**: utilization near 1. The state the model has is full; it needs more:
  a larger state (more heads, a wider key / state dimension, a larger ``d_state``) or an
  easier task (fewer items to hold at once).
- **collapse**: utilization far below 1. The capacity is there but the trained model does
  not use it: the fix is in training, not in size (learning rate, more steps, warm-up,
  initialization of the gates / step sizes, a short convolution before the mixer, or the
  ESS regularizer that rewards a larger ESS).

Between the two thresholds the evidence is weak either way. The thresholds are those of
``examples/mqar/study.py``, where they are checked against the accuracy of the runs.
Utilization only explains a failure: a model that already recalls well needs no fix,
whatever its utilization.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["SATURATED_AT", "COLLAPSED_BELOW", "diagnose", "diagnose_summary", "diagnosis_lines"]

#: utilization at or above which a failing layer counts as saturated
SATURATED_AT = 0.5
#: utilization below which a failing layer counts as collapsed
COLLAPSED_BELOW = 0.25

_ADVICE = {
    "saturated": "the state is full: give it more state (more heads, a wider key/state dimension, a larger "
    "d_state) or fewer items to hold",
    "collapsed": "the state is mostly unused: fix training, not size (learning rate, more steps, warm-up, "
    "gate/step-size initialization, a short convolution before the mixer, the ESS regularizer)",
    "intermediate": "between saturation and collapse: neither a larger state nor a training change is clearly "
    "indicated; try the training fixes first (they are cheaper)",
    "unknown": "no finite utilization was logged (no state size known for this layer, or the measurement failed)",
}


def diagnose(
    utilization: Optional[float], saturated_at: float = SATURATED_AT, collapsed_below: float = COLLAPSED_BELOW
) -> Tuple[str, str]:
    """``(label, advice)`` for a failing layer or model with this ESS utilization.

    ``label`` is ``"saturated"`` (``utilization >= saturated_at``), ``"collapsed"``
    (``utilization < collapsed_below``), ``"intermediate"`` or ``"unknown"`` (``None`` or
    not finite).
    """
    if not 0 <= collapsed_below <= saturated_at:
        raise ValueError(f"need 0 <= collapsed_below <= saturated_at, got {collapsed_below}, {saturated_at}")
    if utilization is None or not math.isfinite(float(utilization)):
        label = "unknown"
    elif utilization >= saturated_at:
        label = "saturated"
    elif utilization < collapsed_below:
        label = "collapsed"
    else:
        label = "intermediate"
    return label, _ADVICE[label]


def diagnose_summary(summary: Dict[str, Any], metric: str = "entropy") -> Dict[str, Dict[str, Any]]:
    """Per layer of one :func:`esswatch.tools.report.read_run` summary: ``{layer: {"utilization", "label",
    "advice"}}`` from the latest ``metric`` utilization (the layer ``model`` is the whole model)."""
    out = {}
    for layer, row in summary.get("metrics", {}).get(metric, {}).items():
        u = row.get("utilization")
        label, advice = diagnose(u)
        out[layer] = {"utilization": u, "label": label, "advice": advice}
    return out


def diagnosis_lines(summary: Dict[str, Any], metric: str = "entropy") -> List[str]:
    """Text lines for ``esswatch report``: the diagnosis per layer, if the model fails to recall."""
    diag = diagnose_summary(summary, metric)
    if not diag:
        return []
    lines = [
        f"  diagnosis from {metric}-ESS utilization (saturated >= {SATURATED_AT}, collapsed < "
        f"{COLLAPSED_BELOW}; it explains a failure, it does not detect one):"
    ]
    width = max(len(n) for n in diag)
    for layer, d in diag.items():
        u = "-" if d["utilization"] is None else f"{d['utilization']:.3f}"
        lines.append(f"    {layer.ljust(width)}  util {u}  {d['label']}: {d['advice']}")
    return lines
