"""When the deflated SLQ of :mod:`.slq` stops: its acceptance checks along the Golub-Kahan steps.

With ``stop`` (``log(1 + rtol)``) the quadrature tries its acceptance test
``half_gap + 2 SE <= stop`` after the steps :meth:`Checks.due` picks, and ends once every batch
entry is accepted (it keeps the values of the last check it passed) or given up (it cannot pass by
the last step, so the caller's exact SVD gets it sooner). Pure bookkeeping on small tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SLQ_FAST_DECAY", "SLQ_FIRST_CHECK", "SLQ_GIVE_UP", "Checks"]

#: with ``stop``: the acceptance test is tried after every step from ``SLQ_FIRST_CHECK`` on (a
#: check is skipped when no open entry could pass there even if its criterion fell as fast as
#: ``step^-SLQ_FAST_DECAY`` since the last check; it falls about as ``step^-1.5`` to ``step^-2``
#: on flat tails, ``examples/benchmarks/flat_tail.py``: between checks on target (b)'s blocks and
#: attention at initialisation 1.5-1.95. A criterion falling faster costs one step past its passing
#: one, never accuracy; 3 cost a check that no head could pass on every block of target (b))
SLQ_FIRST_CHECK = 4
SLQ_FAST_DECAY = 2.0
#: with ``stop``: an entry is given up (rejected) at the first check when its criterion is above
#: ``SLQ_GIVE_UP * stop``, and at a later check when the power law through its last two checked
#: criteria does not reach ``stop`` by ``steps``; the runs end once every entry is accepted or given up
SLQ_GIVE_UP = 6.0


class Checks:
    """The acceptance checks of :func:`~esswatch.engine.slq.slq_entropy` with ``stop`` (module doc): which steps are
    checked, which entries are accepted (with the values of the last check they passed) or given up."""

    def __init__(self, stop: float, steps: int):
        self.stop, self.steps = stop, steps
        self.values = None  # (est, half_gap, se): of the latest check, or an accepted entry's last passing one
        self.accepted = None
        self.last = None  # (step, crit) of the last check (accepted entries: 0)
        self.best_open = math.inf  # the smallest criterion of an entry not yet accepted, at the last check
        self.finished = []  # per flattened entry: accepted or given up at the last check

    def due(self, step: int) -> bool:
        """Whether to check after ``step`` steps: from ``SLQ_FIRST_CHECK`` on, unless no open
        entry could pass yet even if its criterion fell as ``step^-SLQ_FAST_DECAY`` (plain floats:
        no device sync between checks)."""
        if step < SLQ_FIRST_CHECK:
            return False
        if self.last is None:
            return True
        return self.best_open * (self.last[0] / step) ** SLQ_FAST_DECAY <= self.stop

    def update(self, step: int, est, half_gap, se, frozen=None) -> bool:
        """Record the check after ``step`` steps; ``True`` once every entry is accepted or given up.

        ``frozen`` (bool, like ``est``): entries whose runs stopped at an earlier check (their chunk's
        entries were all accepted or given up there); they keep that check's values and status.
        :attr:`finished` lists, per flattened entry, whether it is accepted or given up (or frozen)."""
        crit = half_gap + 2 * se
        if self.values is None:
            self.values = [est, half_gap, se]
            self.accepted = torch.zeros_like(crit, dtype=torch.bool)
            hopeless = ~(crit <= SLQ_GIVE_UP * self.stop)  # NaN: given up
        else:
            # an accepted entry takes the later check's values (more steps, free) only if they pass too
            keep = self.accepted & ~(crit <= self.stop)
            if frozen is not None:
                keep = keep | frozen
            self.values = [torch.where(keep, a, b) for a, b in zip(self.values, (est, half_gap, se))]
            step0, crit0 = self.last
            rate = torch.clamp(torch.log(crit0 / crit) / math.log(step / step0), min=0)
            hopeless = ~(crit * (step / self.steps) ** rate <= self.stop)  # the power law misses by `steps`
        passed = crit <= self.stop
        if frozen is not None:
            passed, hopeless = passed & ~frozen, hopeless | frozen
            crit = torch.where(frozen, self.last[1], crit)
        self.accepted = self.accepted | passed
        self.last = (step, torch.where(self.accepted, torch.zeros_like(crit), crit))
        inf = torch.full((1,), math.inf, dtype=crit.dtype, device=crit.device)
        closed = self.accepted | torch.isnan(crit)
        if frozen is not None:
            closed = closed | frozen
        open_crit = torch.where(closed, math.inf, crit).reshape(-1)
        best = torch.cat([open_crit, inf]).amin()
        finished = (self.accepted | hopeless).reshape(-1).to(crit.dtype)
        # one sync per check: which entries are done, and the floor `due` reads until the next check
        *fin, self.best_open = torch.cat([finished, best[None]]).tolist()
        self.finished = [bool(x) for x in fin]
        return all(self.finished)

    def result(self):
        return tuple(self.values)
