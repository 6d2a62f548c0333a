"""Validation of :class:`~esswatch.ESSWatch` arguments that no other component checks
(``ValueError`` naming the argument and what is allowed; raised before anything is attached)."""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "check_model_args",
    "check_watch_args",
    "check_watch_options",
    "check_flags",
    "check_probe_batch",
    "as_regularizer",
    "checked_args",
]


def check_model_args(model: Any, *, logdir: Any, writer: Any, background: Any) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"ESSWatch expects an nn.Module, got {type(model).__name__}")
    if logdir is not None and writer is not None:
        raise ValueError("ESSWatch: pass logdir= or writer=, not both")
    if background is not None and not isinstance(background, bool):
        raise ValueError(f"background must be None, True or False, got {background!r}")


def check_flags(**flags: Any) -> None:
    """Each keyword must be a bool."""
    for n, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{n} must be a bool, got {v!r}")


def check_probe_batch(pb: Any) -> None:
    import torch

    if pb is not None and not isinstance(pb, (torch.Tensor, tuple, list, dict)):
        raise ValueError(
            "probe_batch must be a tensor, a tuple/list of positional arguments or a dict of "
            f"keyword arguments, got {type(pb).__name__}"
        )


def as_regularizer(reg: Any):
    """The ``regularizer=`` option as an :class:`esswatch.Regularizer` (or ``None``)."""
    from .regularizer import Regularizer

    if reg is None or isinstance(reg, Regularizer):
        return reg
    if isinstance(reg, bool) or not isinstance(reg, (int, float)):
        raise ValueError(f"regularizer must be a weight (float), an esswatch.Regularizer or None, got {reg!r}")
    return Regularizer(float(reg))


def check_watch_args(*, logdir: Any, images: Any, histograms: Any) -> None:
    if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
        raise ValueError(f"logdir must be a path (str or os.PathLike) or None, got {type(logdir).__name__}")
    if not isinstance(histograms, bool):
        raise ValueError(f"histograms must be a bool, got {histograms!r}")
    if not isinstance(images, (bool, int)) or (not isinstance(images, bool) and images < 0):
        raise ValueError(f"images must be a bool or an int >= 0 (every n-th sampled step), got {images!r}")


def check_watch_options(**options: Any) -> None:
    """Validate :class:`~esswatch.ESSWatch` keyword options without a model (the framework
    callbacks call this in their constructors, so a bad option fails at once, not when training
    starts). Unknown names raise ``TypeError``; bad values ``ValueError`` naming the option."""
    import inspect

    from ..engine.validation import check_positive_int
    from .measure import MeasureConfig
    from .schedule import Schedule
    from .watch import ESSWatch

    params = inspect.signature(ESSWatch.__init__).parameters
    allowed = [n for n in params if n not in ("self", "model")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown ESSWatch option(s) {unknown}; allowed: {', '.join(allowed)}")
    opt = {n: options.get(n, params[n].default) for n in allowed}
    Schedule(opt["every_n_steps"])
    MeasureConfig(
        indices=opt["indices"],
        estimator=opt["estimator"],
        metrics=opt["metrics"],
        tol=opt["tol"],
        relative=opt["relative"],
    )
    for n in ("batch_rows", "heads"):
        check_positive_int(n, opt[n], allow_none=True)
    check_flags(strict=opt["strict"], reduce=opt["reduce"], train_forwards_only=opt["train_forwards_only"])
    as_regularizer(opt["regularizer"])
    check_probe_batch(opt["probe_batch"])
    check_watch_args(logdir=opt["logdir"], images=opt["images"], histograms=opt["histograms"])


def checked_args(
    model, logdir, writer, background, images, histograms, budget_seconds, strict, reduce, train_forwards_only,
    probe_batch, regularizer,
):  # fmt: skip
    """Check :class:`~esswatch.ESSWatch`'s constructor arguments (in this order, before anything is
    attached); return its :class:`esswatch.Regularizer` (or ``None``) and its budget."""
    from .budget import Budget

    check_model_args(model, logdir=logdir, writer=writer, background=background)
    check_watch_args(logdir=logdir, images=images, histograms=histograms)
    budget = Budget.of(budget_seconds)
    check_flags(strict=strict, reduce=reduce, train_forwards_only=train_forwards_only)
    check_probe_batch(probe_batch)
    return as_regularizer(regularizer), budget
