"""The regularizer's bookkeeping inside an :class:`~esswatch.ESSWatch`.

:class:`PenaltyBook` turns the forward that just ran into the penalty to add to the loss
(:func:`~esswatch.watch.regularizer.penalty_terms`), keeps the detached terms of the current
step's micro-batches (logged as their mean on measured steps) and the *stash*: the operators
of the step's first penalized forward, which the step's measurement reuses instead of
capturing again. :func:`watch_penalty` is ``ESSWatch.penalty()`` over the watch's book.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ..probes import NothingToMeasure
from .failures import ESSWarning
from .regularizer import Regularizer, penalty_terms

__all__ = ["PenaltyBook", "watch_penalty", "NO_GRADIENT"]

NO_GRADIENT = (
    "its recorded operator carries no gradient, so its penalty term would train nothing: the term is left out of "
    "the penalty (the layer is still measured and logged). Causes: a frozen layer, an esswatch_operator that "
    "detaches, or reentrant activation checkpointing, which runs layers under no_grad (use use_reentrant=False: "
    "torch.utils.checkpoint, or gradient_checkpointing_kwargs={'use_reentrant': False} in Hugging Face)."
)


class PenaltyBook:
    def __init__(self, regularizer: Optional[Regularizer]) -> None:
        self.regularizer = regularizer
        self.stash: Optional[Dict[str, Any]] = None  # operators consumed by penalty() on a measured step
        self.log: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = []  # detached (total, terms) this step
        self.no_gradient: set = set()  # layers warned about a term without gradient (once each)

    def due(self, step: int) -> bool:
        """The regularizer penalizes step ``step``."""
        reg = self.regularizer
        return reg is not None and step % reg.every_n_steps == 0

    def _warn_no_gradient(self, name: str) -> None:
        if name not in self.no_gradient:
            self.no_gradient.add(name)
            warnings.warn(f"esswatch: layer {name!r}: {NO_GRADIENT}", ESSWarning, stacklevel=5)

    def reset(self) -> None:
        """A new step: forget the stash and the terms of the previous one."""
        self.stash = None
        self.log = []

    def penalty(
        self, capture: Any, on_error: Callable[[str, BaseException], None], stash: bool
    ) -> Union[float, torch.Tensor]:
        """The penalty of what ``capture`` recorded (then cleared); ``0.0`` when nothing contributes.
        ``stash``: keep the operators for the step's measurement (the first forward wins)."""
        ops: Dict[str, Any] = {}
        for name, probe in capture.probes.items():
            if not probe.has_record:
                continue
            try:
                ops[name] = probe.realize_rows(probe.recorded)
            except NothingToMeasure:  # every kept row is padding: no term, no failure (None: nothing to measure)
                ops[name] = None
            except Exception as e:  # noqa: BLE001 - the monitor never stops training
                on_error(name, e)
        if stash and self.stash is None:
            self.stash = dict(ops)  # the step's measurement: every layer, also those the penalty leaves out
        capture.clear()  # the next micro-batch records anew
        ops = {n: op for n, op in ops.items() if op is not None}
        if torch.is_grad_enabled():  # a term without a gradient would be logged as a penalty that trains nothing
            for name in [n for n, op in ops.items() if not op.requires_grad]:
                self._warn_no_gradient(name)
                del ops[name]
        if not ops:
            return 0.0
        total, terms = penalty_terms(ops, self.regularizer, on_error=on_error)
        if total is None:
            return 0.0
        self.log.append((total.detach(), {n: t.detach() for n, t in terms.items()}))
        return total

    def result(self) -> Optional[Dict[str, Any]]:
        """Mean penalty over this step's micro-batches, as plain floats (one sync, in step())."""
        if not self.log:
            return None
        n = len(self.log)
        total = float(sum(float(t) for t, _ in self.log) / n)
        names = {k for _, terms in self.log for k in terms}
        layers = {
            k: float(
                sum(float(terms[k]) for _, terms in self.log if k in terms)
                / sum(1 for _, terms in self.log if k in terms)
            )
            for k in names
        }
        return {"total": total, "layers": layers, "micro_batches": n}


def watch_penalty(watch: Any) -> Union[float, torch.Tensor]:
    """:meth:`ESSWatch.penalty`: ``0.0`` when the regularizer is off or skips the current step, else
    the :meth:`PenaltyBook.penalty` of ``watch``'s capture (failures go to the watch's policy)."""
    step = watch.schedule.step
    if watch.regularizer is None or not watch._penalties.due(step):
        return 0.0
    return watch._penalties.penalty(
        watch.capture,
        lambda n, e: watch._policy.fail(n, step, e),
        stash=watch.probe_batch is None and watch.schedule.due_now,
    )
