"""The Trainer's loss hook for the ESS regularizer of an :class:`~.callback.ESSCallback`.

A ``TrainerCallback`` cannot change the loss, so the penalty enters through the Trainer's
``compute_loss_func``: :func:`loss_function` builds it (what
:meth:`ESSCallback.compute_loss_func <.callback.ESSCallback.compute_loss_func>` returns): the
task loss plus the watch's penalty, divided by :func:`penalty_divisor`. :data:`NO_LOSS_HOOK` is
the error when the regularizer is on but the Trainer was not given the hook.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["NO_LOSS_HOOK", "loss_function", "penalty_divisor", "watched_model"]

NO_LOSS_HOOK = (
    "ESSCallback(regularizer=...): a TrainerCallback cannot change the loss, so the penalty enters through the "
    "Trainer's loss hook. Pass it: Trainer(..., callbacks=[ess], compute_loss_func=ess.compute_loss_func())."
)


def loss_function(callback: Any, base: Optional[Callable[..., torch.Tensor]]) -> Callable[..., torch.Tensor]:
    """The ``compute_loss_func`` of ``callback`` (an ``ESSCallback``; documented there); it
    carries ``_esswatch_callback`` so that the callback can tell the Trainer was given it."""

    def loss_func(outputs, labels, num_items_in_batch=None):
        callback._loss_func_calls += 1
        if base is not None:
            loss = base(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            model = watched_model(callback)
            kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            loss = model.loss_function(
                logits=outputs["logits"], labels=labels, vocab_size=model.config.vocab_size, **kw
            )
        if callback.watch is None or not torch.is_grad_enabled() or not callback._watched.training:
            return loss
        p = callback.watch.penalty()
        if not isinstance(p, torch.Tensor):
            return loss
        return loss + p.to(loss.dtype) / penalty_divisor(callback._args, callback._trainer, num_items_in_batch)

    loss_func._esswatch_callback = callback
    return loss_func


def watched_model(callback: Any) -> torch.nn.Module:
    """The model ``callback`` watches (or else its Trainer's model)."""
    if callback._watched is not None:
        return callback._watched
    if callback._trainer is not None:
        return callback._trainer.model
    raise RuntimeError("ESSCallback.compute_loss_func: no model (is the callback in the Trainer's callbacks?)")


def penalty_divisor(args: Any, trainer: Any, num_items_in_batch: Any) -> float:
    """Gradient-accumulation steps times, with ``average_tokens_across_devices``, the world size:
    what the Trainer's handling of a ``compute_loss_func`` loss multiplies the penalty by."""
    ga = getattr(trainer, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
    world = (
        args.world_size
        if (getattr(args, "average_tokens_across_devices", False) and num_items_in_batch is not None)
        else 1
    )
    return float(ga * world)
