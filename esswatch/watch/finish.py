"""The end of a measured sample, on the training thread: apply the failure policy to the
layers that failed, fix the ``budget_seconds`` choice after the first sample, all-reduce over
ranks (``reduce=True``), assemble the result and hand it to the sinks.

:func:`finish` is the one function both the blocking path (:meth:`ESSWatch.measure`) and the
background path (:mod:`esswatch.watch.offload`) end in. It touches the watch's failure policy,
budget, emitter and sample counters, and nothing of the capture.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

from . import budget as budget_mod
from . import distributed as dist_utils
from .failures import ESSWarning
from .result import build_result, warn_empty

__all__ = ["finish"]


def finish(watch: Any, outcome: Any) -> Optional[Dict[str, Any]]:
    """The result of ``outcome`` (``None`` when nothing was recorded on any rank), emitted."""
    step = outcome.step
    errors = list(outcome.errors)
    if outcome.fatal is not None:
        errors.append(("<esswatch worker>", outcome.fatal))
    policy = watch._policy
    skipped: List[str] = []
    for name, e in errors:
        policy.fail(name, step, e)
        skipped.append(name)
    budget = watch._budget
    if budget is not None and not budget.decided and outcome.calibrated:
        _decide_budget(watch, outcome)
    layers, failures = outcome.layers, policy.count
    if watch.reduce:
        layers, failures = dist_utils.reduce_layers(layers, watch.layer_names, watch.measure_config.metrics, failures)
    if not layers and not skipped and failures == policy.count:
        if not watch._warned_empty and not outcome.short:
            watch._warned_empty = True
            warn_empty(step, watch._train_only)
        return None
    result = build_result(
        outcome,
        layers,
        watch.measure_config.metrics,
        failures=failures,
        skipped=skipped,
        skipped_samples=watch._skipped_samples,
        budget=None if budget is None else budget.as_dict(),
    )
    watch._latest = result
    watch._samples += 1
    watch._emitter.emit(result, watch.config)
    return result


def _decide_budget(watch: Any, outcome: Any) -> None:
    """Fix the measured rows / indices / heads from the first sample's timings."""
    agree = budget_mod.agree_min if watch.reduce and dist_utils.world_size() > 1 else None
    if budget_mod.apply(watch._budget, outcome, watch, agree):
        watch._budget_gen += 1
    if watch._budget.warning:
        warnings.warn(watch._budget.warning, ESSWarning, stacklevel=5)
