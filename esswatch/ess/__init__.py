"""The functional API: entropy-ESS and tolerance-ESS of an operator.

``entropy_ess(op, indices)`` returns ``batch_shape + (len(indices),)``: the
entropy-ESS of ``H_i = T[..., i:, :i]`` at each 0-based index ``i`` in ``1..L-1``
(``docs/ess.md`` section 2). ``op`` is a dense causal tensor ``(..., L, L)`` or an operator
from :mod:`esswatch.operators`.

Estimators (all compute in float32, or float64 for float64 input; autocast is
disabled inside; results are on the operator's device):

===============  ==========================================================================
``"exact"``      batched singular values of each ``H_i`` after dropping its all-zero rows and
                 columns (windows, masks, padding, short kernels: exact) and in the tall
                 orientation; blocks of equal shape share one call. O(L^3) per index.
                 Differentiable. The reference.
``"gram"``       exact, for operators with a finite state (``has_gramians``:
                 :class:`~esswatch.operators.GatedRecurrence`,
                 :class:`~esswatch.operators.DeltaRule`): factored Gramians in float64
                 (gated recurrences: direct for a few indices, chunked for many; the delta
                 rule: segments of 64 positions in closed form), no Python step per
                 position and no ``L x L`` buffer, plus an ``N x N`` eigenproblem per index.
                 Differentiable. Indices with ``min(i, L-i) < N`` (rank-deficient Gramians):
                 densely for gated recurrences (cheap there), from the explicit factor for the
                 delta rule. Where neither Gramian factors (fast decays on both sides of the
                 index): their truncated square roots without gradients, densely with them.
``"randomized"`` subspace-iteration sketches of the block with deterministic bounds from
                 its exact ``||H_i||_F``, then, for large blocks whose bounds cannot close (a long flat tail), the
                 deflated stochastic Lanczos quadrature (accepted with about 95% confidence
                 when within ``rtol``, else exact); see :mod:`esswatch.engine.adaptive`.
                 Not differentiable (computed under ``no_grad``).
``"auto"``       gram where the operator has Gramians (``DeltaRule``: from ``L >= 6 N`` on, where
                 they are faster than materializing ``T``); otherwise exact where ``min(i, L-i)`` (or the
                 smaller side of the block's structural non-zero range) is at most 128 or
                 gradients are needed, randomized elsewhere.
===============  ==========================================================================

This module holds the public functions and defaults; the planner (validation, estimator per
index, the batched exact entries) is :mod:`.plan`, the numerical environment :mod:`.numerics`,
the block cache :mod:`.blocks` and the pre-allocation guards :mod:`.guard`.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Tuple, Union, overload

import torch

from ..engine.adaptive import (  # noqa: F401  (the sketch constants are part of this namespace)
    SKETCH_BUDGET,
    SKETCH_COST,
    SKETCH_FLAT_TAIL,
    SKETCH_HOPELESS_RATIO,
    SKETCH_PILOT_RANK,
    SKETCH_POWER_ITERS,
    SKETCH_RANK0,
    SKETCH_REPROJECT_RATIO,
    randomized_entropy,
)
from ..engine.spectral import tolerance_from_singular_values
from ..engine.tolerance_sketch import randomized_tolerance_sv
from ..engine.validation import check_finite_number
from ..operators import Dense, Operator
from .blocks import BlockCache as _Cache
from .guard import empty_result as _empty
from .numerics import default_generator as _default_generator
from .numerics import flush_denormal_enabled as _flush_denormal_enabled  # noqa: F401
from .numerics import numerics as _numerics
from .plan import ESTIMATORS, EXACT_BELOW  # noqa: F401
from .plan import entropy_table as _entropy_table
from .plan import plan as _plan
from .plan import prepare as _prepare_operator
from .plan import singular_values_by_plan as _singular_values_by_plan
from .plan import windows_first as _windows_first

__all__ = [
    "entropy_ess",
    "tolerance_ess",
    "as_operator",
    "ESTIMATORS",
    "DEFAULT_RTOL",
    "DEFAULT_TOL",
    "DEFAULT_RELATIVE",
]

DEFAULT_RTOL = 0.02
#: tolerance-ESS default: count singular values above 1e-3 * s_1 (relative mode).
DEFAULT_TOL = 1e-3
DEFAULT_RELATIVE = True


def as_operator(op) -> Operator:
    """A tensor becomes :class:`~esswatch.operators.Dense`; operators pass through."""
    if isinstance(op, Operator):
        return op
    if isinstance(op, torch.Tensor):
        return Dense(op)
    raise ValueError(f"expected a (..., L, L) tensor or an esswatch.operators.Operator, got {type(op).__name__}")


def _prepare(op, indices, estimator, what="entropy_ess", normalize=True):
    return _prepare_operator(as_operator(op), indices, estimator, what, normalize)


@overload
def entropy_ess(
    op: Union[torch.Tensor, Operator],
    indices: Optional[Sequence[int]] = None,
    *,
    estimator: str = "auto",
    rtol: float = DEFAULT_RTOL,
    return_bounds: Literal[False] = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor: ...


@overload
def entropy_ess(
    op: Union[torch.Tensor, Operator],
    indices: Optional[Sequence[int]] = None,
    *,
    estimator: str = "auto",
    rtol: float = DEFAULT_RTOL,
    return_bounds: Literal[True],
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@overload
def entropy_ess(
    op: Union[torch.Tensor, Operator],
    indices: Optional[Sequence[int]] = None,
    *,
    estimator: str = "auto",
    rtol: float = DEFAULT_RTOL,
    return_bounds: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


def entropy_ess(
    op: Union[torch.Tensor, Operator],
    indices: Optional[Sequence[int]] = None,
    *,
    estimator: str = "auto",
    rtol: float = DEFAULT_RTOL,
    return_bounds: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Entropy-ESS of ``H_i = T[..., i:, :i]`` at each index (``docs/ess.md`` section 2).

    Args:
        op: a dense causal tensor ``(..., L, L)`` or an operator from :mod:`esswatch.operators`.
        indices: 0-based indices in ``1..L-1``; ``None`` = all ``L - 1``.
        estimator: ``"auto"`` (default), ``"exact"``, ``"gram"`` or ``"randomized"`` (module doc).
        rtol: relative accuracy the randomized estimator must reach (default 0.02). Entries
            resolved by the deterministic bounds are within ``rtol`` always; entries resolved
            by the deflated stochastic Lanczos quadrature (large flat-tailed blocks) are
            within ``rtol`` with about 95% confidence (a two-standard-error test; the
            calibration test checks a miss rate of at most 5%, at ``rtol = 0.02``). The quadrature
            runs only for ``rtol >= 0.02``; with a smaller ``rtol`` those entries are exact.
        return_bounds: also return ``(lower, upper)`` with ``lower <= exact <= upper``
            (deterministic, whatever the random draw; equal to the estimate for exact
            entries; the estimate is clamped into them).
        generator: random generator for the sketch (default: a private, fixed-seed one; the
            global RNG is never touched).

    Returns:
        A tensor ``batch_shape + (len(indices),)`` (float32, or float64 for float64 input),
        or ``(estimate, lower, upper)`` with ``return_bounds=True``.

    Raises:
        ValueError: malformed or non-causal operator, NaN/Inf, bad indices or estimator.
    """
    check_finite_number("rtol", rtol, positive=True)
    op, idx, cdt = _prepare(op, indices, estimator, "entropy_ess")
    if op.numel_batch() == 0:
        e = _empty(op, idx, cdt)
        return (e, e.clone(), e.clone()) if return_bounds else e
    need_grad = torch.is_grad_enabled() and op.requires_grad
    plan = _plan(op, idx, estimator, need_grad)
    with _numerics(op.device):
        near = _windows_first(op, plan, estimator)
        cache = _Cache(op, blocks=sum(e not in ("gram", "near") for e in plan.values()))
        svs = _singular_values_by_plan(op, plan, cache)
        svs.update(near)
        keys, table = _entropy_table(svs, cdt)  # one batched entropy per group of exact entries
        pos = {i: j for j, i in enumerate(keys)}
        bounds = {}
        gen = generator
        sketched = [i for i, e in plan.items() if e == "randomized"]
        with torch.no_grad():
            fro2 = cache.frobenius2(sketched)  # ||H_i||_F^2 of all of them in one pass over T, where T is dense
            for i in sketched:
                if gen is None:
                    gen = _default_generator(op.device)
                h = cache.hankel(i)
                bounds[i] = tuple(x.to(cdt) for x in randomized_entropy(h, float(rtol), gen, fro2=fro2.get(i)))
    if not bounds:
        # every index exact: one gather in the requested order (repeats allowed)
        est = table[..., torch.tensor([pos[i] for i in idx.tolist()], device=table.device)]
        return (est, est, est) if return_bounds else est
    ests, los, his = [], [], []
    for i in idx.tolist():
        est, lo, hi = bounds[i] if i in bounds else (table[..., pos[i]],) * 3
        ests.append(est)
        los.append(lo)
        his.append(hi)
    est = torch.stack(ests, dim=-1)
    if return_bounds:
        return est, torch.stack(los, dim=-1), torch.stack(his, dim=-1)
    return est


def tolerance_ess(
    op: Union[torch.Tensor, Operator],
    indices: Optional[Sequence[int]] = None,
    *,
    tol: float = DEFAULT_TOL,
    relative: bool = DEFAULT_RELATIVE,
    estimator: str = "auto",
) -> torch.Tensor:
    """Tolerance-ESS: the number of singular values of ``H_i`` above a threshold.

    Args:
        tol: the threshold; with ``relative=True`` (default) it is ``tol * s_1`` (default
            ``1e-3 * s_1``), otherwise the absolute value ``tol``.
        estimator: ``"auto"``, ``"exact"``, ``"gram"`` (gated recurrences) or ``"randomized"``.
            Exact counts on every estimator: ``"randomized"`` raises its rank until the energy it
            has not seen, ``r``, is below the threshold (then no unseen singular value can pass it)
            and falls back to exact otherwise.

    Returns:
        A float tensor ``batch_shape + (len(indices),)`` of counts.
    """
    check_finite_number("tol", tol, nonnegative=True)
    if not isinstance(relative, bool):
        raise ValueError(f"relative must be a bool, got {relative!r}")
    op, idx, cdt = _prepare(op, indices, estimator, "tolerance_ess", normalize=relative)
    if op.numel_batch() == 0:
        return _empty(op, idx, cdt)
    plan = _plan(op, idx, estimator, need_grad=False)
    with torch.no_grad(), _numerics(op.device):
        near = _windows_first(op, plan, estimator)
        cache = _Cache(op, blocks=sum(e not in ("gram", "near") for e in plan.values()))
        svs = _singular_values_by_plan(op, plan, cache)
        svs.update(near)
        gen = None
        for i, e in plan.items():
            if e == "randomized":
                gen = gen or _default_generator(op.device)
                svs.add(i, randomized_tolerance_sv(cache.hankel(i), tol, relative, gen))
        # in float64 (exact for every input dtype, so no value crosses the threshold); zero padding adds no count
        keys, counts = svs.table(lambda s: tolerance_from_singular_values(s, tol, relative), torch.float64)
    pos = {i: j for j, i in enumerate(keys)}
    return counts[..., torch.tensor([pos[i] for i in idx.tolist()], device=counts.device)].to(cdt)
