"""Assembly of one result of an :class:`~esswatch.ESSWatch` (the plain-data dict of
:meth:`~esswatch.ESSWatch.latest`, handed to every sink) from a measured sample; its tags come
from :func:`esswatch.watch.tags.scalar_tags`::

    {"step": int, "source": "train" | "probe", "metrics": ["entropy", ...],
     "layers": {name: {"type", "seq_len", "state_size", "value_dim", "rows", "heads",
                       "indices": [i, ...], "tss": [TSS_i, ...],
                       "entropy": {"avg", "max", "total", "utilization",
                                   "per_index": [...], "per_head": [...]}, ...}},
     "model": {"entropy": {"avg", "max", "total", "utilization"}, ...},
     "failures": int, "skipped": [names], "seconds": float, "skipped_samples": int,
     "scalars": {tag: value},
     "budget": {...}            # with budget_seconds
     "penalty": {"total", "layers": {name: term}, "micro_batches"}}   # regularizer steps

A sampled step that ``background=True`` skips (the worker was still busy) but whose forward
the regularizer penalized gets a *penalty-only* result (:func:`penalty_result`): ``{"step",
"source", "metrics", "layers": {}, "model": {}, "skipped": [], "skipped_samples", "penalty",
"scalars"}``, so ``ess/penalty/*`` and ``ess/skipped`` are logged at that step; it has no ESS
values, no ``failures`` and no ``seconds`` (nothing was measured) and is not ``latest()``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Sequence

from .._version import __version__
from .failures import ESSWarning
from .measure import aggregate_model
from .tags import FAILURES_TAG, scalar_tags

__all__ = ["build_result", "penalty_result", "warn_empty", "watch_config"]


def build_result(
    outcome: Any,
    layers: Dict[str, Any],
    metrics: Sequence[str],
    *,
    failures: int,
    skipped: List[str],
    skipped_samples: int,
    budget: Optional[Dict[str, Any]],
) -> Dict[str, Any]:
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


def penalty_result(
    step: int, source: str, metrics: Sequence[str], penalty: Dict[str, Any], skipped_samples: int
) -> Dict[str, Any]:
    """The penalty-only result of a skipped sample (module doc)."""
    result: Dict[str, Any] = {
        "step": step,
        "source": source,
        "metrics": list(metrics),
        "layers": {},
        "model": {},
        "skipped": [],
        "skipped_samples": skipped_samples,
        "penalty": penalty,
    }
    scalars = scalar_tags(result)
    del scalars[FAILURES_TAG]  # not counted here (a reduced count under DDP comes with measured results)
    result["scalars"] = scalars
    return result


def warn_empty(step: int, train_only: bool) -> None:
    """A sampled step recorded nothing (warned once per watch by the caller)."""
    warnings.warn(
        f"esswatch: step {step} was sampled but no watched layer ran a "
        f"{'training-mode ' if train_only else ''}forward to its end since the previous step() "
        "(call watch.step() once per optimizer step, after the forward and backward), or each skipped its calls "
        "(a capture warning says why: e.g. packed cu_seq_lens calls or a KV cache)",
        ESSWarning,
        stacklevel=5,
    )


def watch_config(watch: Any) -> Dict[str, Any]:
    """:meth:`ESSWatch.config`: the configuration as plain data (what the TensorBoard text shows)."""
    capture, budget = watch.capture, watch._budget
    return {
        "every_n_steps": watch.schedule.every_n_steps,
        "sampling": "probe batch" if watch.probe_batch is not None else "training forward",
        "batch_rows": capture.batch_rows,
        "heads": capture.heads,
        **watch.measure_config.as_dict(),
        "strict": watch.strict,
        "reduce": watch.reduce,
        "background": watch.background,
        "train_forwards_only": watch._train_only,
        **({"step_base": watch.step_base} if watch.step_base else {}),
        "regularizer": None if watch.regularizer is None else dataclasses.asdict(watch.regularizer),
        **({} if budget is None else {"budget_seconds": budget.seconds, "budget": budget.as_dict()}),
        "layers": {n: f"{type(p.module).__name__}: {p.layer_type}" for n, p in capture.probes.items()},
        "esswatch": __version__,
    }
