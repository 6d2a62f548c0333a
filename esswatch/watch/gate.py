"""The hook gate of an :class:`~esswatch.ESSWatch` and its arming.

:class:`Gate` is the state shared with the model-level hooks of :mod:`esswatch.watch.lifetime`
(kept apart from the watch, so that hooks never reference the watch): ``want`` = the current
step is recorded from training forwards. :meth:`Gate.arm` sets what the current step records;
:meth:`Gate.pause` / :meth:`Gate.resume` (or the ``with`` block :meth:`Gate.suspended`) suspend
recording (nesting) without losing it.
:func:`unwrap` finds the module that owns the parameters; :func:`call_model` runs a batch;
:func:`run_probe` records the watch's probe batch past the gate.

How sampling works. Step numbers are 0-based (step ``n`` is the training step after ``n``
optimizer steps). ``ESSWatch.step()`` ends step ``n``: if ``n`` is sampled it measures what the
capture recorded during step ``n``'s forward, then it arms the capture for step ``n + 1`` if
that one is sampled (or penalized by the regularizer). Armed hooks keep the first
training-mode forward of the step (a few batch rows, detached); forwards of the model in eval
mode (validation) are not recorded. All spectral work happens in ``step()``, never inside
hooks; on unsampled steps the hooks are a flag check. With ``probe_batch=`` the training
forwards are never recorded; instead, on each sampled step, :func:`record_probe_batch` runs the
model on the fixed batch in eval mode under ``no_grad`` and restores the train/eval flags, the
CPU/CUDA RNG states and every buffer (BatchNorm statistics) afterwards.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional

import torch

from .training_state import preserved

__all__ = ["Gate", "unwrap", "call_model", "record_probe_batch", "run_probe"]


class Gate:
    __slots__ = ("want", "capture", "hooks", "in_forward", "record_grad", "_paused", "_saved")

    def __init__(self, capture: Any) -> None:
        self.want = False
        self.in_forward = False  # a forward of the model started and has not completed
        self.record_grad: Optional[bool] = None  # the step's record: none yet, from a forward with(out) gradients
        self.capture = capture
        self.hooks: list = []
        self._paused = 0
        self._saved = (False, False)  # (want, armed) to restore when the last pause ends

    def drop_aborted(self) -> None:
        """At ``step()``: the model's last forward raised and none completed since, so what it recorded
        is no step's (the gate's pre-hook drops it the same way when the next forward starts)."""
        if self.in_forward:
            self.in_forward = False
            self.capture.clear()
            self.record_grad = None

    @property
    def paused(self) -> bool:
        return self._paused > 0

    def arm(self, want: bool, keep_graph: bool, penalty_rows: Optional[int] = None) -> None:
        """Record (or not) the current step's forwards; ``keep_graph`` for the regularizer, whose records
        keep ``penalty_rows`` rows and every head. While paused, this takes effect when the pause ends."""
        self.capture.keep_graph = keep_graph
        self.capture.penalty_view = (penalty_rows, None) if keep_graph else None
        self.record_grad = None
        if self._paused:
            self._saved = (want, want)
            return
        self.want = want
        self.capture.armed = want

    def pause(self) -> None:
        """Record nothing until the matching :meth:`resume`."""
        if self._paused == 0:
            self._saved = (self.want, self.capture.armed)
            self.want = False
            self.capture.armed = False
        self._paused += 1

    def resume(self) -> None:
        if self._paused == 0:
            return
        self._paused -= 1
        if self._paused == 0:
            self.want, self.capture.armed = self._saved

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """:meth:`pause` for the duration of a ``with`` block (``ESSWatch.paused()``)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns the parameters: strips ``torch.compile`` and (D)DP wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if "torch._dynamo" in sys.modules:
            from torch._dynamo.eval_frame import OptimizedModule

            if isinstance(model, OptimizedModule):
                model = model._orig_mod
                continue
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
    return model


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """``model(batch)``: a dict as keyword arguments, a tuple/list as positional ones."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def record_probe_batch(model: torch.nn.Module, capture: Any, batch: Any) -> None:
    """Record one forward of ``model`` on ``batch`` in eval mode under ``no_grad``, leaving the
    model's flags, RNG states and buffers as they were (:func:`~esswatch.watch.training_state.
    preserved`). A raising forward leaves nothing recorded and propagates."""
    try:
        with preserved(model), torch.no_grad():
            model.train(False)
            capture.clear()
            capture.armed = True
            try:
                call_model(model, batch)
            finally:
                capture.armed = False
    except BaseException:
        capture.clear()
        raise


def run_probe(watch: Any, step: int) -> bool:
    """Run ``watch``'s model on its probe batch (:func:`record_probe_batch`); False (warned once,
    counted by the watch's failure policy) when its forward raised."""
    gate, want = watch._gate, watch._gate.want
    gate.want = False  # the train-forwards gate would disarm this eval-mode forward
    try:
        record_probe_batch(watch._module, watch.capture, watch.probe_batch)
    except Exception as e:  # noqa: BLE001 - the monitor never stops training
        watch._policy.fail("probe_batch", step, e, what="the probe_batch forward")
        return False
    finally:
        gate.want = want
    return True
