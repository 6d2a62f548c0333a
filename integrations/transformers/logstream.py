"""How :class:`~esswatch.integrations.transformers.ESSCallback` reaches the Trainer's
TensorBoard writer and its log stream.

TensorBoard: the ``report_to="tensorboard"`` integration (``TensorBoardCallback``) opens
its ``SummaryWriter`` in its ``on_train_begin``, which runs before the user's callbacks.
The callback writes through that same writer (:func:`trainer_tensorboard_writer`): one
event file per run, so TensorBoard's live reload sees everything (two event files written
at once in one folder are tailed one at a time), with the tags ``ess/...`` of
:mod:`esswatch.watch.tags`, per-head histograms, profile images, the custom-scalars
layout and the configuration text.

The log stream (:func:`log_quietly`): ``Trainer.log`` appends to ``state.log_history`` and
calls every callback's ``on_log``, including the console printers (``ProgressCallback``
writes each dict above the progress bar, ``PrinterCallback`` prints it). The ESS scalars
(4 per layer and metric, plus the model and bookkeeping) would flood the console, so
:func:`log_quietly` does what ``Trainer.log`` does, but dispatches ``on_log`` only to the
other callbacks (W&B, MLflow, Comet, ..., and the user's), leaving out the printers unless
``console=True``, and always leaving out ``TensorBoardCallback`` (TensorBoard already gets
every value from the writer above; through the stream it would get a second copy under
``train/ess/...``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["trainer_tensorboard_writer", "log_quietly", "excluded_callbacks"]


def _tensorboard_callback_type() -> Optional[type]:
    try:
        from transformers.integrations import TensorBoardCallback
    except Exception:  # noqa: BLE001 - an integration that cannot be imported is simply absent
        return None
    return TensorBoardCallback


def excluded_callbacks(console: bool) -> Tuple[type, ...]:
    """The callback types :func:`log_quietly` leaves out."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    types = [t for t in (_tensorboard_callback_type(),) if t is not None]
    if not console:
        types += [PrinterCallback, ProgressCallback]
        try:
            from transformers.utils.notebook import NotebookProgressCallback

            types.append(NotebookProgressCallback)
        except Exception:  # noqa: BLE001 - no notebook support installed
            pass
    return tuple(types)


def trainer_tensorboard_writer(trainer: Any) -> Any:
    """The ``SummaryWriter`` of the trainer's ``TensorBoardCallback`` (``None`` when
    ``report_to`` has no TensorBoard, or on ranks other than the main process)."""
    tb = _tensorboard_callback_type()
    if tb is None or trainer is None:
        return None
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, tb) and getattr(cb, "tb_writer", None) is not None:
            return cb.tb_writer
    return None


def log_quietly(
    trainer: Any,
    args: Any,
    state: Any,
    control: Any,
    logs: Dict[str, float],
    *,
    console: bool = False,
    exclude: Tuple[Any, ...] = (),
) -> None:
    """``Trainer.log(logs)`` without the console printers (unless ``console``) and without
    ``TensorBoardCallback``: appends ``{**logs, "epoch", "step"}`` to ``state.log_history``
    and calls ``on_log`` of every other callback (except the objects in ``exclude``).
    The Trainer's own decision to log at this step (``control.should_log``) is kept."""
    handler = trainer.callback_handler
    skip = excluded_callbacks(console)
    keep = [cb for cb in handler.callbacks if not isinstance(cb, skip) and not any(cb is e for e in exclude)]
    logs = dict(logs)
    if state.epoch is not None:
        logs["epoch"] = state.epoch
    state.log_history.append({**logs, "step": state.global_step})
    saved, should_log = handler.callbacks, control.should_log
    handler.callbacks = keep
    try:
        handler.on_log(args, state, control, logs)
    finally:
        handler.callbacks = saved
        control.should_log = should_log
