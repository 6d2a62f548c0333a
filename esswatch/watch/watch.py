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

Extension points (framework adapters, the regularizer): :meth:`set_step` feeds the
framework's global step; :meth:`measure` measures what was captured and emits it;
:class:`~esswatch.watch.sinks.Sink` routes results to another logger;
:meth:`state_dict` / :meth:`load_state_dict`; :attr:`capture` is the owned
:class:`~esswatch.capture.Capture` (``keep_graph`` configurable).
"""
from __future__ import annotations

import copy
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from .. import __version__
from ..capture import Capture
from ..ess import DEFAULT_RELATIVE, DEFAULT_TOL
from . import distributed as dist_utils
from .measure import MeasureConfig, aggregate_model, measure_operator
from .regularizer import PENALTY_TAG, Regularizer, penalty_terms
from .schedule import Schedule
from .sinks import Sink, TensorBoardSink, as_sink
from .tags import layer_tag_name, scalar_tags
from .training_state import preserved

__all__ = ["ESSWatch", "ESSWarning", "ESSMeasurementError"]


class ESSWarning(RuntimeWarning):
    """A layer's measurement was skipped (issued once per layer)."""


class ESSMeasurementError(RuntimeError):
    """``strict=True``: a layer's measurement failed (names the layer and the step)."""


class _Gate:
    """State shared with the forward pre-hook (kept apart from the watch so that hooks never
    reference it): ``want`` = the current step is sampled from training forwards."""

    __slots__ = ("want", "capture")

    def __init__(self, capture: Capture) -> None:
        self.want = False
        self.capture = capture


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
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


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


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
    """

    def __init__(self, model: torch.nn.Module, logdir: Optional[str] = None, *, writer: Any = None,
                 every_n_steps: int = 100, probe_batch: Any = None, batch_rows: Optional[int] = 2,
                 heads: Optional[int] = None, indices: Union[int, str, Sequence[int]] = 8,
                 estimator: str = "auto", metrics: Union[str, Sequence[str]] = ("entropy",),
                 tol: float = DEFAULT_TOL, relative: bool = DEFAULT_RELATIVE, layers=None,
                 sinks: Iterable[Union[Sink, Callable[[Dict[str, Any]], Any]]] = (), strict: bool = False,
                 reduce: bool = False, train_forwards_only: bool = True, histograms: bool = True,
                 images: Union[bool, int] = 10, regularizer: Union[None, float, Regularizer] = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"ESSWatch expects an nn.Module, got {type(model).__name__}")
        if logdir is not None and writer is not None:
            raise ValueError("ESSWatch: pass logdir= or writer=, not both")
        for nm, v in (("strict", strict), ("reduce", reduce), ("train_forwards_only", train_forwards_only)):
            if not isinstance(v, bool):
                raise ValueError(f"{nm} must be a bool, got {v!r}")
        if probe_batch is not None and not isinstance(probe_batch, (torch.Tensor, tuple, list, dict)):
            raise ValueError("probe_batch must be a tensor, a tuple/list of positional arguments or a dict of "
                             f"keyword arguments, got {type(probe_batch).__name__}")
        if regularizer is None or isinstance(regularizer, Regularizer):
            reg = regularizer
        elif isinstance(regularizer, (int, float)) and not isinstance(regularizer, bool):
            reg = Regularizer(float(regularizer))
        else:
            raise ValueError(f"regularizer must be a weight (float), an esswatch.Regularizer or None, "
                             f"got {regularizer!r}")
        self.regularizer: Optional[Regularizer] = reg if reg is not None and reg.enabled else None
        self._stash: Optional[Dict[str, Any]] = None       # operators consumed by penalty() on a measured step
        self._penalty_log: List[Any] = []                  # (total, {layer: term}) detached, this step
        self.schedule = Schedule(every_n_steps)
        self.measure_config = MeasureConfig(indices=indices, estimator=estimator, metrics=metrics, tol=tol,
                                            relative=relative)
        self.strict = strict
        self.reduce = reduce
        self.probe_batch = probe_batch
        self._model = model
        self._module = _unwrap(model)
        self.capture = Capture(self._module, layers, batch_rows=batch_rows, heads=heads)
        self._tss = self.capture.tss
        self._sinks: List[Sink] = []
        if logdir is not None or writer is not None:
            self._sinks.append(TensorBoardSink(logdir=logdir, writer=writer, histograms=histograms, images=images))
        if isinstance(sinks, (Sink,)) or callable(sinks):
            sinks = [sinks]
        self._sinks.extend(as_sink(s) for s in sinks)
        self._started = False
        self._failures = 0
        self._failed_layers: set = set()
        self._failed_sinks: set = set()
        self._warned_empty = False
        self._samples = 0
        self._latest: Optional[Dict[str, Any]] = None
        self._closed = False
        self._gate = _Gate(self.capture)
        self.capture.attach()
        self._handles = []
        if train_forwards_only:
            gate = self._gate

            def _gate_hook(module, args):
                if gate.want:
                    gate.capture.armed = module.training
                return None

            self._handles.append(model.register_forward_pre_hook(_gate_hook))
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
            "strict": self.strict, "reduce": self.reduce,
            "layers": {n: f"{type(p.module).__name__}: {p.layer_type}" for n, p in cap.probes.items()},
            "esswatch": __version__,
        }

    # -- the schedule ----------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """The number of the current training step (0-based)."""
        return self.schedule.step

    def _penalty_due(self) -> bool:
        reg = self.regularizer
        return reg is not None and self.schedule.step % reg.every_n_steps == 0

    def _arm(self) -> None:
        """Prepare the capture for the current step (clears any stale record)."""
        self.capture.clear()
        self._stash = None
        self._penalty_log = []
        penalize = self._penalty_due()
        want = (self.probe_batch is None and self.schedule.due_now) or penalize
        self.capture.keep_graph = penalize
        self._gate.want = want
        self.capture.armed = want

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
        if self.regularizer is None or not self._penalty_due():
            return 0.0
        step = self.schedule.step
        ops: Dict[str, Any] = {}
        for name, probe in self.capture.probes.items():
            if not probe.has_record:
                continue
            try:
                ops[name] = probe.operator()
            except Exception as e:  # noqa: BLE001 - the monitor never stops training
                self._layer_error(name, step, e)
        if self.probe_batch is None and self.schedule.due_now and self._stash is None:
            self._stash = ops            # the step's measurement uses this forward (first one wins)
        self.capture.clear()             # the next micro-batch records anew
        if not ops:
            return 0.0
        total, terms = penalty_terms(ops, self.regularizer, on_error=lambda n, e: self._layer_error(n, step, e))
        if total is None:
            return 0.0
        self._penalty_log.append((total.detach(), {n: t.detach() for n, t in terms.items()}))
        return total

    def _layer_error(self, name: str, step: int, err: BaseException) -> None:
        if self.strict:
            raise ESSMeasurementError(f"esswatch: layer {name!r} at step {step} failed: "
                                      f"{type(err).__name__}: {err}") from err
        self._failed(name, step, err)

    def _penalty_result(self) -> Optional[Dict[str, Any]]:
        """Mean penalty over this step's micro-batches, as plain floats (one sync, in step())."""
        if not self._penalty_log:
            return None
        n = len(self._penalty_log)
        total = float(sum(float(t) for t, _ in self._penalty_log) / n)
        names = {k for _, terms in self._penalty_log for k in terms}
        layers = {k: float(sum(float(terms[k]) for _, terms in self._penalty_log if k in terms)
                           / sum(1 for _, terms in self._penalty_log if k in terms)) for k in names}
        return {"total": total, "layers": layers, "micro_batches": n}

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

        Returns the result (see :meth:`latest`) on sampled steps, else ``None``.
        """
        if self._closed:
            raise RuntimeError("ESSWatch.step() after close()")
        s = self.schedule.step
        result = None
        if self.schedule.due(s):
            if self.probe_batch is not None:
                self._run_probe()
            result = self.measure(step=s, source="probe" if self.probe_batch is not None else "train")
        self.schedule.advance()
        self._arm()
        return result

    def _run_probe(self) -> None:
        model = self._module
        cap = self.capture
        gate, want = self._gate, self._gate.want
        with preserved(model), torch.no_grad():
            model.train(False)
            cap.clear()
            cap.armed = True
            gate.want = False            # the train-forwards gate would disarm this eval-mode forward
            try:
                _call(model, self.probe_batch)
            finally:
                cap.armed = False
                gate.want = want

    # -- measuring -------------------------------------------------------------------
    def measure(self, step: Optional[int] = None, source: str = "train") -> Optional[Dict[str, Any]]:
        """Measure every layer the capture recorded, log the result, clear the records.

        Called by :meth:`step` on sampled steps; adapters may call it directly. With
        ``reduce=True`` every rank must call it on the same steps. Returns the result, or
        ``None`` when nothing was recorded (on every rank).
        """
        step = self.schedule.step if step is None else step
        t0 = time.perf_counter()
        cfg = self.measure_config
        layers: Dict[str, Dict[str, Any]] = {}
        skipped: List[str] = []
        stash = self._stash or {}
        try:
            for name, probe in self.capture.probes.items():
                if not probe.has_record and name not in stash:
                    continue
                try:
                    op = probe.operator() if probe.has_record else stash[name]
                    with torch.no_grad():
                        layers[name] = measure_operator(op, cfg, self._tss.get(name))
                except Exception as e:  # noqa: BLE001 - the monitor never stops training
                    if self.strict:
                        raise ESSMeasurementError(
                            f"esswatch: measuring layer {name!r} at step {step} failed: "
                            f"{type(e).__name__}: {e}") from e
                    self._failed(name, step, e)
                    skipped.append(name)
        finally:
            self.capture.clear()
        failures = self._failures
        if self.reduce:
            layers, failures = dist_utils.reduce_layers(layers, self.layer_names, cfg.metrics, failures)
        if not layers and not skipped and failures == self._failures:
            if not self._warned_empty:
                self._warned_empty = True
                warnings.warn(
                    f"esswatch: step {step} was sampled but no watched layer ran a "
                    f"{'training-mode ' if self._handles else ''}forward since the previous step() "
                    "(call watch.step() once per optimizer step, after the forward and backward)",
                    ESSWarning, stacklevel=3)
            return None
        result: Dict[str, Any] = {
            "step": step,
            "source": source,
            "metrics": list(cfg.metrics),
            "layers": layers,
            "model": aggregate_model(layers, cfg.metrics),
            "failures": failures,
            "skipped": skipped,
            "seconds": time.perf_counter() - t0,
        }
        result["scalars"] = scalar_tags(result)
        pen = self._penalty_result()
        if pen is not None:
            result["penalty"] = pen
            result["scalars"][PENALTY_TAG] = pen["total"]
            for name, v in pen["layers"].items():
                result["scalars"][f"ess/penalty/{layer_tag_name(name)}"] = v
        self._latest = result
        self._samples += 1
        self._emit(result)
        return result

    def _failed(self, name: str, step: int, err: BaseException) -> None:
        self._failures += 1
        if name not in self._failed_layers:
            self._failed_layers.add(name)
            warnings.warn(
                f"esswatch: skipped layer {name!r} at step {step}: {type(err).__name__}: {err}. "
                "Training continues; later failures of this layer are only counted (tag ess/failures). "
                "Pass strict=True to raise instead.", ESSWarning, stacklevel=4)

    def _emit(self, result: Dict[str, Any]) -> None:
        """Hand the result to every sink (rank 0 only). A failing sink warns once and is skipped
        unless ``strict``: logging problems never stop training either."""
        if dist_utils.rank() != 0:
            return
        first = not self._started
        self._started = True
        config = dict(self.config(), start_step=result["step"]) if first else None
        for sink in self._sinks:
            try:
                if first:
                    sink.start(config)
                sink.write(result)
            except Exception as e:  # noqa: BLE001
                if self.strict:
                    raise
                if id(sink) not in self._failed_sinks:
                    self._failed_sinks.add(id(sink))
                    warnings.warn(f"esswatch: sink {sink!r} failed at step {result['step']}: "
                                  f"{type(e).__name__}: {e}. Later failures of this sink are not reported.",
                                  ESSWarning, stacklevel=4)

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
        return self._failures

    def state_dict(self) -> Dict[str, Any]:
        """Plain data to checkpoint: the step counter, failure counts, samples taken."""
        return {"version": 1, "schedule": self.schedule.state_dict(), "failures": self._failures,
                "failed_layers": sorted(self._failed_layers), "samples": self._samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: the step counter continues where ``state`` left it (the period is this
        watch's own ``every_n_steps``)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("ESSWatch.load_state_dict: not an ESSWatch state (version 1)")
        self.schedule.load_state_dict(state["schedule"])
        self._failures = int(state.get("failures", 0))
        self._failed_layers = set(state.get("failed_layers", ()))
        self._samples = int(state.get("samples", 0))
        self._arm()

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook, flush and close the sinks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        self._gate.want = False
        self.capture.detach()
        for sink in self._sinks:
            sink.close()

    def __enter__(self) -> "ESSWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"ESSWatch(layers={self.layer_names}, every_n_steps={self.schedule.every_n_steps}, "
                f"step={self.schedule.step})")
