"""Per-layer ESS from a captured operator, aggregated as in ``docs/ess.md`` section 3.

Quantities only (no schedule, no logging): :func:`measure_operator` turns one
operator into plain Python numbers; :func:`aggregate_model` combines layers.

Shapes: the ESS functions return ``batch_shape + (n_indices,)``. The *last*
batch dim is the head / channel dim and all dims before it are batch rows
(flattened); an operator with no batch dims is one head of one row.

Per layer and metric (``"entropy"``, ``"tolerance"``), with ``E[b, h, i]``:

==================  ============================================================
``avg``             mean over rows, heads and indices
``max``             max over indices of the mean over rows and heads
``total``           sum over heads (a head shared by ``value_dim`` value channels
                    counts ``value_dim`` times), mean over rows and indices
``utilization``     mean over rows, heads and indices of ``E / TSS_i`` with
                    ``TSS_i = min(TSS, i, L - i)`` (``operator.tss``)
``per_index``       mean over rows and heads, one value per index
``per_head``        mean over rows and indices, one value per head
==================  ============================================================
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..engine.validation import check_finite_number
from ..ess import DEFAULT_RELATIVE, DEFAULT_TOL, ESTIMATORS, entropy_ess, tolerance_ess
from ..operators import Operator

__all__ = ["MeasureConfig", "METRICS", "STATS", "select_indices", "measure_operator", "aggregate_model"]

METRICS = ("entropy", "tolerance")
#: scalar statistics per layer and metric (the tag scheme uses these names)
STATS = ("avg", "max", "total", "utilization")

IndexSpec = Union[int, str, Sequence[int]]


class Spread(tuple):
    """A budget's cut of an explicit index list: ``n`` of these indices, spread evenly over those that fit
    each sequence (:func:`select_indices`), so a shorter sequence still gets ``n`` of the ones it has."""

    def __new__(cls, pool: Sequence[int], n: int) -> "Spread":
        obj = super().__new__(cls, pool)
        obj.n = n
        return obj

    def __reduce__(self):  # copies and pickles keep n
        return (Spread, (tuple(self), self.n))

    def __repr__(self) -> str:
        return f"Spread({list(self)}, n={self.n})"


def spread_of(pool: Sequence[int], n: int) -> Tuple[int, ...]:
    """``n`` of ``pool`` (sorted), spread evenly (all of them when ``n >= len(pool)``)."""
    if n >= len(pool):
        return tuple(pool)
    return tuple(sorted({pool[(2 * j + 1) * len(pool) // (2 * n)] for j in range(n)}))


@dataclass(frozen=True)
class MeasureConfig:
    """What to measure on each captured operator (validated on construction).

    Args:
        indices: an int ``n`` = ``n`` indices spread evenly over the interior of the
            sequence (``round(j * L / (n + 1))``, ``j = 1..n``; all ``L - 1`` when
            ``n >= L - 1``); ``"all"``; or an explicit list of 0-based indices (those
            outside ``1..L-1`` for a given layer are dropped).
        estimator: passed to :func:`esswatch.entropy_ess` / :func:`esswatch.tolerance_ess`;
            ``"gram"`` is used for gated recurrences and ``"auto"`` for other layers.
        metrics: a non-empty subset of ``("entropy", "tolerance")``.
        tol, relative: tolerance-ESS threshold (see :func:`esswatch.tolerance_ess`).
    """

    indices: IndexSpec = 8
    estimator: str = "auto"
    metrics: Tuple[str, ...] = ("entropy",)
    tol: float = DEFAULT_TOL
    relative: bool = DEFAULT_RELATIVE

    def __post_init__(self) -> None:
        ind = self.indices
        if isinstance(ind, str):
            if ind != "all":
                raise ValueError(f"indices must be a positive int, 'all' or a list of ints, got {ind!r}")
        elif isinstance(ind, bool):
            raise ValueError(f"indices must be a positive int, 'all' or a list of ints, got {ind!r}")
        elif isinstance(ind, int):
            if ind < 1:
                raise ValueError(f"indices: the count must be at least 1, got {ind}")
        elif not isinstance(ind, Spread):  # a Spread is built from a validated list
            if (
                isinstance(ind, (set, frozenset, dict, bytes))
                or not hasattr(ind, "__iter__")
                or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in ind)
            ):
                raise ValueError(f"indices must be a positive int, 'all' or a list of ints, got {ind!r}")
            lst = tuple(int(i) for i in ind)
            if not lst or any(i < 1 for i in lst):
                raise ValueError(f"indices: an explicit list needs ints >= 1, got {list(ind)!r}")
            object.__setattr__(self, "indices", tuple(sorted(set(lst))))
        if not isinstance(self.estimator, str) or self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not isinstance(self.metrics, (str, list, tuple)):
            raise ValueError(f"metrics must be a non-empty subset of {METRICS} without repeats, got {self.metrics!r}")
        metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        if not metrics or any(m not in METRICS for m in metrics) or len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics must be a non-empty subset of {METRICS} without repeats, got {self.metrics!r}")
        object.__setattr__(self, "metrics", metrics)
        check_finite_number("tol", self.tol, nonnegative=True)
        if not isinstance(self.relative, bool):
            raise ValueError(f"relative must be a bool, got {self.relative!r}")

    def as_dict(self) -> Dict[str, Any]:
        spec = self.indices
        ind = list(spread_of(spec, spec.n) if isinstance(spec, Spread) else spec) if isinstance(spec, tuple) else spec
        return {
            "indices": ind,
            "estimator": self.estimator,
            "metrics": list(self.metrics),
            "tol": self.tol,
            "relative": self.relative,
        }


def measurable(spec: IndexSpec, seq_len: int) -> bool:
    """Whether a sequence of ``seq_len`` has an index to measure under ``spec``; otherwise it is too short, like
    ``L = 1`` (skipped silently, not a failure): an explicit list whose every index lies past ``L - 1``."""
    if seq_len < 2:
        return False
    return spec == "all" or isinstance(spec, int) or any(1 <= i <= seq_len - 1 for i in spec)


def select_indices(spec: IndexSpec, seq_len: int) -> List[int]:
    """The 0-based indices to measure for a sequence of length ``seq_len`` (see :class:`MeasureConfig`)."""
    if seq_len < 2:
        raise ValueError(f"ESS needs a sequence length of at least 2, got L={seq_len}")
    if spec == "all" or (isinstance(spec, int) and spec >= seq_len - 1):
        return list(range(1, seq_len))
    if isinstance(spec, int):
        return sorted({min(seq_len - 1, max(1, round(j * seq_len / (spec + 1)))) for j in range(1, spec + 1)})
    out = [i for i in spec if 1 <= i <= seq_len - 1]
    if not out:
        raise ValueError(f"none of the configured indices {list(spec)} lies in 1..L-1 = 1..{seq_len - 1}")
    return list(spread_of(out, spec.n)) if isinstance(spec, Spread) else out


def _as_bhi(e: torch.Tensor) -> torch.Tensor:
    """``batch_shape + (n,)`` -> ``(rows, heads, n)`` (last batch dim = heads)."""
    if e.dim() == 1:
        return e[None, None, :]
    if e.dim() == 2:
        return e[None, :, :]
    return e.reshape(-1, e.shape[-2], e.shape[-1])


def _metric_tensor(op: Operator, metric: str, idx: List[int], cfg: MeasureConfig) -> torch.Tensor:
    estimator = cfg.estimator
    if estimator == "gram" and not op.has_gramians:
        estimator = "auto"
    if metric == "entropy":
        return entropy_ess(op, idx, estimator=estimator)
    return tolerance_ess(op, idx, tol=cfg.tol, relative=cfg.relative, estimator=estimator)


def measure_operator(op: Operator, cfg: MeasureConfig, tss: Optional[int] = None) -> Dict[str, Any]:
    """Plain-data ESS summary of one layer's operator (module doc).

    Args:
        op: the captured operator.
        cfg: what to measure.
        tss: the layer's theoretical state size if the probe knows it and the operator
            does not (``op.state_size`` wins when set).

    Raises:
        ValueError: malformed operator or NaN/Inf in it (from the ESS functions).
        FloatingPointError: the computed ESS is not finite.
    """
    idx = select_indices(cfg.indices, op.seq_len)
    state_size = op.state_size if op.state_size is not None else tss
    geo = torch.tensor([float(min(i, op.seq_len - i)) for i in idx], dtype=torch.float64)
    tss_i = geo if state_size is None else torch.clamp(geo, max=float(state_size))
    out: Dict[str, Any] = {
        "type": type(op).__name__,
        "seq_len": int(op.seq_len),
        "state_size": None if state_size is None else int(state_size),
        "value_dim": int(op.value_dim),
        "indices": idx,
        "tss": tss_i.tolist(),
    }
    with torch.no_grad():
        for metric in cfg.metrics:
            e = _as_bhi(_metric_tensor(op, metric, idx, cfg).detach().to(device="cpu", dtype=torch.float64))
            if not bool(torch.isfinite(e).all()):
                raise FloatingPointError(f"{metric}-ESS is not finite ({int((~torch.isfinite(e)).sum())} values)")
            per_index = e.mean(dim=(0, 1))
            out["rows"], out["heads"] = int(e.shape[0]), int(e.shape[1])
            out[metric] = {
                "avg": float(e.mean()),
                "max": float(per_index.max()),
                "total": float((e.sum(dim=1) * op.value_dim).mean()),
                "utilization": float((e / tss_i).mean()),
                "per_index": per_index.tolist(),
                "per_head": e.mean(dim=(0, 2)).tolist(),
            }
    return out


def aggregate_model(layers: Dict[str, Dict[str, Any]], metrics: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Model-wide scalars per metric: ``avg`` and ``utilization`` = mean over layers,
    ``max`` = max over layers, ``total`` = sum over layers. Empty when no layer was measured."""
    out: Dict[str, Dict[str, float]] = {}
    if not layers:
        return out
    for m in metrics:
        vals = [lay[m] for lay in layers.values() if m in lay]
        if not vals:
            continue
        out[m] = {
            "avg": sum(v["avg"] for v in vals) / len(vals),
            "max": max(v["max"] for v in vals),
            "total": sum(v["total"] for v in vals),
            "utilization": sum(v["utilization"] for v in vals) / len(vals),
        }
    return out
