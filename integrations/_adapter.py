"""What the framework adapters (:mod:`esswatch.integrations.lightning`,
:mod:`esswatch.integrations.transformers`) share: option checks at construction, the
``ESSWatch`` options they pass on, the warning about ESS steps that are not loss steps, and a
sink that holds the scalars of new results until the framework's log call takes them."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Tuple

from esswatch.engine.validation import check_positive_int
from esswatch.watch import Sink
from esswatch.watch.args import check_watch_options
from esswatch.watch.sinks import as_sinks

__all__ = ["check_callback_options", "watch_options", "warn_unaligned", "PendingScalars"]


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


class PendingScalars(Sink):
    """Holds the scalars of the results written since the adapter's last log call, each with its
    step, until that call takes them (written on rank zero only, like every sink). One
    ``watch.step()`` can emit two: a background result collected and a skipped sample's
    penalty-only result."""

    def __init__(self) -> None:
        self.pending: List[Tuple[int, Dict[str, float]]] = []

    def write(self, result: Dict[str, Any]) -> None:
        self.pending.append((result["step"], dict(result["scalars"])))

    def pop(self) -> List[Tuple[int, Dict[str, float]]]:
        """``[(step, scalars), ...]`` in the order written; empties the sink."""
        out, self.pending = self.pending, []
        return out
