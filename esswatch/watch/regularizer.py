"""The ESS regularizer: a differentiable penalty built from captured operators.

Two kinds, chosen with ``kind=``:

``"ess"`` (default) - from the entropy-ESS of each captured layer at a few indices,
normalized by ``TSS_i = min(TSS, i, L - i)`` so layers of different widths weigh alike
(``u = ESS_i / TSS_i`` in ``[0, 1]``):

- ``mode="collapse"`` (default) counters state collapse: a layer's term is
  ``mean(relu(floor - u)^2) / floor^2`` over batch rows, heads and indices: zero once
  utilization reaches ``floor`` (default 0.5), quadratic below it, 1 at ``u = 0``; heads
  that already use their state are left alone.
- ``mode="target"`` holds utilization at ``target``: ``mean((u - target)^2)`` (for models
  that must later be compressed or distilled to a known state size).

``"identity"`` - the paper's second regularizer for gated recurrences: pull the
transitions toward the identity, ``mean_t ||A_t - I||_F`` with ``A_t = diag(exp(log_decay_t))``
(per batch row and head or channel). Only layers whose operator is a
:class:`~esswatch.operators.GatedRecurrence` with decays contribute.

The penalty is ``weight * mean over layers of the layer terms``. Gradients flow through
``entropy_ess`` with the ``gram`` estimator for operators with Gramians (gated recurrences, the gated
delta rule) and ``exact`` otherwise (both differentiable, finite at zero and repeated singular values).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..engine.spectral import compute_dtype
from ..engine.validation import check_positive_int
from ..ess import entropy_ess
from ..operators import GatedRecurrence, Operator
from .measure import select_indices
from .tags import PENALTY_TAG  # noqa: F401 - re-exported (the penalty's tags are built in tags.py)

__all__ = ["Regularizer", "penalty_terms", "spread_indices", "PENALTY_TAG"]


KINDS = ("ess", "identity")
MODES = ("collapse", "target")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Regularizer:
    """The ESS regularizer's configuration (validated; public as ``esswatch.Regularizer``).

    Args:
        weight: the penalty's weight (``0`` or ``None`` = off).
        kind: ``"ess"`` or ``"identity"``.
        mode: ``"collapse"`` or ``"target"`` (kind ``"ess"``).
        floor: utilization below which the collapse penalty acts (default 0.5).
        target: the utilization ``mode="target"`` holds (required there).
        every_n_steps: compute the penalty every k-th step (default every step).
        indices: number of indices spread over the sequence per layer (default 8, like the
            watch's ``indices``), at the positions the watch logs for ``indices=n``
            (:func:`~esswatch.watch.measure.select_indices`: ``round(j * L / (n + 1))``).
    """

    weight: float
    kind: str = "ess"
    mode: str = "collapse"
    floor: float = 0.5
    target: Optional[float] = None
    every_n_steps: int = 1
    indices: int = 8

    def __post_init__(self):
        if not _finite_number(self.weight) or self.weight < 0:
            raise ValueError(f"regularizer weight must be a finite non-negative number, got {self.weight!r}")
        if self.target is not None and not _finite_number(self.target):
            raise ValueError(f"regularizer target must be a finite number in [0, 1] or None, got {self.target!r}")
        if not _finite_number(self.floor):
            raise ValueError(f"regularizer floor must be a finite number in (0, 1], got {self.floor!r}")
        if self.kind not in KINDS:
            raise ValueError(f"regularizer kind must be one of {KINDS}, got {self.kind!r}")
        if self.mode not in MODES:
            raise ValueError(f"regularizer mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "target" and (self.target is None or not 0 <= self.target <= 1):
            raise ValueError(f"mode='target' needs target= in [0, 1], got {self.target!r}")
        if not 0 < self.floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {self.floor!r}")
        check_positive_int("every_n_steps", self.every_n_steps)
        check_positive_int("indices", self.indices)

    @property
    def enabled(self) -> bool:
        return bool(self.weight)


def spread_indices(seq_len: int, n: int) -> torch.Tensor:
    """The ``n`` indices the regularizer looks at: the same positions the watch logs for
    ``indices=n`` (:func:`~esswatch.watch.measure.select_indices`, ``round(j * L / (n + 1))``),
    as a tensor; empty when ``L < 2``."""
    if seq_len < 2:
        return torch.zeros(0, dtype=torch.int64)
    return torch.tensor(select_indices(n, seq_len), dtype=torch.int64)


def _ess_term(op: Operator, cfg: Regularizer) -> torch.Tensor:
    idx = spread_indices(op.seq_len, cfg.indices)
    # with Gramians: auto (the Gramians, or windows near each index where the gates forget fast, else T); else exact
    ess = entropy_ess(op, idx, estimator="auto" if op.has_gramians else "exact")
    u = ess / op.tss(idx).to(device=ess.device, dtype=ess.dtype).clamp(min=1)
    if cfg.mode == "target":
        return ((u - cfg.target) ** 2).mean()
    return (torch.relu(cfg.floor - u) ** 2).mean() / cfg.floor**2


def _identity_term(op: Operator) -> Optional[torch.Tensor]:
    if not isinstance(op, GatedRecurrence) or op.log_decay is None:
        return None
    ld = op.log_decay if op.log_decay.dtype == torch.float64 else op.log_decay.float()
    a = torch.exp(ld)
    return torch.sqrt(((a - 1) ** 2).sum(-1) + 1e-12).mean()


def penalty_terms(
    operators: Mapping[str, Operator], cfg: Regularizer, on_error=None
) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    """``(weight * mean of layer terms, {layer: term})``; ``(None, {})`` when nothing contributes.

    ``on_error(name, exception)``: called when a layer's term fails (the layer is then
    left out); without it the exception propagates.
    """
    terms: Dict[str, torch.Tensor] = {}
    for name, op in operators.items():
        if op.seq_len < 2:
            continue
        try:
            term = _ess_term(op, cfg) if cfg.kind == "ess" else _identity_term(op)
        except Exception as e:  # noqa: BLE001 - reported through on_error
            if on_error is None:
                raise
            on_error(name, e)
            continue
        if term is not None:
            terms[name] = term
    if not terms:
        return None, terms
    dtype = compute_dtype(functools.reduce(torch.promote_types, (t.dtype for t in terms.values())))
    total = torch.stack([t.to(dtype) for t in terms.values()]).mean() * float(cfg.weight)
    return total, terms
