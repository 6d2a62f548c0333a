"""``ESSWatch``: per-layer effective state-size, live in TensorBoard, from a training loop.

::

    watch = esswatch.ESSWatch(model, logdir="runs/exp", every_n_steps=100)
    for batch in loader:
        loss = loss_fn(model(batch))
        loss.backward(); opt.step(); opt.zero_grad()
        watch.step()                  # once per optimizer step
    watch.close()                     # or: with esswatch.ESSWatch(...) as watch:

It logs per layer and over the whole model the ESS statistics, failures, timings, per-head
histograms, the ESS-versus-index profile image and the configuration (:mod:`esswatch.watch.tags`).

How sampling works: :mod:`esswatch.watch.gate`; ``background=True``: :mod:`esswatch.watch.offload`;
``budget_seconds``: :mod:`esswatch.watch.budget`. Extension points (framework adapters, the
regularizer): :meth:`set_step` feeds the framework's global step; :meth:`paused` suspends recording (e.g. during
validation); :meth:`measure` measures what was captured and emits it; :class:`~esswatch.watch.sinks.Sink` routes
results to another logger; :meth:`state_dict` / :meth:`load_state_dict` (:meth:`flush` first, with background);
:attr:`capture` is the owned :class:`~esswatch.probes.Capture`. The watch is a facade over one module per job: gate
(arming), penalty, failures, finish and result (assembly), emit (sinks), state (checkpoints), lifetime (hooks),
offload (background).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ..engine.validation import check_positive_int
from ..ess import DEFAULT_RELATIVE, DEFAULT_TOL
from ..probes import Capture
from .args import checked_args
from .background import Outcome, make_job, run_job
from .emit import Emitter
from .failures import ESSMeasurementError, ESSWarning, FailurePolicy  # noqa: F401 - public names
from .finish import finish
from .gate import Gate, run_probe, unwrap
from .lifetime import close_watch, install, release
from .measure import MeasureConfig
from .offload import Offload
from .penalty import PenaltyBook, watch_penalty
from .regularizer import Regularizer
from .result import watch_config
from .schedule import Schedule
from .sinks import Sink, build_sinks
from .state import load_state, state_of

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
        train_forwards_only: record only forwards in training mode, those with gradients first (default True).
        histograms: TensorBoard per-head histograms (default on).
        images: the TensorBoard profile image on every ``images``-th sampled step (default 10;
            ``True`` = every sampled step, ``False`` = never).
        regularizer: the ESS regularizer's weight (``None`` or ``0`` = off, the default), or an
            :class:`esswatch.Regularizer` for its other options (kind, mode, target, every k
            steps). When on, :meth:`penalty` returns a differentiable term to add to the loss.
        background: measure on a worker thread (``None``, the default: when the model's
            parameters are on CUDA); results are emitted with their step number, on the training
            thread, at a later ``step()`` or at ``close()``; a sample due while the worker is busy
            is skipped and counted (``ess/skipped``). See :mod:`esswatch.watch.offload`.
        budget_seconds: a time budget per sample (``None`` = none): after timing the first
            sample the watch fixes the batch rows, indices and heads it measures so that later
            samples take about this long (:mod:`esswatch.watch.budget`; ``latest()["budget"]``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        logdir: Optional[str] = None,
        *,
        writer: Any = None,
        every_n_steps: int = 100,
        probe_batch: Any = None,
        batch_rows: Optional[int] = 2,
        heads: Optional[int] = None,
        indices: Union[int, str, Sequence[int]] = 8,
        estimator: str = "auto",
        metrics: Union[str, Sequence[str]] = ("entropy",),
        tol: float = DEFAULT_TOL,
        relative: bool = DEFAULT_RELATIVE,
        layers=None,
        sinks: Iterable[Union[Sink, Callable[[Dict[str, Any]], Any]]] = (),
        strict: bool = False,
        reduce: bool = False,
        train_forwards_only: bool = True,
        histograms: bool = True,
        images: Union[bool, int] = 10,
        regularizer: Union[None, float, Regularizer] = None,
        background: Optional[bool] = None,
        budget_seconds: Optional[float] = None,
    ) -> None:
        reg, self._budget = checked_args(
            model,
            logdir,
            writer,
            background,
            images,
            histograms,
            budget_seconds,
            strict,
            reduce,
            train_forwards_only,
            probe_batch,
            regularizer,
        )
        self.regularizer: Optional[Regularizer] = reg if reg is not None and reg.enabled else None
        self._penalties = PenaltyBook(self.regularizer)
        self.schedule = Schedule(every_n_steps)
        self.measure_config = MeasureConfig(
            indices=indices, estimator=estimator, metrics=metrics, tol=tol, relative=relative
        )
        self.strict, self.reduce = strict, reduce
        self.probe_batch = probe_batch
        self._module = unwrap(model)
        self.capture = Capture(self._module, layers, batch_rows=batch_rows, heads=heads)
        self._penalty_rows = batch_rows  # the regularizer's rows, whatever a budget cuts
        self._tss = self.capture.tss
        self._sinks = build_sinks(sinks, logdir=logdir, writer=writer, histograms=histograms, images=images)
        self._emitter = Emitter(self._sinks, strict)
        self._policy = FailurePolicy(strict)
        self._warned_empty = self._closed = False
        self._latest: Optional[Dict[str, Any]] = None
        self._samples = self._skipped_samples = self._budget_gen = self._armed_gen = 0
        self.background = any(p.is_cuda for p in self._module.parameters()) if background is None else background
        self._gate = Gate(self.capture)
        self.capture.attach()
        self._train_only = train_forwards_only
        self._handles = install(model, self._gate, train_forwards_only)
        self._finalizer = weakref.finalize(self, release, self._gate, self._handles, self._sinks)
        self.step_base = 0  # the first step's number in the steps it is given (the Trainer's are 1-based)
        self._offload: Optional[Offload] = Offload.started(self) if self.background else None
        self._arm()

    # -- configuration ---------------------------------------------------------------
    @property
    def layer_names(self) -> List[str]:
        return list(self.capture.probes)

    def config(self) -> Dict[str, Any]:
        """The configuration as plain data (what the TensorBoard text shows)."""
        return watch_config(self)

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
        self._gate.arm((self.probe_batch is None and self.schedule.due_now) or penalize, penalize, self._penalty_rows)

    def paused(self) -> ContextManager[None]:
        """A context during which nothing is recorded (nests); what the current step recorded before it is kept,
        and recording resumes as armed when it ends::

            with watch.paused():
                evaluate(model)
        """
        return self._gate.suspended()

    def set_step(self, global_step: int) -> None:
        """Declare the number of the training step about to run (e.g. a framework's ``global_step`` at batch
        start). A no-op if it is already the current step: every micro-batch of a step may call it."""
        global_step = check_positive_int("global_step", global_step, minimum=0)
        if global_step != self.schedule.step:
            self.schedule.step = global_step
            self._arm()

    def step(self) -> Optional[Dict[str, Any]]:
        """End the current training step: measure and log it if it is sampled, then move on.

        Returns the result (see :meth:`latest`) on sampled steps, else ``None``; with ``background``, the result
        emitted during this call (an earlier sample's), else ``None``."""
        if self._closed:
            raise RuntimeError("ESSWatch.step() after close()")
        s = self.schedule.step
        result = None
        self._gate.drop_aborted()
        try:
            if self._offload is not None:
                result = self._offload.step(self, s)
            elif self.schedule.due(s) and (self.probe_batch is None or self._run_probe(s) or self.reduce):
                result = self.measure(step=s, source="probe" if self.probe_batch is not None else "train")
        finally:  # strict=True raises from here: the step still counts, so later samples keep their steps
            self.schedule.advance()
            self._arm()
        return result

    # -- the regularizer ---------------------------------------------------------------
    def penalty(self) -> Union[float, torch.Tensor]:
        """The ESS regularizer's term for the forward that just ran, to add to the loss.

        Exactly ``0.0`` (a Python float: no graph, no cost) when the regularizer is off, on steps it skips
        (``every_n_steps`` of :class:`esswatch.Regularizer`) and when no watched layer ran a training-mode forward
        since the last call. Otherwise a differentiable scalar tensor (float32, or float64 for a float64 model).
        Call it once per forward, before ``backward()``; with gradient accumulation, once per micro-batch (each
        call consumes the forward it penalizes). A layer whose term fails is skipped with a warning
        (``strict=True`` raises)."""
        return watch_penalty(self)

    # -- measuring -------------------------------------------------------------------
    #: run the model on the probe batch; False (warned once, counted) when its forward raised
    _run_probe = run_probe  # a plain function attribute: no extra frame for the warning's stacklevel

    def measure(self, step: Optional[int] = None, source: str = "train") -> Optional[Dict[str, Any]]:
        """Measure every layer the capture recorded, log the result, clear the records.

        Called by :meth:`step` on sampled steps; adapters may call it directly. With ``reduce=True`` every rank
        must call it on the same steps. Returns the result, or ``None`` when nothing was recorded (on every rank)."""
        step = self.schedule.step if step is None else step
        return self._finish(run_job(make_job(self, step, source)))

    def _finish(self, outcome: Outcome) -> Optional[Dict[str, Any]]:
        """Turn a measured sample into the result and emit it (:func:`esswatch.watch.finish.finish`)."""
        return finish(self, outcome)

    # -- results and state -------------------------------------------------------------
    def latest(self) -> Optional[Dict[str, Any]]:
        """The last result as plain data (a copy; keys: :mod:`esswatch.watch.result`), or ``None``."""
        return copy.deepcopy(self._latest)

    @property
    def failures(self) -> int:
        """Layer measurements skipped so far on this rank."""
        return self._policy.count

    def state_dict(self) -> Dict[str, Any]:
        """Plain data to checkpoint: step, failures, samples, the budget's level. With ``background`` the outstanding
        sample is emitted first (:meth:`flush`; with ``reduce`` and several ranks, call that on every rank first;
        not from inside a sink)."""
        if self._offload is not None and not self._closed:
            self._offload.before_state(self)
        return state_of(self)

    def flush(self) -> Optional[Dict[str, Any]]:
        """Wait for the outstanding background sample and emit it now; returns it (``None``: nothing was
        outstanding, or no ``background``). With ``reduce`` under ``torch.distributed``, every rank calls it."""
        return None if self._offload is None or self._closed else self._offload.flush(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: the step counter continues where ``state`` left it (the period is this watch's own
        ``every_n_steps``), and a budget's level stays (if ``budget_seconds`` is the same). Every field is validated
        first (``ValueError`` naming it); nothing is applied unless all are valid."""
        load_state(self, state)
        self._arm()

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the outstanding sample (:meth:`flush`), remove every hook, flush and close the sinks."""
        close_watch(self)

    def __enter__(self) -> "ESSWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"ESSWatch(layers={self.layer_names}, every_n_steps={self.schedule.every_n_steps}, step={self.global_step})"
        )
