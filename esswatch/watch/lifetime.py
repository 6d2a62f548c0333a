"""The lifetime of an :class:`~esswatch.ESSWatch`'s hooks.

- :class:`GateHook` / :class:`DoneHook`: the model-level forward pre-hook (drops what an
  aborted forward recorded; arms the capture for training-mode forwards, those with gradients first) and forward
  hook (marks the forward complete); module-level callables (picklable through
  :mod:`esswatch.probes.hooks`) that reference the gate, never the watch.
- :func:`install` puts them on the model; :func:`release`: what ``close()`` and the garbage
  collector do (``weakref.finalize``): remove every hook, detach the capture, close the sinks.
  It holds no reference to the watch, so a watch dropped without ``close()`` is collected and
  the model is free for a new one. :func:`close_watch` is ``ESSWatch.close()``: the outstanding
  background sample first, then :func:`release` (through the watch's finalizer).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, List

import torch

from . import distributed as dist_utils

__all__ = ["GateHook", "DoneHook", "install", "release", "close_watch"]


class GateHook:
    """Forward pre-hook on the model: a forward that raised left records behind (the gate's
    ``in_forward`` is still set), so they are dropped first; then, when the current step is sampled and only
    training forwards count, the capture is armed for forwards in training mode, and one with gradients enabled
    takes precedence: it replaces what a no-gradient forward recorded (``generate()``, ``torch.no_grad()``,
    ``torch.inference_mode()`` on a model left in training mode), and after a first forward no-gradient forwards
    record nothing (nor do ``generate()``'s decoding steps; reentrant activation checkpointing disables gradients
    only inside its segments); a recording
    forward of a penalized step also drops what an earlier forward recorded and ``penalty()`` did not take."""

    __slots__ = ("gate", "train_only")

    def __init__(self, gate: Any, train_only: bool) -> None:
        self.gate = gate
        self.train_only = train_only

    def __call__(self, module, args):
        gate = self.gate
        if gate.paused:  # records nothing: it neither drops the step's record nor counts as its forward
            return None
        if gate.in_forward:
            gate.capture.clear()
            gate.record_grad = None
        gate.in_forward = True
        if self.train_only and gate.want:
            grad = torch.is_grad_enabled()
            if module.training and grad and gate.record_grad is False:  # replaces a no-gradient forward's record
                gate.capture.clear()
                gate.record_grad = None
            armed = module.training and (grad or gate.record_grad is None)
            gate.capture.armed = armed
            if armed and gate.record_grad is None:
                gate.record_grad = grad
        if gate.capture.keep_graph and gate.capture.armed:
            # the regularizer penalizes the forward that just ran: an earlier forward's record that penalty()
            # did not take (its graph may be freed by its own backward) gives way to this one
            gate.capture.clear()
        return None


class DoneHook:
    """Forward hook on the model: the forward completed (its records stand)."""

    __slots__ = ("gate",)

    def __init__(self, gate: Any) -> None:
        self.gate = gate

    def __call__(self, module, args, output):
        if not self.gate.paused:
            self.gate.in_forward = False
        return None


def install(model: Any, gate: Any, train_only: bool) -> List[Any]:
    """Put the :class:`GateHook` (first) and :class:`DoneHook` on ``model``; returns the handles
    (``gate.hooks`` follows copies of the model, :func:`esswatch.probes.hooks.adopt`)."""
    from ..probes.hooks import adopt

    handles = [
        model.register_forward_pre_hook(GateHook(gate, train_only), prepend=True),
        model.register_forward_hook(DoneHook(gate)),
    ]
    gate.hooks = adopt(handles, model)
    return handles


def release(gate: Any, handles: List[Any], sinks: List[Any]) -> None:
    """Remove the watch's own hooks, detach its capture and close its sinks (idempotent)."""
    gate.want = False
    gate.in_forward = False
    hs = list(handles)
    handles.clear()
    for h in hs:
        h.remove()
    for hook in gate.hooks:
        hook.remove_from_copies()
    gate.hooks = []
    gate.capture.detach()
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 - closing a log never raises into training
            warnings.warn(
                f"esswatch: closing sink {sink!r} failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2
            )


def close_watch(watch: Any) -> None:
    """:meth:`ESSWatch.close`: wait for the outstanding background sample and emit it, then release
    the watch (its ``weakref.finalize`` runs :func:`release`); idempotent. Called while an exception is being
    handled, under ``reduce`` with several ranks, the outstanding sample is dropped instead: the other ranks may
    never reach its reduction (a collective mismatch would hide the error)."""
    if watch._closed:
        return
    watch._closed = True
    offload, watch._offload = watch._offload, None
    try:
        if offload is not None:
            abandon = sys.exc_info()[0] is not None and watch.reduce and dist_utils.world_size() > 1
            offload.close(watch, abandon=abandon)
    finally:
        watch._finalizer()
