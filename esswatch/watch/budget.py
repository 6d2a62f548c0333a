"""``budget_seconds``: fix how much each sample measures so that it takes about that long.

The first sample is measured as configured and timed per layer twice: once at a single
index (the middle one) and once at the configured indices. Per layer this gives a fixed
part (building the operator, one index) and a per-index part, with an index ``i`` of an
``L``-long operator weighted by the cost of decomposing its ``(L - i) x i`` block,
``(L - i) * i * min(i, L - i)`` (over-estimates the saving of dropping indices for the
cheaper estimators: errs on the safe side). Everything scales with the kept batch rows and
heads. The watch then picks the first level of this ladder whose predicted time is at most
``TARGET`` (0.8) times the budget, and keeps it for the rest of the run (curves stay
comparable). Each count on the ladder steps down by one up to ``FINE_BELOW`` (16) and by about
a fifth above it (:func:`_counts`), so the chosen level uses most of the budget (halving left
later samples at 0.4-0.65 of it):

1. **batch rows**, down to 1: rows are samples of the same quantity, so fewer rows
   only make each value noisier; every head, index and statistic keeps its meaning;
2. **indices**, down to 1 (spread evenly as before): the ESS-versus-index profile
   gets coarser and ``avg`` / ``max`` average / maximize over fewer positions (``max`` can
   only drop), but every head is still measured;
3. **heads / channels**, down to 1: the last resort, since ``total`` ESS then sums
   fewer heads (its scale changes) and per-head histograms lose heads.

If even the smallest level is predicted over budget, that level is used and a warning says
so. With ``reduce=True`` the ranks agree on the most cut level of any rank (one small
``all_reduce``), so they keep measuring the same thing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from .measure import IndexSpec, MeasureConfig, Spread, select_indices, spread_of

__all__ = ["Budget", "FINE_BELOW", "TARGET", "validate_budget", "agree_min"]

#: the level is chosen so that the predicted time is at most this fraction of the budget
TARGET = 0.8
#: ladder counts step down by one up to this, by about a fifth above it
FINE_BELOW = 16


def validate_budget(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget_seconds must be None or a finite number > 0, got {value!r}")
    return float(value)


def _weight(i: int, L: int) -> float:
    return float((L - i) * i * min(i, L - i))


@functools.lru_cache(maxsize=256)
def _cost(indices: Tuple[int, ...], L: int) -> float:
    """The summed weight of ``indices`` (cached: the ladder asks for the same sets at every level)."""
    return sum(_weight(i, L) for i in indices)


def _counts(n: int) -> List[int]:
    """``n`` and the smaller counts the ladder tries, descending to 1: each step removes one up
    to ``FINE_BELOW``, about a fifth above it (a few dozen levels even for thousands of indices)."""
    out = [n]
    while out[-1] > 1:
        c = out[-1]
        out.append(c - 1 if c <= FINE_BELOW else max(FINE_BELOW, (4 * c) // 5))
    return out


def _spread(spec: IndexSpec, n: int) -> IndexSpec:
    """``n`` indices of the configured ones (an int count for an int / ``"all"`` spec; for a list, ``n`` of
    those that fit each sequence: :class:`~esswatch.watch.measure.Spread`)."""
    if isinstance(spec, tuple):
        return spec if n >= len(spec) else Spread(spec, n)
    return n


class Budget:
    """The budget's state: ``level`` is ``None`` until the first sample was timed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.level: Optional[Dict[str, Any]] = None
        self.warning: Optional[str] = None

    @classmethod
    def of(cls, seconds: Optional[float]) -> Optional["Budget"]:
        """The budget for ``budget_seconds=seconds`` (validated; ``None`` = no budget)."""
        return None if seconds is None else cls(validate_budget(seconds))

    @property
    def decided(self) -> bool:
        return self.level is not None

    def _ladder(self, timings: Dict[str, Dict[str, Any]]) -> List[Tuple[int, int, int]]:
        rows = max(t["rows"] for t in timings.values())
        heads = max(t["heads"] for t in timings.values())
        n_idx = max(len(t["indices"]) for t in timings.values())
        ladder = [(r, n_idx, heads) for r in _counts(rows)]
        ladder += [(1, n, heads) for n in _counts(n_idx)[1:]]
        ladder += [(1, 1, h) for h in _counts(heads)[1:]]
        return ladder

    @staticmethod
    def predict(timings: Dict[str, Dict[str, Any]], cfg: MeasureConfig, level: Tuple[int, int, int]) -> float:
        rows, n_idx, heads = level
        spec = cfg.indices if n_idx >= max(len(t["indices"]) for t in timings.values()) else _spread(cfg.indices, n_idx)
        total = 0.0
        for t in timings.values():
            L = t["seq_len"]
            c_full = _cost(tuple(t["indices"]), L)
            c_one = _cost(tuple(t["one"]), L)
            per = 0.0
            if c_full > c_one:
                per = max(0.0, (t["t_full"] - t["t_one"]) / (c_full - c_one))
            fixed = max(0.0, t["t_full"] - per * c_full, min(t["t_one"], t["t_full"]) - per * c_one)
            c_new = _cost(tuple(select_indices(spec, L)), L)
            scale = min(rows, t["rows"]) / t["rows"] * min(heads, t["heads"]) / t["heads"]
            total += scale * (fixed + per * c_new)
        return total

    def decide(
        self, timings: Dict[str, Dict[str, Any]], cfg: MeasureConfig, first_seconds: float, agree=None
    ) -> Optional[Dict[str, Any]]:
        """Choose the level from the first sample's ``timings`` (see :func:`run_job`); ``agree``
        (the distributed case) maps this rank's ``(rows, indices, heads)`` to the ranks'
        componentwise minimum. ``None`` (still undecided) when no rank timed any layer."""
        choice: Optional[Tuple[int, int, int]] = None
        full = None
        if timings:
            ladder = self._ladder(timings)
            full = ladder[0]
            choice = ladder[-1]
            for level in ladder:
                if self.predict(timings, cfg, level) <= TARGET * self.seconds:
                    choice = level
                    break
        if agree is not None:
            choice = agree(choice)
        if choice is None:
            return None
        rows, n_idx, heads = choice
        if full is None:
            full = choice
        predicted = self.predict(timings, cfg, choice) if timings else None
        if predicted is not None and predicted > self.seconds:
            self.warning = (
                f"esswatch: budget_seconds={self.seconds:g} cannot be met: the smallest measurement "
                f"({rows} batch row(s), {n_idx} index(es), {heads} head(s)) is predicted to take "
                f"{predicted:.3g} s per sample"
            )
        cut_idx = n_idx < full[1]
        self.level = {
            "seconds": self.seconds,
            "batch_rows": rows,
            "heads": heads,
            "indices": (list(spread_of(cfg.indices, n_idx)) if isinstance(cfg.indices, tuple) else n_idx)
            if cut_idx
            else (list(cfg.indices) if isinstance(cfg.indices, tuple) else cfg.indices),
            "cut": [
                k
                for k, a, b in (("batch_rows", rows, full[0]), ("indices", n_idx, full[1]), ("heads", heads, full[2]))
                if a < b
            ],
            "first_sample_seconds": first_seconds,
            "predicted_seconds": predicted,
        }
        return self.level

    def measure_config(self, cfg: MeasureConfig) -> MeasureConfig:
        ind = self.level["indices"]
        if isinstance(ind, list) and isinstance(cfg.indices, tuple):  # n of the configured list, per sequence
            ind = _spread(cfg.indices, len(ind))
        return dataclasses.replace(cfg, indices=tuple(ind) if isinstance(ind, list) else ind)

    def as_dict(self) -> Optional[Dict[str, Any]]:
        return None if self.level is None else dict(self.level, cut=list(self.level["cut"]))


def apply(budget: "Budget", outcome, watch, agree=None) -> bool:
    """Decide the level from a calibration ``outcome`` and apply it to ``watch`` (its capture's
    rows / heads, its measure config's indices). True when something was cut."""
    level = budget.decide(outcome.timings, watch.measure_config, outcome.seconds, agree=agree)
    if level is None:
        return False
    return _cut(budget, level, watch)


def validated_level(level: Any) -> Optional[Dict[str, Any]]:
    """A checkpointed level (:meth:`Budget.as_dict`), checked field by field (``ValueError``)."""
    if level is None:
        return None
    what = "ESSWatch.load_state_dict: budget"
    if not isinstance(level, dict):
        raise ValueError(f"{what} must be None or a dict (Budget.as_dict), got {type(level).__name__}")
    for key in ("batch_rows", "heads"):
        v = level.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{what}.{key} must be None or an int >= 1, got {v!r}")
    cut, ind, sec = level.get("cut"), level.get("indices"), level.get("seconds")
    if not isinstance(cut, (list, tuple)) or not set(cut) <= {"batch_rows", "indices", "heads"}:
        raise ValueError(f"{what}.cut must be a list of 'batch_rows', 'indices', 'heads', got {cut!r}")
    ok_ind = ind == "all" or (isinstance(ind, int) and not isinstance(ind, bool) and ind >= 1)
    if not ok_ind and not (isinstance(ind, (list, tuple)) and ind and all(isinstance(i, int) for i in ind)):
        raise ValueError(f"{what}.indices must be 'all', an int >= 1 or a list of ints, got {ind!r}")
    if isinstance(sec, bool) or not isinstance(sec, (int, float)) or not math.isfinite(sec) or sec <= 0:
        raise ValueError(f"{what}.seconds must be a finite number > 0, got {sec!r}")
    return dict(level, cut=list(cut), indices=list(ind) if isinstance(ind, (list, tuple)) else ind)


def restore(budget: "Budget", level: Dict[str, Any], watch) -> bool:
    """Apply a checkpointed level (:func:`validated_level`) instead of timing a first sample again, when it
    was decided for this budget (same seconds). True when it was applied."""
    if budget.decided or level["seconds"] != budget.seconds:
        return False
    budget.level = dict(level)
    _cut(budget, budget.level, watch)
    return True


def _cut(budget: "Budget", level: Dict[str, Any], watch) -> bool:
    cut = level["cut"]
    if "batch_rows" in cut:
        watch.capture.batch_rows = level["batch_rows"]
    if "heads" in cut:
        watch.capture.heads = level["heads"]
    if "indices" in cut:
        watch.measure_config = budget.measure_config(watch.measure_config)
    return bool(cut)


def agree_min(choice: Optional[Tuple[int, int, int]]) -> Optional[Tuple[int, int, int]]:
    """The componentwise minimum of the ranks' ``(rows, indices, heads)`` (one ``all_reduce``;
    a rank without a choice contributes nothing). ``None`` when no rank has one."""
    from . import distributed as dist_utils

    if dist_utils.world_size() == 1:
        return choice
    vec = [math.inf] * 3 if choice is None else [float(c) for c in choice]
    t = torch.tensor(vec, dtype=torch.float64, device=dist_utils._device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    vals = t.cpu().tolist()
    if any(math.isinf(v) for v in vals):
        return None
    return tuple(int(v) for v in vals)
