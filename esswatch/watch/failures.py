"""The layer-failure policy of an :class:`~esswatch.ESSWatch`: the one place that decides what a
failed measurement does.

A failure (a layer's operator, measurement or penalty term raised; the ``probe_batch`` forward
raised; the background worker died) either raises :class:`ESSMeasurementError` (``strict=True``)
or is counted (``ess/failures``) and warned about once per name (:class:`ESSWarning`); training
continues and the layer is skipped.
"""

from __future__ import annotations

import warnings
from typing import Optional, Set

__all__ = ["ESSWarning", "ESSMeasurementError", "FailurePolicy"]


class ESSWarning(RuntimeWarning):
    """A layer's measurement was skipped (issued once per layer)."""


class ESSMeasurementError(RuntimeError):
    """``strict=True``: a layer's measurement failed (names the layer and the step)."""


class FailurePolicy:
    """``count``: failures so far on this rank; ``names``: the names already warned about."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.count = 0
        self.names: Set[str] = set()

    def fail(self, name: str, step: int, err: BaseException, what: Optional[str] = None) -> None:
        """Apply the policy to ``err`` raised by ``name`` (described as ``what``, default
        ``layer 'name'``) at ``step``: raise when strict, else count and warn once per name."""
        what = what or f"layer {name!r}"
        if self.strict:
            raise ESSMeasurementError(f"esswatch: {what} at step {step} failed: {type(err).__name__}: {err}") from err
        self.count += 1
        if name not in self.names:
            self.names.add(name)
            warnings.warn(
                f"esswatch: skipped {what} at step {step}: {type(err).__name__}: {str(err).rstrip('.')}. "
                "Training continues; later failures of this layer are only counted (tag ess/failures). "
                "Pass strict=True to raise instead.",
                ESSWarning,
                stacklevel=4,
            )
