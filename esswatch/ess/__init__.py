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
``"gram"``       exact, for :class:`~esswatch.operators.GatedRecurrence` only: factored
                 Gramians in float64 (direct for a few indices, chunked for many: no Python
                 step per position), O(L N^2) for *all* indices plus an ``N x N``
                 eigenproblem per index. Differentiable. Indices with ``min(i, L-i) < N``
                 (rank-deficient Gramians) are computed densely, which is cheap there.
``"randomized"`` matrix-free sketches with deterministic bounds from the exact ``||H_i||_F``,
                 then, for large blocks whose bounds cannot close (a long flat tail), the
                 deflated stochastic Lanczos quadrature (accepted with about 95% confidence
                 when within ``rtol``, else exact); see :mod:`esswatch.engine.adaptive`.
                 Not differentiable (computed under ``no_grad``).
``"auto"``       gram for gated recurrences; otherwise exact where ``min(i, L-i)`` (or the
                 smaller side of the block's structural non-zero range) is at most 128 or
                 gradients are needed, randomized elsewhere.
===============  ==========================================================================
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch

from .blocks import BlockCache as _Cache
from ..engine.adaptive import (  # noqa: F401
    SKETCH_BUDGET,
    SKETCH_COST,
    SKETCH_HOPELESS_RATIO,
    SKETCH_PILOT_RANK,
    SKETCH_POWER_ITERS,
    SKETCH_RANK0,
    randomized_entropy,
    randomized_tolerance_sv,
)
from ..engine.exact import batched_svdvals
from ..engine.gram import gram_singular_values
from ..engine.spectral import compute_dtype, entropy_from_singular_values, tolerance_from_singular_values
from ..engine.validation import check_finite_number, check_indices, check_not_meta
from .guard import check_call_memory as _check_memory, empty_result as _empty
from ..operators import Dense, GatedRecurrence, Operator

__all__ = ["entropy_ess", "tolerance_ess", "as_operator", "ESTIMATORS",
           "DEFAULT_RTOL", "DEFAULT_TOL", "DEFAULT_RELATIVE"]

ESTIMATORS = ("auto", "exact", "gram", "randomized")
DEFAULT_RTOL = 0.02
#: tolerance-ESS default: count singular values above 1e-3 * s_1 (relative mode).
DEFAULT_TOL = 1e-3
DEFAULT_RELATIVE = True

#: auto: indices with min(i, L - i) (or the smaller side of the block's structural
#: non-zero range: windows, short kernels) at most this are computed exactly. An exact SVD
#: in the tall orientation costs about max(m, n) p^2, a sketch max(m, n) p k per pass: below
#: p = 128 the sketches do not pay (examples/benchmarks/estimators.py).
EXACT_BELOW = 128


def as_operator(op) -> Operator:
    """A tensor becomes :class:`~esswatch.operators.Dense`; operators pass through."""
    if isinstance(op, Operator):
        return op
    if isinstance(op, torch.Tensor):
        return Dense(op)
    raise ValueError(f"expected a (..., L, L) tensor or an esswatch.operators.Operator, got {type(op).__name__}")


def _flush_denormal_enabled() -> bool:
    """Read the CPU flush-to-zero state (torch has a setter, no getter)."""
    tiny = torch.tensor([torch.finfo(torch.float32).tiny], dtype=torch.float32)
    return bool((tiny / 4 == 0).item())


@contextlib.contextmanager
def _numerics(device: torch.device):
    """Autocast off (spectral code never runs in half precision) and, on CPU, denormals
    flushed to zero for the duration: LAPACK's SVD creates denormal intermediates on
    peaked operators (trained attention) and runs up to 50x slower on them. Values below
    1e-38 do not move an entropy-ESS. The previous flush-to-zero state is restored.
    """
    kinds = {"cpu", device.type} if device.type in ("cuda", "cpu", "xpu", "mps") else {"cpu"}
    was_ftz = _flush_denormal_enabled()
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            try:
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
            except RuntimeError:  # pragma: no cover - device without autocast support
                pass
        if not was_ftz:
            torch.set_flush_denormal(True)
        try:
            yield
        finally:
            if not was_ftz:
                torch.set_flush_denormal(False)


def _prepare(op, indices, estimator, what="entropy_ess", normalize=True):
    op = as_operator(op)
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "gram" and not isinstance(op, GatedRecurrence):
        raise ValueError(f"estimator='gram' needs a GatedRecurrence operator, got {type(op).__name__}")
    for t in op._tensors():
        check_not_meta(t, f"{type(op).__name__} operand")
    if op.seq_len < 2:
        raise ValueError(f"ESS needs a sequence length of at least 2, got L={op.seq_len}")
    idx = check_indices(indices, op.seq_len)
    if op.numel_batch() == 0:
        return op, idx, compute_dtype(op.dtype)
    _check_memory(op, idx, estimator, what)
    op.validate()
    if normalize:                 # scale-invariant metrics: no denormal flush, no overflow
        op = op.normalized()
    cdt = compute_dtype(op.dtype)
    if op.dtype != cdt:
        op = op.to(dtype=cdt)
    return op, idx, cdt


def _support_size(op: Operator, i: int) -> int:
    rows, cols = op.hankel_support(i)
    L = op.seq_len
    return min(len(range(*rows.indices(L))), len(range(*cols.indices(L))))


def _plan(op: Operator, idx: torch.Tensor, estimator: str, need_grad: bool) -> dict:
    """One estimator name per distinct index."""
    out = {}
    for i in dict.fromkeys(idx.tolist()):
        if estimator != "auto":
            out[i] = estimator
        elif isinstance(op, GatedRecurrence):
            out[i] = "gram"
        elif need_grad or _support_size(op, i) <= EXACT_BELOW:
            out[i] = "exact"
        else:
            out[i] = "randomized"
    return out


def _default_generator(device: torch.device) -> torch.Generator:
    # a private generator: the estimator never draws from (or advances) the global RNG stream
    g = torch.Generator(device=device)
    g.manual_seed(0x5EED)
    return g


def _singular_values_by_plan(op, plan: dict, cache: _Cache) -> dict:
    """Exact singular values (dict i -> sv) for the 'exact' and 'gram' entries of the plan."""
    out = {}
    L = op.seq_len
    dense_idx = [i for i, e in plan.items() if e == "exact"]
    gram_idx = [i for i, e in plan.items() if e == "gram"]
    if gram_idx:
        N = op.state_width
        via_gram = [i for i in gram_idx if min(i, L - i) >= N]
        dense_idx += [i for i in gram_idx if min(i, L - i) < N]
        if via_gram:
            q, k, ld = op.expanded()
            sv, ok, _ = gram_singular_values(q, k, ld, torch.tensor(via_gram))
            sv = sv.to(compute_dtype(op.dtype))
            ok_all = (ok.all(dim=tuple(range(ok.dim() - 1))) if ok.dim() > 1 else ok).tolist()
            for j, i in enumerate(via_gram):
                if ok_all[j]:
                    out[i] = sv[..., j, :]
                else:
                    dense_idx.append(i)
    if dense_idx:
        for i, sv in zip(dense_idx, batched_svdvals([cache.hankel(i) for i in dense_idx])):
            out[i] = sv
    return out


def entropy_ess(op: Union[torch.Tensor, Operator], indices: Optional[Sequence[int]] = None, *,
                estimator: str = "auto", rtol: float = DEFAULT_RTOL, return_bounds: bool = False,
                generator: Optional[torch.Generator] = None):
    """Entropy-ESS of ``H_i = T[..., i:, :i]`` at each index (``docs/ess.md`` section 2).

    Args:
        op: a dense causal tensor ``(..., L, L)`` or an operator from :mod:`esswatch.operators`.
        indices: 0-based indices in ``1..L-1``; ``None`` = all ``L - 1``.
        estimator: ``"auto"`` (default), ``"exact"``, ``"gram"`` or ``"randomized"`` (module doc).
        rtol: relative accuracy the randomized estimator must reach (default 0.02). Entries
            resolved by the deterministic bounds are within ``rtol`` always; entries resolved
            by the deflated stochastic Lanczos quadrature (large flat-tailed blocks) are
            within ``rtol`` with about 95% confidence (a two-standard-error test; the
            calibration test checks a miss rate of at most 5%).
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
        cache = _Cache(op)
        svs = _singular_values_by_plan(op, plan, cache)
        exact = _entropy_of_padded(svs, cdt)          # one batched entropy for all exact entries
        keys = list(exact)
        table = torch.stack([exact[i] for i in keys], dim=-1) if keys else None
        bounds = {}
        gen = generator
        for i, e in plan.items():
            if e == "randomized":
                if gen is None:
                    gen = _default_generator(op.device)
                with torch.no_grad():
                    bounds[i] = tuple(x.to(cdt) for x in randomized_entropy(cache.hankel(i), float(rtol), gen))
    if not bounds:
        # every index exact: one gather in the requested order (repeats allowed)
        pos = {i: j for j, i in enumerate(keys)}
        est = table[..., torch.tensor([pos[i] for i in idx.tolist()], device=table.device)]
        return (est, est, est) if return_bounds else est
    ests, los, his = [], [], []
    for i in idx.tolist():
        est, lo, hi = bounds[i] if i in bounds else (exact[i],) * 3
        ests.append(est)
        los.append(lo)
        his.append(hi)
    est = torch.stack(ests, dim=-1)
    if return_bounds:
        return est, torch.stack(los, dim=-1), torch.stack(his, dim=-1)
    return est


def _entropy_of_padded(svs: dict, dtype) -> dict:
    """Entropy-ESS of every entry of ``svs`` (index -> singular values) in one batched call.

    Zero padding leaves entropy-ESS unchanged (``0 log 0 = 0``).
    """
    if not svs:
        return {}
    keys = list(svs)
    width = max(svs[i].shape[-1] for i in keys)
    padded = torch.stack([torch.nn.functional.pad(svs[i].to(dtype), (0, width - svs[i].shape[-1])) for i in keys],
                         dim=-2)
    ess = entropy_from_singular_values(padded)
    return {i: ess[..., j] for j, i in enumerate(keys)}


def tolerance_ess(op: Union[torch.Tensor, Operator], indices: Optional[Sequence[int]] = None, *,
                  tol: float = DEFAULT_TOL, relative: bool = DEFAULT_RELATIVE,
                  estimator: str = "auto") -> torch.Tensor:
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
        cache = _Cache(op)
        svs = _singular_values_by_plan(op, plan, cache)
        gen = None
        for i, e in plan.items():
            if e == "randomized":
                gen = gen or _default_generator(op.device)
                svs[i] = randomized_tolerance_sv(cache.hankel(i), tol, relative, gen)
        counts = {i: tolerance_from_singular_values(sv, tol, relative).to(cdt) for i, sv in svs.items()}
    return torch.stack([counts[i] for i in idx.tolist()], dim=-1)
