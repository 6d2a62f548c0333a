"""Assembly of one result of an :class:`~esswatch.ESSWatch` (the plain-data dict of
:meth:`~esswatch.ESSWatch.latest`) from a measured sample; its tags come from
:func:`esswatch.watch.tags.scalar_tags`."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

from .failures import ESSWarning
from .measure import aggregate_model
from .tags import scalar_tags

__all__ = ["build_result", "warn_empty"]


def build_result(outcome: Any, layers: Dict[str, Any], metrics: Sequence[str], *, failures: int,
                 skipped: List[str], skipped_samples: int, budget: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The result of ``outcome`` (a :class:`~esswatch.watch.background.Outcome`) with its
    (possibly all-reduced) ``layers`` and ``failures``, the model-wide aggregate and the tags."""
    result: Dict[str, Any] = {
        "step": outcome.step,
        "source": outcome.source,
        "metrics": list(metrics),
        "layers": layers,
        "model": aggregate_model(layers, metrics),
        "failures": failures,
        "skipped": skipped,
        "seconds": outcome.seconds,
        "skipped_samples": skipped_samples,
    }
    if budget is not None:
        result["budget"] = budget
    if outcome.penalty is not None:
        result["penalty"] = outcome.penalty
    result["scalars"] = scalar_tags(result)
    return result


def warn_empty(step: int, train_only: bool) -> None:
    """A sampled step recorded nothing (warned once per watch by the caller)."""
    warnings.warn(
        f"esswatch: step {step} was sampled but no watched layer ran a "
        f"{'training-mode ' if train_only else ''}forward since the previous step() "
        "(call watch.step() once per optimizer step, after the forward and backward)",
        ESSWarning, stacklevel=5)
