"""Hugging Face ``Trainer`` adapter: :class:`ESSCallback`.

::

    from esswatch.integrations.transformers import ESSCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ESSCallback(every_n_steps=100)])
    trainer.train()

A thin adapter over :class:`esswatch.ESSWatch` (all measuring happens there; the
Hugging Face capture of :mod:`esswatch.integrations.transformers.provider` finds the
attention layers and Mamba mixers):

- the watch is built on ``on_train_begin`` on the Trainer's model and closed on
  ``on_train_end``;
- steps follow the Trainer's own numbering: the forward of the optimizer step that ends
  with ``state.global_step == s`` is measured when ``s`` is a multiple of
  ``every_n_steps`` and logged at ``s``, exactly like the Trainer logs that step's loss
  (so ``every_n_steps == logging_steps`` puts ESS and loss on the same steps);
- TensorBoard gets everything (scalars ``ess/...``, per-head histograms, profile images,
  the custom-scalars layout, the configuration text) through the Trainer's own TensorBoard
  writer (``report_to`` includes ``"tensorboard"``), or through ``writer=`` / a new writer
  in ``logdir=`` (see :mod:`.logstream` for why the Trainer's writer);
- the scalars also go into the Trainer's log stream (``log_to_trainer=True``, the default):
  ``trainer.state.log_history`` and every other ``report_to`` integration (W&B, MLflow,
  ...; those prefix them ``train/``, as every Trainer metric), but not the console or
  progress bar (``console=True`` prints them too, like the loss);
- only the main process (rank zero) logs; every rank measures its own batch
  (``reduce=True`` averages across ranks);
- checkpoints: where the Trainer saves one (``save_strategy`` ``"steps"``, ``"epoch"`` or ``"best"``), the watch's state
  (step, failures, samples, skipped samples, the budget's level; after an outstanding background sample) goes
  into its ``trainer_state.json`` (:mod:`.checkpoint`), and
  ``train(resume_from_checkpoint=...)`` continues it;
- the regularizer: a ``TrainerCallback`` cannot change the loss, so the penalty enters
  through the Trainer's loss hook, ``compute_loss_func``::

      ess = ESSCallback(every_n_steps=100, regularizer=1e-2)
      trainer = Trainer(..., callbacks=[ess], compute_loss_func=ess.compute_loss_func())

  The function computes the model's own loss (``model.loss_function``, what the model's
  ``forward`` would compute from ``labels``) or the ``base`` you give it, and adds the
  penalty; the watch logs the penalty (``ess/penalty/total`` and per layer) on its
  measured steps.

How the callback reaches ``Trainer.log``: ``TrainerCallback`` events do not receive the
Trainer, so on ``on_train_begin`` the callback looks up the calling ``Trainer`` whose
callback list holds it (by identity). Call :meth:`ESSCallback.bind` to give it the
Trainer explicitly instead. The loss function of :meth:`ESSCallback.compute_loss_func` is built
in :mod:`.loss`.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch

from esswatch.watch import ESSWatch, Sink

from .._adapter import PendingScalars, check_callback_options, warn_unaligned, watch_options
from .._versions import SUPPORTED_TRANSFORMERS, require

__all__ = ["ESSCallback", "SUPPORTED_TRANSFORMERS"]

require("transformers", SUPPORTED_TRANSFORMERS, "transformers")

import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from . import provider as _provider  # noqa: E402,F401  (registers the Hugging Face capture provider)
from .checkpoint import restore_watch_state, save_watch_state  # noqa: E402
from .logstream import log_quietly, trainer_tensorboard_writer  # noqa: E402
from .loss import NO_LOSS_HOOK, loss_function  # noqa: E402


def _check_alignment(every_n_steps: int, args: Any, state: Any) -> None:
    """Warn when the ESS steps cannot all be steps of the logged loss (per epoch: where the state says how
    many steps an epoch has, ``max_steps`` a whole number of epochs)."""
    strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
    if strategy == "steps" and args.logging_steps >= 1:
        warn_unaligned(every_n_steps, "logging_steps", int(args.logging_steps), stacklevel=4)
    epochs, steps = int(getattr(state, "num_train_epochs", 0) or 0), int(getattr(state, "max_steps", 0) or 0)
    if strategy == "epoch" and epochs >= 1 and steps >= epochs and steps % epochs == 0:
        warn_unaligned(every_n_steps, "the steps per epoch (logging_strategy='epoch')", steps // epochs, stacklevel=4)


def _calling_trainer(callback: "ESSCallback") -> Optional["transformers.Trainer"]:
    """The ``Trainer`` on the call stack whose callback handler holds ``callback``."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, transformers.Trainer) and any(
            cb is callback for cb in getattr(getattr(obj, "callback_handler", None), "callbacks", ())
        ):
            return obj
        frame = frame.f_back
    return None


class ESSCallback(TrainerCallback):
    """Measure and log each sequence-mixing layer's ESS during ``Trainer.train``.

    Args:
        every_n_steps: measure the steps ``every_n_steps, 2 * every_n_steps, ...`` of the
            Trainer's ``state.global_step``.
        writer: write TensorBoard data to this ``torch.utils.tensorboard.SummaryWriter``
            instead of the Trainer's own TensorBoard writer.
        logdir: or to a new TensorBoard writer in this directory.
        log_to_trainer: also put the scalars into ``trainer.state.log_history`` and every
            ``report_to`` integration other than TensorBoard (default ``True``).
        console: with ``log_to_trainer``, also show them on the console / progress bar
            (default ``False``: one dict of every tag per sample would flood it).
        regularizer: the ESS regularizer's weight (``None`` or ``0`` = off) or an
            :class:`esswatch.Regularizer`, passed to :class:`~esswatch.ESSWatch`; also pass
            ``compute_loss_func=callback.compute_loss_func()`` to the Trainer.
        sinks: more destinations for the results (see :class:`~esswatch.ESSWatch`).
        **watch_kwargs: any other :class:`~esswatch.ESSWatch` option (``batch_rows``,
            ``heads``, ``indices``, ``estimator``, ``metrics``, ``layers``, ``probe_batch``,
            ``reduce``, ``strict``, ``histograms``, ``images``, ...).

    Attributes:
        watch: the :class:`~esswatch.ESSWatch` of the running ``train()`` (``None`` outside it).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        writer: Any = None,
        logdir: Optional[str] = None,
        log_to_trainer: bool = True,
        console: bool = False,
        regularizer: Any = None,
        sinks: Iterable[Union[Sink, Callable[[Dict[str, Any]], Any]]] = (),
        **watch_kwargs: Any,
    ) -> None:
        self.sinks = check_callback_options(
            every_n_steps,
            logdir=logdir,
            regularizer=regularizer,
            sinks=sinks,
            watch_kwargs=watch_kwargs,
            not_here=("model",),
            why="the callback watches the Trainer's model",
        )
        if writer is not None and logdir is not None:
            raise ValueError("ESSCallback: pass writer= or logdir=, not both")
        for nm, v in (("log_to_trainer", log_to_trainer), ("console", console)):
            if not isinstance(v, bool):
                raise ValueError(f"{nm} must be a bool, got {v!r}")
        self.log_to_trainer = log_to_trainer
        self.console = console
        self.every_n_steps = every_n_steps
        self.regularizer = regularizer
        self.watch_kwargs = watch_kwargs
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}")
        self.writer = writer
        self.logdir = logdir
        self._pending = PendingScalars()
        self._trainer = None
        self._args = None
        self._watched: Optional[torch.nn.Module] = None
        self.watch: Optional[ESSWatch] = None
        self._loss_func_calls = 0

    # -- wiring ----------------------------------------------------------------------
    def bind(self, trainer: "transformers.Trainer") -> "ESSCallback":
        """Give the callback its Trainer explicitly (otherwise found on ``on_train_begin``)."""
        if not isinstance(trainer, transformers.Trainer):
            raise ValueError(f"ESSCallback.bind expects a transformers.Trainer, got {type(trainer).__name__}")
        self._trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ESSCallback: the Trainer passed no model to on_train_begin")
        if self._trainer is None:
            self._trainer = _calling_trainer(self)
        own_writer = self.writer is not None or self.logdir is not None
        if not own_writer and self._trainer is None:
            raise RuntimeError(
                "ESSCallback could not find the Trainer running it, so it cannot use the Trainer's TensorBoard writer "
                "or log stream. Call `callback.bind(trainer)` before `trainer.train()`, or give the callback its "
                "own TensorBoard writer: ESSCallback(writer=...) or ESSCallback(logdir=...)."
            )
        self._close_watch()
        self._args = args
        self._watched = model
        self._loss_func_calls = 0
        wk = watch_options(self.watch_kwargs, self.regularizer)
        writer = self.writer if own_writer else trainer_tensorboard_writer(self._trainer)
        to_trainer = self.log_to_trainer and self._trainer is not None
        if state.is_world_process_zero and writer is None and self.logdir is None and not to_trainer and not self.sinks:
            raise ValueError(
                'ESSCallback: the measurements would go nowhere: report_to has no "tensorboard", '
                "no writer=/logdir= was given, log_to_trainer=False and no sinks=."
            )
        sinks = ([self._pending] if to_trainer else []) + self.sinks
        _check_alignment(self.every_n_steps, args, state)
        self.watch = ESSWatch(model, self.logdir, writer=writer, every_n_steps=self.every_n_steps, sinks=sinks, **wk)
        self.watch.step_base = 1  # the Trainer's steps: the first sample (step n) gets the first profile image
        hooked = getattr(getattr(self._trainer, "compute_loss_func", None), "_esswatch_callback", None) is self
        if self.watch.regularizer is not None and self._trainer is not None and not hooked:
            self._close_watch()
            raise ValueError(NO_LOSS_HOOK)
        restore_watch_state(self.watch, state)

    def on_train_end(self, args, state, control, **kwargs):
        background = self.watch is not None and self.watch.background
        self._close_watch()  # waits for a background sample and emits it
        if background:
            self._log_pending(state, control)

    def _close_watch(self) -> None:
        if self.watch is not None:
            self.watch.close()  # flushes a given writer, closes the one it opened in logdir
            self.watch = None

    # -- the schedule ----------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self.watch is not None:
            # the step now starting ends with state.global_step == global_step + 1
            self.watch.set_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.watch is None:
            return
        if self.watch.regularizer is not None and self._loss_func_calls == 0:
            self._close_watch()
            raise ValueError(NO_LOSS_HOOK)
        if self.watch.global_step == state.global_step:
            self.watch.step()
        # the last step: a save may follow at the epoch's end or an evaluation, after a background watch is closed
        save_watch_state(self.watch, state, control, always=control.should_training_stop)
        if control.should_training_stop and self.watch.background:
            # the last sample now, while the Trainer's TensorBoard writer is open (TensorBoardCallback's
            # on_train_end, which closes it, runs before this callback's)
            self._close_watch()
        self._log_pending(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.watch is not None:  # save_strategy="epoch"
            save_watch_state(self.watch, state, control)
            self._log_pending(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.watch is not None and getattr(args, "save_strategy", None) == "best":  # a save may follow
            save_watch_state(self.watch, state, control, always=True)
            self._log_pending(state, control)

    def _log_pending(self, state, control) -> None:
        if self._trainer is None:
            self._pending.pop()
            return
        current = state.global_step
        for step, logs in self._pending.pop():
            # a background result (ESSWatch(background=True)) arrives after its step: it is
            # logged with the step it was sampled at
            state.global_step = step
            try:
                log_quietly(self._trainer, self._args, state, control, logs, console=self.console, exclude=(self,))
            finally:
                state.global_step = current

    # -- the regularizer -------------------------------------------------------------
    def penalty(self) -> Union[torch.Tensor, float]:
        """The watch's current penalty (``0.0`` when the regularizer is off or outside training)."""
        return 0.0 if self.watch is None else self.watch.penalty()

    def compute_loss_func(self, base: Optional[Callable[..., torch.Tensor]] = None) -> Callable[..., torch.Tensor]:
        """A ``compute_loss_func`` for the Trainer: the task loss plus the ESS penalty.

        Args:
            base: ``base(outputs, labels, num_items_in_batch=None) -> loss``; default: the
                model's own loss, ``model.loss_function(logits=outputs.logits, labels=labels,
                vocab_size=model.config.vocab_size, num_items_in_batch=...)``, which is what
                the model's ``forward`` computes when given ``labels``.

        The Trainer does not divide a ``compute_loss_func`` loss by the gradient-accumulation
        steps (it is normalized by ``num_items_in_batch`` over the accumulated batch) and, with
        ``average_tokens_across_devices``, multiplies it by the number of processes; the
        penalty is divided by both, so that each optimizer step gets the mean penalty of its
        micro-batches (averaged over ranks by DDP). No penalty is added in evaluation.
        """
        return loss_function(self, base)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"ESSCallback(every_n_steps={self.every_n_steps}, regularizer={self.regularizer!r})"
