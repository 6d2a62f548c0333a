"""What the framework adapters (:mod:`esswatch.integrations.lightning`,
:mod:`esswatch.integrations.transformers`) share: option checks at construction, the
``ESSWatch`` options they pass on, the warning about ESS steps that are not loss steps, and a
sink that holds the latest scalars until the framework's log call takes them."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Optional

from esswatch.engine.validation import check_positive_int
from esswatch.watch import Sink
from esswatch.watch.args import check_watch_options
from esswatch.watch.sinks import as_sinks

__all__ = ["check_callback_options", "watch_options", "warn_unaligned", "LatestScalars"]


def check_callback_options(
    every_n_steps: Any,
    *,
    logdir: Any,
    regularizer: Any,
    sinks: Any,
    watch_kwargs: Dict[str, Any],
    not_here: Iterable[str] = (),
    why: str = "",
) -> List[Sink]:
    """Validate a callback's options at once (``TypeError`` for an option the callback sets
    itself, ``ValueError`` naming a bad value); returns the ``sinks`` as :class:`Sink` objects."""
    for bad in not_here:
        if bad in watch_kwargs:
            raise TypeError(f"ESSCallback: `{bad}=` is not an option here ({why})")
    check_positive_int("every_n_steps", every_n_steps)
    check_watch_options(every_n_steps=every_n_steps, logdir=logdir, regularizer=regularizer, **watch_kwargs)
    return as_sinks(sinks)


def watch_options(watch_kwargs: Dict[str, Any], regularizer: Any) -> Dict[str, Any]:
    """The keyword options the callback passes to :class:`~esswatch.ESSWatch`."""
    wk = dict(watch_kwargs)
    if regularizer is not None:
        wk["regularizer"] = regularizer
    return wk


def warn_unaligned(every_n_steps: int, setting: str, log_every: int, stacklevel: int = 3) -> None:
    """Warn when ``every_n_steps`` is not a multiple of the framework's loss-logging period."""
    if log_every >= 1 and every_n_steps % log_every:
        warnings.warn(
            f"ESSCallback(every_n_steps={every_n_steps}) is not a multiple of {setting}={log_every}: "
            "the ESS steps will not all be steps of the logged loss.",
            UserWarning,
            stacklevel=stacklevel,
        )


class LatestScalars(Sink):
    """Keeps the scalars of the latest result, and its step, until the adapter hands them to the
    framework's log call (written on rank zero only, like every sink)."""

    def __init__(self) -> None:
        self.scalars: Optional[Dict[str, float]] = None
        self.step: Optional[int] = None

    def write(self, result: Dict[str, Any]) -> None:
        self.scalars = dict(result["scalars"])
        self.step = result["step"]

    def pop(self) -> Optional[Dict[str, float]]:
        out, self.scalars = self.scalars, None
        return out
