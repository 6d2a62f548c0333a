"""PyTorch Lightning adapter: :class:`ESSCallback`.

::

    import lightning as L
    from esswatch.integrations.lightning import ESSCallback

    trainer = L.Trainer(callbacks=[ESSCallback(every_n_steps=100)])
    trainer.fit(model, loader)

A thin adapter over :class:`esswatch.ESSWatch` (all measuring happens there):

- the watch is built at ``setup("fit")`` on the LightningModule and closed at teardown;
- steps: the step of a batch is ``trainer.global_step`` at batch start (fed with :meth:`ESSWatch.set_step`, so
  accumulated micro-batches share one step and a resumed run keeps the schedule; manual optimization: the loggers'
  batch count). Lightning logs a batch's loss at that step when ``(step + 1) % log_every_n_steps == 0``; the callback
  samples the same way, the steps ``n - 1, 2n - 1, ...`` for ``every_n_steps=n`` (the n-th, 2n-th, ... batch), and
  logs at that step, so ESS and the loss share the x axis whenever ``n`` is a multiple of ``log_every_n_steps``
  (setup warns otherwise);
- profile images: ``images=`` as in :class:`~esswatch.ESSWatch` (default every 10th sample, ``True`` every one);
- results go to every logger of the trainer, from rank zero: a ``TensorBoardLogger`` receives everything the watch
  writes (scalars, per-head histograms, profile images, the custom-scalars layout, the configuration) through its own
  ``SummaryWriter``; any other logger (``CSVLogger``, W&B, MLflow, ...) receives the scalars through
  ``log_metrics(scalars, step)``. ``logdir=`` also writes TensorBoard files there (required without a logger);
- validation and sanity-check forwards are never recorded;
- the watch's state is saved in checkpoints (``Callback.state_dict``, after an outstanding background sample);
- ``regularizer=``: the penalty of :meth:`ESSWatch.penalty` is added to the loss Lightning
  backpropagates, in the ``on_before_backward`` hook (see :meth:`ESSCallback.on_before_backward`;
  manual optimization adds :meth:`ESSCallback.penalty` itself), and the watch logs it
  (``ess/penalty/total``, ``ess/penalty/<layer>``) on its measured steps.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch

from esswatch.watch import ESSWatch, Sink, TensorBoardSink

from ._adapter import check_callback_options, warn_unaligned, watch_options
from ._versions import SUPPORTED_LIGHTNING, require

__all__ = ["ESSCallback", "LightningLoggerSink", "SUPPORTED_LIGHTNING"]

#: ESSWatch's own defaults, so that the callback's TensorBoard output follows the same rules
_WATCH_DEFAULTS = {
    k: p.default for k, p in inspect.signature(ESSWatch).parameters.items() if k in ("histograms", "images")
}

require("lightning", SUPPORTED_LIGHTNING, "lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402


class LightningLoggerSink(Sink):
    """Sends each result to every logger of a Lightning trainer (called on rank zero only).

    A :class:`~lightning.pytorch.loggers.TensorBoardLogger` gets a :class:`~esswatch.watch.TensorBoardSink` on its
    ``experiment`` writer (all tags, histograms, images, layout, configuration text); any other logger gets the flat
    ``{tag: value}`` scalars through ``log_metrics(scalars, step=result["step"])``."""

    def __init__(
        self, loggers: Iterable[Any], *, histograms: bool = True, images: Union[bool, int] = _WATCH_DEFAULTS["images"]
    ) -> None:
        self.loggers = list(loggers)
        self.histograms = histograms
        self.images = images
        self._tb: Dict[int, TensorBoardSink] = {}

    def _tensorboard(self, logger: TensorBoardLogger) -> TensorBoardSink:
        sink = self._tb.get(id(logger))
        if sink is None:  # the writer is created lazily by the logger, on rank zero
            sink = self._tb[id(logger)] = TensorBoardSink(
                writer=logger.experiment, histograms=self.histograms, images=self.images
            )
        return sink

    def start(self, config: Dict[str, Any]) -> None:
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._tensorboard(logger).start(config)

    def write(self, result: Dict[str, Any]) -> None:
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._tensorboard(logger).write(result)
            else:
                logger.log_metrics(dict(result["scalars"]), step=result["step"])

    def close(self) -> None:
        for sink in self._tb.values():
            sink.close()  # flushes; the logger owns and closes the writer
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                logger.save()


def _logging_step(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> int:
    """The step Lightning logs this batch's metrics at: ``global_step``, except under manual optimization, where
    it counts ``optimizer.step()`` calls and the loggers count batches (``_batches_that_stepped``)."""
    if pl_module.automatic_optimization:
        return trainer.global_step
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


class ESSCallback(pl.Callback):
    """Measure and log each sequence-mixing layer's ESS during ``Trainer.fit``.

    Args:
        every_n_steps: measure the training forward of every ``every_n_steps``-th optimizer step
            (``trainer.global_step`` n - 1, 2n - 1, ..., where Lightning logs the loss with ``log_every_n_steps``
            dividing n).
        logdir: also write TensorBoard event files here (rank zero); needed without a logger (``logger=False``).
        regularizer: the ESS regularizer's weight (``None`` or ``0`` = off), or an :class:`esswatch.Regularizer`;
            passed to :class:`~esswatch.ESSWatch`, whose penalty is added to the training loss (automatic
            optimization; see :meth:`on_before_backward`).
        sinks: more destinations for the results (see :class:`~esswatch.ESSWatch`).
        **watch_kwargs: any other :class:`~esswatch.ESSWatch` option (``batch_rows``, ``heads``, ``indices``,
            ``estimator``, ``metrics``, ``layers``, ``probe_batch``, ``reduce``, ``strict``, ``histograms``,
            ``images``, ...). A later fit of the same module continues the watch's state (counters, the budget's
            level); another module's fit starts afresh.

    Attributes:
        watch: the :class:`~esswatch.ESSWatch` of the running fit (``None`` outside it).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        logdir: Optional[str] = None,
        regularizer: Any = None,
        sinks: Iterable[Union[Sink, Callable[[Dict[str, Any]], Any]]] = (),
        **watch_kwargs: Any,
    ) -> None:
        super().__init__()
        self.sinks = check_callback_options(
            every_n_steps,
            logdir=logdir,
            regularizer=regularizer,
            sinks=sinks,
            watch_kwargs=watch_kwargs,
            not_here=("writer", "model"),
            why="the callback logs through the trainer's loggers, and `logdir=`, and watches the LightningModule",
        )
        self.every_n_steps = every_n_steps
        self.logdir = logdir
        self.regularizer = regularizer
        self.watch_kwargs = watch_kwargs
        self.watch: Optional[ESSWatch] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._pending_for: Any = None  # weakref to the module whose fit left _pending_state (None: a checkpoint's)
        self._fit_module: Any = None  # weakref to the module of the running fit
        self._validation = contextlib.ExitStack()  # holds watch.paused() during validation

    # -- lifetime --------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers and self.logdir is None:
            raise MisconfigurationException(
                "ESSCallback: the Trainer has no logger (logger=False) and no `logdir` was given, so the ESS "
                "measurements would go nowhere. Give the Trainer a logger (TensorBoardLogger, CSVLogger, ...) or "
                "pass ESSCallback(logdir='runs/ess')."
            )
        self._close_watch()
        wk = watch_options(self.watch_kwargs, self.regularizer)
        sinks: List[Sink] = []
        if trainer.loggers:
            sinks.append(
                LightningLoggerSink(
                    trainer.loggers,
                    histograms=wk.get("histograms", _WATCH_DEFAULTS["histograms"]),
                    images=wk.get("images", _WATCH_DEFAULTS["images"]),
                )
            )
        if trainer.loggers:
            warn_unaligned(
                self.every_n_steps, "the Trainer's log_every_n_steps", getattr(trainer, "log_every_n_steps", 1) or 1
            )
        self.watch = ESSWatch(pl_module, self.logdir, every_n_steps=self.every_n_steps, sinks=sinks + self.sinks, **wk)
        # sample where Lightning logs the loss: global steps n - 1, 2n - 1, ... (see the module docs)
        self.watch.schedule.offset = self.every_n_steps - 1
        if self.watch.regularizer is not None and not pl_module.automatic_optimization:
            self.watch.close()
            self.watch = None
            raise MisconfigurationException(
                "ESSCallback(regularizer=...) adds the penalty to the loss of automatic optimization. With manual "
                "optimization add it yourself: `self.manual_backward(loss + ess_callback.penalty())`."
            )
        self._validation.close()
        self._fit_module = weakref.ref(pl_module)
        own = self._pending_for is None or self._pending_for() is pl_module  # another model's fit: start afresh
        state = self._pending_state if self._pending_state is not None and own else self.watch.state_dict()
        self.watch.load_state_dict(state)  # (re-)arms the capture under the offset
        self._pending_state = self._pending_for = None

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._close_watch()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._close_watch()

    def _close_watch(self) -> None:
        """Close the watch, keeping its state so that :meth:`state_dict` and a later fit of the same module
        continue it."""
        self._validation.close()
        if self.watch is not None:  # closed first: the last background sample is in the state (also under reduce)
            self.watch.close()
            self._pending_state, self._pending_for = self.watch.state_dict(), self._fit_module
            self.watch = None

    # -- the schedule ----------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        watch = self.watch
        if watch is not None:
            watch.set_step(_logging_step(trainer, pl_module))

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        watch = self.watch
        if watch is None:
            return
        # automatic optimization: an optimizer step completed (not a micro-batch of an accumulated step);
        # manual: every batch is a step of the loggers' axis
        if not pl_module.automatic_optimization or trainer.global_step != watch.global_step:
            watch.step()

    # -- validation (and the sanity check) is never recorded --------------------------
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._validation.close()
        if self.watch is not None:
            self._validation.enter_context(self.watch.paused())

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._validation.close()

    # -- the regularizer -------------------------------------------------------------
    def penalty(self) -> Union[torch.Tensor, float]:
        """The watch's penalty for the forward that just ran (``0.0`` when off or outside fit);
        for manual optimization: ``self.manual_backward(loss + ess_callback.penalty())``."""
        return 0.0 if self.watch is None else self.watch.penalty()

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        """Add the penalty to the loss Lightning is about to backpropagate.

        Lightning hands this hook the tensor it calls ``backward`` on: its own tensor
        ``training_step_loss / accumulate_grad_batches`` (never the user's), multiplied by the
        loss scale under fp16 mixed precision. Adding the penalty to it in place puts
        ``loss + penalty`` into the backward pass without touching ``training_step``; the
        penalty is divided and scaled the same way, so each optimizer step gets the mean
        penalty of its micro-batches. The ``loss`` Lightning logs and shows is copied before
        this hook and stays the task loss; the watch logs the penalty (``ess/penalty/total``
        and per layer) on its measured steps.
        """
        watch = self.watch
        if watch is None or watch.regularizer is None or not pl_module.automatic_optimization:
            return
        p = watch.penalty()
        if not isinstance(p, torch.Tensor) or not p.requires_grad or not loss.requires_grad:
            return
        p = p.to(loss.dtype) / max(int(trainer.accumulate_grad_batches), 1)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 with a GradScaler: Lightning scaled the loss before this hook
            p = scaler.scale(p)
        loss.add_(p)

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        watch = self.watch
        if watch is not None:  # every rank saves: an outstanding background sample is emitted first (all ranks)
            watch.flush()
            return {"watch": watch.state_dict()}
        return {"watch": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = state_dict.get("watch")
        if state is None:
            return
        watch = self.watch
        if watch is not None:
            watch.load_state_dict(state)
        else:
            self._pending_state, self._pending_for = state, None

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"ESSCallback(every_n_steps={self.every_n_steps}, logdir={self.logdir!r}, regularizer={self.regularizer!r})"
        )
