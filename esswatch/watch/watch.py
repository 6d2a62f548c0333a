"""``ESSWatch``: per-layer effective state-size, live in TensorBoard, from a training loop.

::

    watch = esswatch.ESSWatch(model, logdir="runs/exp", every_n_steps=100)
    for batch in loader:
        loss = loss_fn(model(batch))
        loss.backward(); opt.step(); opt.zero_grad()
        watch.step()                  # once per optimizer step
    watch.close()                     # or: with esswatch.ESSWatch(...) as watch:

What it logs at every sampled step (tags: :mod:`esswatch.watch.tags`):

- per layer (qualified module name) and metric: average ESS, max over indices,
  total ESS (value-channel weighted) and utilization ESS / TSS_i;
- the same over the whole model; the cumulative count of skipped layer
  measurements; the measurement's wall time;
- per-head ESS as histograms; the ESS-versus-index profile as an image (when
  matplotlib is installed); a custom-scalars layout with all layers of one
  metric on one chart; the configuration as text.

How sampling works. Step numbers are 0-based (step ``n`` is the training step
after ``n`` optimizer steps). ``step()`` ends step ``n``: if ``n`` is sampled it
measures what the capture recorded during step ``n``'s forward, then it arms the
capture for step ``n + 1`` if that one is sampled. Armed hooks keep the first
training-mode forward of the step (a few batch rows, detached); forwards of the
model in eval mode (validation) are not recorded. All spectral work happens in
``step()``, never inside hooks; on unsampled steps the hooks are a flag check.
With ``probe_batch=`` the training forwards are never recorded; instead, on each
sampled step, ``step()`` runs the model on the fixed batch in eval mode under
``no_grad`` and restores the train/eval flags, the CPU/CUDA RNG states and every
buffer (BatchNorm statistics) afterwards.

With ``background=True`` (default on CUDA) ``step()`` hands a copy of the captured tensors
to one worker thread and returns; results are emitted on the training thread at a later
``step()`` or at ``close()`` (:mod:`esswatch.watch.offload`, :mod:`esswatch.watch.background`).
``budget_seconds`` fixes the measured rows / indices / heads after the first sample
(:mod:`esswatch.watch.budget`).

Extension points (framework adapters, the regularizer): :meth:`set_step` feeds the
framework's global step; :meth:`paused` suspends recording (e.g. during validation);
:meth:`measure` measures what was captured and emits it;
:class:`~esswatch.watch.sinks.Sink` routes results to another logger;
:meth:`state_dict` / :meth:`load_state_dict`; :attr:`capture` is the owned
:class:`~esswatch.probes.Capture` (``keep_graph`` configurable).

The watch is a facade: the gate and arming (:mod:`~esswatch.watch.gate`), the penalty
bookkeeping (:mod:`~esswatch.watch.penalty`), the failure policy (:mod:`~esswatch.watch.failures`),
result assembly (:mod:`~esswatch.watch.result`), the sink fan-out (:mod:`~esswatch.watch.emit`),
checkpoint validation (:mod:`~esswatch.watch.state`) and hook lifetime
(:mod:`~esswatch.watch.lifetime`) each live in their own module.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch

from .._version import __version__
from ..ess import DEFAULT_RELATIVE, DEFAULT_TOL
from ..probes import Capture
from ..probes.hooks import adopt
from . import budget as budget_mod
from . import distributed as dist_utils
from .args import as_regularizer, check_flags, check_probe_batch, check_watch_args
from .background import Job, Outcome, make_job, run_job
from .emit import Emitter
from .failures import ESSMeasurementError, ESSWarning, FailurePolicy
from .gate import Gate, record_probe_batch, unwrap
from .lifetime import DoneHook, GateHook, release
from .measure import MeasureConfig
from .offload import Offload
from .penalty import PenaltyBook
from .regularizer import Regularizer
from .result import build_result, warn_empty
from .schedule import Schedule
from .sinks import Sink, TensorBoardSink, as_sinks
from .state import validated_state

__all__ = ["ESSWatch", "ESSWarning", "ESSMeasurementError"]


class ESSWatch:
    """Measure and log each sequence-mixing layer's ESS every ``every_n_steps`` steps.

    Args:
        model: the model (plain, ``torch.compile``-d, or wrapped in DistributedDataParallel;
            hooks go on the underlying module).
        logdir: write TensorBoard event files here (rank 0 only).
        writer: or log through an existing ``SummaryWriter`` (flushed on close, not closed).
        every_n_steps: sample steps ``0, n, 2n, ...`` (default 100).
        probe_batch: a fixed input (tensor, tuple of positional args, or dict of keyword
            args) measured on sampled steps instead of the training forward; gives curves
            comparable over time.
        batch_rows: batch rows kept per sample (default 2; ``None`` = all).
        heads: heads / channels kept per layer (default ``None`` = all). Total ESS sums the
            kept heads only.
        indices: an int = that many indices spread over the sequence (default 8), ``"all"``
            (cheap with the gram estimator on recurrences), or an explicit list.
        estimator: ``"auto"`` (default), ``"exact"``, ``"gram"``, ``"randomized"``
            (see :func:`esswatch.entropy_ess`).
        metrics: ``("entropy",)`` (default), optionally with ``"tolerance"``.
        tol, relative: the tolerance-ESS threshold (see :func:`esswatch.tolerance_ess`).
        layers: which layers (``None`` = every supported one; a name, a list of names, or a
            predicate ``(name, module) -> bool``).
        sinks: more destinations: :class:`~esswatch.watch.sinks.Sink` objects or callables
            receiving each result (a plain dict, see :meth:`latest`), on rank 0.
        strict: raise :class:`ESSMeasurementError` when a layer's measurement fails, instead
            of warning once per layer, counting it (``ess/failures``) and skipping the layer.
        reduce: average the scalars over all ranks of ``torch.distributed`` (one
            ``all_reduce`` per sampled step, on every rank).
        train_forwards_only: record only forwards of the model in training mode (default True).
        histograms: TensorBoard per-head histograms (default on).
        images: the TensorBoard profile image on every ``images``-th sampled step (default 10;
            ``True`` = every sampled step, ``False`` = never).
        regularizer: the ESS regularizer's weight (``None`` or ``0`` = off, the default), or an
            :class:`esswatch.Regularizer` for its other options (kind, mode, target, every k
            steps). When on, :meth:`penalty` returns a differentiable term to add to the loss.
        background: measure on a worker thread (``None``, the default: when the model's
            parameters are on CUDA). ``step()`` then only copies the captured tensors (CUDA: on
            a side stream) and hands them over; the result is emitted with its step number, on
            the training thread, at a later ``step()`` or at ``close()`` (which waits). A sample
            due while the worker is busy is skipped and counted (``ess/skipped``). With
            ``reduce=True`` results are collected only at sampled steps and at ``close()``, after
            a one-flag ``all_reduce`` says every rank's worker is done (see
            :mod:`esswatch.watch.offload`); every rank must call ``close()``. The regularizer's
            penalty stays on the training thread; :meth:`measure` stays blocking.
        budget_seconds: a time budget per sample (``None`` = none): after timing the first
            sample the watch fixes the batch rows, indices and heads it measures so that later
            samples take about this long (cut in that order; see :mod:`esswatch.watch.budget`).
            The choice is in the config text and in ``latest()["budget"]``.
    """

    def __init__(self, model: torch.nn.Module, logdir: Optional[str] = None, *, writer: Any = None,
                 every_n_steps: int = 100, probe_batch: Any = None, batch_rows: Optional[int] = 2,
                 heads: Optional[int] = None, indices: Union[int, str, Sequence[int]] = 8,
                 estimator: str = "auto", metrics: Union[str, Sequence[str]] = ("entropy",),
                 tol: float = DEFAULT_TOL, relative: bool = DEFAULT_RELATIVE, layers=None,
                 sinks: Iterable[Union[Sink, Callable[[Dict[str, Any]], Any]]] = (), strict: bool = False,
                 reduce: bool = False, train_forwards_only: bool = True, histograms: bool = True,
                 images: Union[bool, int] = 10, regularizer: Union[None, float, Regularizer] = None,
                 background: Optional[bool] = None, budget_seconds: Optional[float] = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"ESSWatch expects an nn.Module, got {type(model).__name__}")
        if logdir is not None and writer is not None:
            raise ValueError("ESSWatch: pass logdir= or writer=, not both")
        check_watch_args(logdir=logdir, images=images, histograms=histograms)
        if background is not None and not isinstance(background, bool):
            raise ValueError(f"background must be None, True or False, got {background!r}")
        self._budget = None if budget_seconds is None else budget_mod.Budget(
            budget_mod.validate_budget(budget_seconds))
        check_flags(strict=strict, reduce=reduce, train_forwards_only=train_forwards_only)
        check_probe_batch(probe_batch)
        reg = as_regularizer(regularizer)
        self.regularizer: Optional[Regularizer] = reg if reg is not None and reg.enabled else None
        self._penalties = PenaltyBook(self.regularizer)
        self.schedule = Schedule(every_n_steps)
        self.measure_config = MeasureConfig(indices=indices, estimator=estimator, metrics=metrics, tol=tol,
                                            relative=relative)
        self.strict = strict
        self.reduce = reduce
        self.probe_batch = probe_batch
        self._module = unwrap(model)
        self.capture = Capture(self._module, layers, batch_rows=batch_rows, heads=heads)
        self._tss = self.capture.tss
        self._sinks: List[Sink] = []
        if logdir is not None or writer is not None:
            self._sinks.append(TensorBoardSink(logdir=logdir, writer=writer, histograms=histograms, images=images))
        self._sinks.extend(as_sinks(sinks))
        self._emitter = Emitter(self._sinks, strict)
        self._policy = FailurePolicy(strict)
        self._warned_empty = False
        self._samples = 0
        self._latest: Optional[Dict[str, Any]] = None
        self._closed = False
        self._skipped_samples = 0
        self._budget_gen = self._armed_gen = 0
        if background is None:
            background = any(p.is_cuda for p in self._module.parameters())
        self.background = background
        self._offload: Optional[Offload] = None
        self._gate = Gate(self.capture)
        self.capture.attach()
        self._handles: list = []
        # close() and the garbage collector release the model the same way (no reference to self)
        self._finalizer = weakref.finalize(self, release, self._gate, self._handles, self._sinks)
        self._train_only = train_forwards_only
        self._handles.append(model.register_forward_pre_hook(GateHook(self._gate, train_forwards_only),
                                                             prepend=True))
        self._handles.append(model.register_forward_hook(DoneHook(self._gate)))
        self._gate.hooks = adopt(self._handles, model)
        if background:
            self._offload = Offload()
            weakref.finalize(self, self._offload.worker.shutdown)   # a watch dropped without close()
        self._arm()

    # -- configuration ---------------------------------------------------------------
    @property
    def layer_names(self) -> List[str]:
        return list(self.capture.probes)

    def config(self) -> Dict[str, Any]:
        """The configuration as plain data (what the TensorBoard text shows)."""
        cap = self.capture
        return {
            "every_n_steps": self.schedule.every_n_steps,
            "sampling": "probe batch" if self.probe_batch is not None else "training forward",
            "batch_rows": cap.batch_rows, "heads": cap.heads,
            **self.measure_config.as_dict(),
            "strict": self.strict, "reduce": self.reduce, "background": self.background,
            **({} if self._budget is None else {"budget_seconds": self._budget.seconds,
                                                  "budget": self._budget.as_dict()}),
            "layers": {n: f"{type(p.module).__name__}: {p.layer_type}" for n, p in cap.probes.items()},
            "esswatch": __version__,
        }

    # -- the schedule ----------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """The number of the current training step (0-based)."""
        return self.schedule.step

    def _arm(self) -> None:
        """Prepare the capture for the current step (clears any stale record)."""
        self.capture.clear()
        self._penalties.reset()
        penalize = self._penalties.due(self.schedule.step)
        self._armed_gen = self._budget_gen
        self._gate.arm((self.probe_batch is None and self.schedule.due_now) or penalize, keep_graph=penalize)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A context during which nothing is recorded (nests); what the current step recorded
        before it is kept, and recording resumes as armed when it ends::

            with watch.paused():
                evaluate(model)
        """
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def pause(self) -> None:
        """Stop recording until the matching :meth:`resume` (for adapters whose framework gives
        a start and an end hook rather than a block; see :meth:`paused`)."""
        self._gate.pause()

    def resume(self) -> None:
        """End a :meth:`pause` (a no-op when not paused)."""
        self._gate.resume()

    def set_step(self, global_step: int) -> None:
        """Declare the number of the training step about to run (e.g. a framework's
        ``global_step`` at batch start). A no-op if it is already the current step, so
        calling it for every micro-batch of an accumulated step keeps the record."""
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be a non-negative int, got {global_step!r}")
        if global_step != self.schedule.step:
            self.schedule.step = global_step
            self._arm()

    def step(self) -> Optional[Dict[str, Any]]:
        """End the current training step: measure and log it if it is sampled, then move on.

        Returns the result (see :meth:`latest`) on sampled steps, else ``None``; with
        ``background``, the result emitted during this call (an earlier sample's), else ``None``.
        """
        if self._closed:
            raise RuntimeError("ESSWatch.step() after close()")
        s = self.schedule.step
        result = None
        if self._offload is not None:
            result = self._offload.step(self, s)
        elif self.schedule.due(s) and (self.probe_batch is None or self._run_probe(s)):
            result = self.measure(step=s, source="probe" if self.probe_batch is not None else "train")
        self.schedule.advance()
        self._arm()
        return result

    # -- the regularizer ---------------------------------------------------------------
    def penalty(self) -> Union[float, torch.Tensor]:
        """The ESS regularizer's term for the forward that just ran, to add to the loss.

        Exactly ``0.0`` (a Python float: no graph, no cost) when the regularizer is off, on
        steps it skips (``every_n_steps`` of :class:`esswatch.Regularizer`) and when no
        watched layer ran a training-mode forward since the last call. Otherwise a
        differentiable scalar tensor (float32, or float64 for a float64 model). Call it once
        per forward, before ``backward()``; with gradient accumulation, once per micro-batch
        (each call consumes the forward it penalizes). A layer whose term fails is skipped
        with a warning (``strict=True`` raises).
        """
        step = self.schedule.step
        if self.regularizer is None or not self._penalties.due(step):
            return 0.0
        return self._penalties.penalty(self.capture, lambda n, e: self._policy.fail(n, step, e),
                                       stash=self.probe_batch is None and self.schedule.due_now)

    # -- measuring -------------------------------------------------------------------
    def _run_probe(self, step: int) -> bool:
        """Run the model on the probe batch; False (warned once, counted) when its forward raised."""
        try:
            record_probe_batch(self._module, self.capture, self.probe_batch)
        except Exception as e:  # noqa: BLE001 - the monitor never stops training
            self._policy.fail("probe_batch", step, e, what="the probe_batch forward")
            return False
        return True

    def measure(self, step: Optional[int] = None, source: str = "train") -> Optional[Dict[str, Any]]:
        """Measure every layer the capture recorded, log the result, clear the records.

        Called by :meth:`step` on sampled steps; adapters may call it directly. With
        ``reduce=True`` every rank must call it on the same steps. Returns the result, or
        ``None`` when nothing was recorded (on every rank).
        """
        step = self.schedule.step if step is None else step
        return self._finish(run_job(self._job(step, source)))

    def _job(self, step: int, source: str, copier=None) -> Job:
        """This step's records (copied off the graph by ``copier`` for the worker); clears them."""
        return make_job(self, step, source, copier)

    def _finish(self, outcome: Outcome) -> Optional[Dict[str, Any]]:
        """Turn a measured sample into the result: failures, budget, reduce, sinks (training thread)."""
        step = outcome.step
        errors = list(outcome.errors)
        if outcome.fatal is not None:
            errors.append(("<esswatch worker>", outcome.fatal))
        skipped: List[str] = []
        for name, e in errors:
            self._policy.fail(name, step, e)
            skipped.append(name)
        if self._budget is not None and not self._budget.decided and outcome.calibrated:
            self._decide_budget(outcome)
        layers, failures = outcome.layers, self._policy.count
        if self.reduce:
            layers, failures = dist_utils.reduce_layers(layers, self.layer_names, self.measure_config.metrics,
                                                        failures)
        if not layers and not skipped and failures == self._policy.count:
            if not self._warned_empty and not outcome.short:
                self._warned_empty = True
                warn_empty(step, self._train_only)
            return None
        result = build_result(outcome, layers, self.measure_config.metrics, failures=failures, skipped=skipped,
                              skipped_samples=self._skipped_samples,
                              budget=None if self._budget is None else self._budget.as_dict())
        self._latest = result
        self._samples += 1
        self._emitter.emit(result, self.config)
        return result

    def _decide_budget(self, outcome: Outcome) -> None:
        """Fix the measured rows / indices / heads from the first sample's timings."""
        agree = budget_mod.agree_min if self.reduce and dist_utils.world_size() > 1 else None
        if budget_mod.apply(self._budget, outcome, self, agree):
            self._budget_gen += 1
        if self._budget.warning:
            import warnings
            warnings.warn(self._budget.warning, ESSWarning, stacklevel=4)

    # -- results and state -------------------------------------------------------------
    def latest(self) -> Optional[Dict[str, Any]]:
        """The last result as plain Python data (a copy), or ``None`` before the first sample::

            {"step": int, "source": "train" | "probe", "metrics": ["entropy", ...],
             "layers": {name: {"type", "seq_len", "state_size", "value_dim", "rows", "heads",
                               "indices": [i, ...], "tss": [TSS_i, ...],
                               "entropy": {"avg", "max", "total", "utilization",
                                           "per_index": [...], "per_head": [...]}, ...}},
             "model": {"entropy": {"avg", "max", "total", "utilization"}, ...},
             "failures": int, "skipped": [names], "seconds": float, "scalars": {tag: value}}
        """
        return copy.deepcopy(self._latest)

    @property
    def failures(self) -> int:
        """Layer measurements skipped so far on this rank."""
        return self._policy.count

    def state_dict(self) -> Dict[str, Any]:
        """Plain data to checkpoint: the step counter, failure counts, samples taken."""
        return {"version": 1, "schedule": self.schedule.state_dict(), "failures": self._policy.count,
                "failed_layers": sorted(self._policy.names), "samples": self._samples,
                "skipped_samples": self._skipped_samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: the step counter continues where ``state`` left it (the period is this
        watch's own ``every_n_steps``). Every field is validated first (``ValueError`` naming
        it); nothing is applied unless all are valid."""
        st = validated_state(state)          # everything is checked before anything is applied
        self.schedule.step = st["step"]
        self._policy.count = st["failures"]
        self._policy.names = st["failed_layers"]
        self._samples = st["samples"]
        self._skipped_samples = st["skipped_samples"]
        self._arm()

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the outstanding background sample and emit it, then remove every hook, flush
        and close the sinks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        offload, self._offload = self._offload, None
        try:
            if offload is not None:
                offload.close(self)
        finally:
            self._finalizer()

    def __enter__(self) -> "ESSWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"ESSWatch(layers={self.layer_names}, every_n_steps={self.schedule.every_n_steps}, "
                f"step={self.schedule.step})")
