"""``Schedule``: which training steps are sampled, and the step counter.

The schedule is a pure function of the step number (``step % every_n_steps == offset``),
so every rank of a distributed run, and a run resumed from a checkpoint, agrees on
which steps are measured without communicating. Step numbers are 0-based: the
first training step is step 0, the number of optimizer steps completed before it.
``offset`` (default 0) lets an adapter sample the steps its framework logs the loss at
(Lightning: ``n - 1, 2n - 1, ...``).
"""

from __future__ import annotations

from typing import Dict

from ..engine.validation import check_positive_int

__all__ = ["Schedule"]


class Schedule:
    """Every ``every_n_steps``-th step, counted from step ``offset`` (default 0).

    Attributes:
        every_n_steps: the period.
        offset: the first sampled step (``0 <= offset < every_n_steps``).
        step: the number of the current (upcoming, or running) training step.
    """

    def __init__(self, every_n_steps: int, step: int = 0, offset: int = 0) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.step = check_positive_int("step", step, minimum=0)
        self.offset = offset

    @property
    def offset(self) -> int:
        return self._offset

    @offset.setter
    def offset(self, v: int) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.every_n_steps:
            raise ValueError(f"offset must be an int in [0, every_n_steps={self.every_n_steps}), got {v!r}")
        self._offset = v

    def due(self, step: int) -> bool:
        """True when ``step`` is sampled."""
        return step % self.every_n_steps == self._offset

    @property
    def due_now(self) -> bool:
        return self.due(self.step)

    def advance(self) -> int:
        """Move to the next step; returns its number."""
        self.step += 1
        return self.step

    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step, "every_n_steps": self.every_n_steps}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step = check_positive_int("Schedule state: step", state["step"], minimum=0)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"Schedule(every_n_steps={self.every_n_steps}, offset={self._offset}, step={self.step})"
