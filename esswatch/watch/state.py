"""An :class:`~esswatch.ESSWatch` checkpoint (``state_dict``): writing it, validating it, applying it.

:func:`state_of` writes it; :func:`validated_state` checks every field first and returns the plain
values to apply, so a bad checkpoint raises ``ValueError`` (naming the field and what is allowed)
and changes nothing; :func:`load_state` validates, then applies.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet

from ..engine.validation import check_positive_int
from .budget import restore, validated_level

__all__ = ["state_of", "load_state", "validated_state"]

_WHAT = "ESSWatch.load_state_dict"


def _count(state: Dict[str, Any], key: str, where: str = "") -> int:
    if key not in state:
        raise ValueError(f"{_WHAT}: missing key {where}{key!r} (a non-negative int)")
    return check_positive_int(f"{_WHAT}: {where}{key}", state[key], minimum=0)


def validated_state(state: Any) -> Dict[str, Any]:
    """``{"step", "failures", "failed_layers", "samples", "skipped_samples", "budget"}`` from an ESSWatch
    state (version 1; ``skipped_samples`` and ``budget`` may be missing in states written before them)."""
    if not isinstance(state, dict) or state.get("version") != 1:
        raise ValueError(f"{_WHAT}: not an ESSWatch state (a dict with version 1), got {type(state).__name__}")
    sched = state.get("schedule")
    if not isinstance(sched, dict):
        raise ValueError(f"{_WHAT}: 'schedule' must be a dict with a non-negative int 'step', got {sched!r}")
    step = _count(sched, "step", "schedule.")
    failures = _count(state, "failures")
    samples = _count(state, "samples")
    skipped = _count(state, "skipped_samples") if "skipped_samples" in state else 0
    layers = state.get("failed_layers", [])
    if (
        isinstance(layers, (str, bytes))
        or not isinstance(layers, (list, tuple, set, frozenset))
        or not all(isinstance(n, str) for n in layers)
    ):
        raise ValueError(f"{_WHAT}: failed_layers must be a list of layer names (str), got {layers!r}")
    failed: FrozenSet[str] = frozenset(layers)
    return {
        "step": step,
        "failures": failures,
        "failed_layers": set(failed),
        "samples": samples,
        "skipped_samples": skipped,
        "budget": validated_level(state.get("budget")),
    }


def state_of(watch: Any) -> Dict[str, Any]:
    """The checkpoint :meth:`ESSWatch.state_dict` writes (version 1; read by :func:`validated_state`)."""
    return {
        "version": 1,
        "schedule": watch.schedule.state_dict(),
        "failures": watch._policy.count,
        "failed_layers": sorted(watch._policy.names),
        "samples": watch._samples,
        "skipped_samples": watch._skipped_samples,
        "budget": None if watch._budget is None else watch._budget.as_dict(),
    }


def load_state(watch: Any, state: Any) -> None:
    """:meth:`ESSWatch.load_state_dict` without re-arming: validate every field of ``state``
    (:func:`validated_state`), then apply them all to ``watch``."""
    st = validated_state(state)
    watch.schedule.step = st["step"]
    watch._policy.count, watch._policy.names = st["failures"], st["failed_layers"]
    watch._samples, watch._skipped_samples = st["samples"], st["skipped_samples"]
    if watch._budget is not None and st["budget"] is not None and restore(watch._budget, st["budget"], watch):
        watch._budget_gen += 1  # what is captured changed (as after a decision)
