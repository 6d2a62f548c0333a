"""The functional API: entropy-ESS and tolerance-ESS of an operator.

``entropy_ess(op, indices)`` returns ``batch_shape + (len(indices),)``: the
entropy-ESS of ``H_i = T[..., i:, :i]`` at each 0-based index ``i`` in ``1..L-1``
(``docs/ess.md`` section 2). ``op`` is a dense causal tensor ``(..., L, L)`` or an operator
from :mod:`esswatch.operators`.

Estimators (all compute in float32, or float64 for float64 input; autocast is
disabled inside; results are on the operator's device):

===============  ==========================================================================
``"exact"``      batched singular values of each ``H_i``. O(L^3) per index (O(L^4) for all).
                 Differentiable. The reference.
``"gram"``       exact, for :class:`~esswatch.operators.GatedRecurrence` only: Gramian
                 recursions in float64, O(L N^2) for *all* indices plus an ``N x N``
                 eigenproblem per index. Differentiable. Indices with ``min(i, L-i) < N``
                 (rank-deficient Gramians) are computed densely, which is cheap there.
``"randomized"`` matrix-free subspace iteration (2 power iterations, float64) with adaptive
                 rank and bounds from the exact ``||H_i||_F`` (see
                 :mod:`esswatch.engine.randomized`); a rank-16 pilot without power iterations
                 first screens out long-tailed blocks (``upper/lower > 1.5``: exact at once)
                 and often already resolves low-ESS blocks; otherwise the rank doubles from 32
                 until ``upper/lower <= (1+rtol)^2``, falling
                 back to exact when the sketches would cost half an exact SVD. O(6 m n k) per
                 index. Not differentiable (computed under ``no_grad``).
``"auto"``       gram for gated recurrences; otherwise exact where ``min(i, L-i) <= 64`` or
                 gradients are needed, randomized elsewhere.
===============  ==========================================================================
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch

from .engine.gram import gram_singular_values
from .engine.randomized import entropy_bounds, sketch_singular_values
from .engine.spectral import compute_dtype, entropy_from_singular_values, tolerance_from_singular_values
from .engine.validation import check_finite_number, check_indices, check_not_meta
from .ess_guard import check_call_memory as _check_memory, empty_result as _empty
from .operators import Dense, GatedRecurrence, Operator

__all__ = ["entropy_ess", "tolerance_ess", "as_operator", "ESTIMATORS",
           "DEFAULT_RTOL", "DEFAULT_TOL", "DEFAULT_RELATIVE"]

ESTIMATORS = ("auto", "exact", "gram", "randomized")
DEFAULT_RTOL = 0.02
#: tolerance-ESS default: count singular values above 1e-3 * s_1 (relative mode).
DEFAULT_TOL = 1e-3
DEFAULT_RELATIVE = True

#: auto: indices with min(i, L - i) at most this are computed exactly.
EXACT_BELOW = 64
#: randomized: starting rank and power iterations.
SKETCH_RANK0 = 32
SKETCH_POWER_ITERS = 2
#: cost model (measured on CPU, examples/benchmarks/estimators.py): a rank-k sketch with
#: 2 power iterations costs about SKETCH_COST * k / p of the exact SVD of the same block.
SKETCH_COST = 3.0
#: fall back to exact once the sketches would have cost SKETCH_BUDGET of the exact SVD, or
#: at once if the first sketch leaves upper/lower above SKETCH_HOPELESS_RATIO (a long tail).
SKETCH_BUDGET = 0.5
SKETCH_HOPELESS_RATIO = 1.5
#: rank of the pilot sketch (no power iteration) that screens out long-tailed blocks
SKETCH_PILOT_RANK = 16


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


def _plan(op: Operator, idx: torch.Tensor, estimator: str, need_grad: bool) -> list:
    """One estimator name per index."""
    L = op.seq_len
    out = []
    for i in idx.tolist():
        p = min(i, L - i)
        if estimator != "auto":
            out.append(estimator)
        elif isinstance(op, GatedRecurrence):
            out.append("gram")
        elif need_grad or p <= EXACT_BELOW:
            out.append("exact")
        else:
            out.append("randomized")
    return out


class _Cache:
    """Lazily materialized blocks of ``T`` shared by all indices of one call."""

    def __init__(self, op: Operator):
        self.op = op
        self._dense = None
        self._left = None      # T[:, :N]   (recurrences: every H_i with i <= N lies in it)
        self._bottom = None    # T[L-N:, :] (every H_i with L - i <= N)

    def dense(self):
        if self._dense is None:
            self._dense = self.op.dense()
        return self._dense

    def hankel(self, i: int):
        op = self.op
        if self._dense is None and isinstance(op, GatedRecurrence):
            L, n = op.seq_len, op.state_width
            if i <= n:
                if self._left is None:
                    self._left = op._block(slice(None), slice(0, n), op._dt())
                return self._left[..., i:, :i]
            if L - i <= n:
                if self._bottom is None:
                    self._bottom = op._block(slice(L - n, None), slice(None), op._dt())
                return self._bottom[..., i - (L - n):, :i]
            return op.hankel(i)
        return self.dense()[..., i:, :i]


def _randomized_entropy(op: Operator, cache: _Cache, i: int, rtol: float, generator):
    """``(est, lower, upper)`` for one index by the adaptive sketch (falls back to exact)."""
    L = op.seq_len
    m, n = L - i, i
    p = min(m, n)
    h = cache.dense()[..., i:, :i]
    matmul = lambda v: h @ v
    rmatmul = lambda w: h.transpose(-1, -2) @ w

    def exact():
        e = entropy_from_singular_values(torch.linalg.svdvals(h))
        return e, e, e

    spent = 0.0
    if p >= 4 * SKETCH_PILOT_RANK:
        # a pilot in the compute dtype: rank 16, no power iteration (a few % of an exact SVD)
        # screens out long-tailed blocks, which go to exact at once
        t = sketch_singular_values(matmul, rmatmul, n, op.batch_shape, SKETCH_PILOT_RANK, 0, h.dtype, h.device,
                                   generator)
        _, lo, hi = entropy_bounds(t.to(torch.float64), torch.sum(h * h, dim=(-1, -2), dtype=torch.float64), p)
        if float((hi / torch.clamp(lo, min=1e-300)).max()) > SKETCH_HOPELESS_RATIO:
            return exact()
        spent += SKETCH_COST * SKETCH_PILOT_RANK / 3
    # the sketches proper: power iterations in the compute dtype; the final projection and
    # ||H||_F^2 in float64, since the unseen energy r^2 = ||H||_F^2 - sum t_j^2 is a
    # difference of near-equal numbers that float32 round-off would swamp
    h64 = h.to(torch.float64)
    fro2 = (h64 * h64).sum(dim=(-1, -2))
    rmatmul64 = lambda w: h64.transpose(-1, -2) @ w

    if p >= 4 * SKETCH_PILOT_RANK:
        # low-ESS blocks (trained attention) are often resolved by the pilot's rank already
        t = sketch_singular_values(matmul, rmatmul, n, op.batch_shape, SKETCH_PILOT_RANK, 0, h.dtype, h.device,
                                   generator, rmatmul_exact=rmatmul64)
        est, lo, hi = entropy_bounds(t, fro2, p)
        if float((hi / torch.clamp(lo, min=1e-300)).max()) <= (1 + rtol) ** 2:
            return est, lo, hi
        spent += SKETCH_COST * SKETCH_PILOT_RANK / 3
    k = min(SKETCH_RANK0, p)
    while True:
        if k >= p:
            return exact()
        t = sketch_singular_values(matmul, rmatmul, n, op.batch_shape, k, SKETCH_POWER_ITERS, h.dtype,
                                   h.device, generator, rmatmul_exact=rmatmul64)
        spent += SKETCH_COST * k
        est, lo, hi = entropy_bounds(t, fro2, p)
        ratio = float((hi / torch.clamp(lo, min=1e-300)).max())
        if ratio <= (1 + rtol) ** 2:
            return est, lo, hi
        k_next = min(2 * k, p)
        if ratio > SKETCH_HOPELESS_RATIO or spent + SKETCH_COST * k_next > SKETCH_BUDGET * p:
            return exact()
        k = k_next


def _default_generator(device: torch.device) -> torch.Generator:
    # a private generator: the estimator never draws from (or advances) the global RNG stream
    g = torch.Generator(device=device)
    g.manual_seed(0x5EED)
    return g


def _singular_values_by_plan(op, idx, plan, cache):
    """Exact singular values per index for the 'exact' and 'gram' entries of the plan (dict i -> sv)."""
    out = {}
    L = op.seq_len
    gram_idx = [i for i, e in zip(idx.tolist(), plan) if e == "gram"]
    if gram_idx:
        N = op.state_width
        via_gram = [i for i in gram_idx if min(i, L - i) >= N]
        dense_small = [i for i in gram_idx if min(i, L - i) < N]
        if via_gram:
            q, k, ld = op.expanded()
            sv, ok, _ = gram_singular_values(q, k, ld, torch.tensor(via_gram))
            sv = sv.to(compute_dtype(op.dtype))
            ok_all = (ok.all(dim=tuple(range(ok.dim() - 1))) if ok.dim() > 1 else ok).tolist()
            for j, i in enumerate(via_gram):
                if ok_all[j]:
                    out[i] = sv[..., j, :]
                else:
                    dense_small.append(i)
        for i in dense_small:
            out[i] = torch.linalg.svdvals(cache.hankel(i))
    for i, e in zip(idx.tolist(), plan):
        if e == "exact":
            out[i] = torch.linalg.svdvals(cache.hankel(i))
    return out


def entropy_ess(op: Union[torch.Tensor, Operator], indices: Optional[Sequence[int]] = None, *,
                estimator: str = "auto", rtol: float = DEFAULT_RTOL, return_bounds: bool = False,
                generator: Optional[torch.Generator] = None):
    """Entropy-ESS of ``H_i = T[..., i:, :i]`` at each index (``docs/ess.md`` section 2).

    Args:
        op: a dense causal tensor ``(..., L, L)`` or an operator from :mod:`esswatch.operators`.
        indices: 0-based indices in ``1..L-1``; ``None`` = all ``L - 1``.
        estimator: ``"auto"`` (default), ``"exact"``, ``"gram"`` or ``"randomized"`` (module doc).
        rtol: relative accuracy the randomized estimator must reach (default 0.02).
        return_bounds: also return ``(lower, upper)`` with ``lower <= exact <= upper``
            (equal to the estimate for exact entries).
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
        svs = _singular_values_by_plan(op, idx, plan, cache)
        exact = _entropy_of_padded(svs, cdt)          # one batched entropy for all exact entries
        ests, los, his = [], [], []
        gen = generator
        for i, e in zip(idx.tolist(), plan):
            if e == "randomized":
                if gen is None:
                    gen = _default_generator(op.device)
                with torch.no_grad():
                    est, lo, hi = _randomized_entropy(op, cache, i, float(rtol), gen)
            else:
                est = lo = hi = exact[i]
            ests.append(est.to(cdt))
            los.append(lo.to(cdt))
            his.append(hi.to(cdt))
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
        svs = _singular_values_by_plan(op, idx, plan, cache)
        out = []
        gen = None
        for i, e in zip(idx.tolist(), plan):
            if e == "randomized":
                gen = gen or _default_generator(op.device)
                sv = _randomized_tolerance_sv(op, cache, i, tol, relative, gen)
            else:
                sv = svs[i]
            out.append(tolerance_from_singular_values(sv, tol, relative).to(cdt))
    return torch.stack(out, dim=-1)


def _randomized_tolerance_sv(op, cache, i, tol, relative, generator):
    """Sketched top singular values, enough that counting them above the threshold is exact."""
    L = op.seq_len
    m, n = L - i, i
    p = min(m, n)
    h = cache.hankel(i)
    h64 = h.to(torch.float64)
    fro2 = (h64 ** 2).sum(dim=(-1, -2))
    k = min(SKETCH_RANK0, p)
    spent = 0.0
    while True:
        if k >= p:
            return torch.linalg.svdvals(h)
        t = sketch_singular_values(lambda v: h @ v, lambda w: h.transpose(-1, -2) @ w, n, op.batch_shape, k,
                                   SKETCH_POWER_ITERS, h.dtype, h.device, generator,
                                   rmatmul_exact=lambda w: h64.transpose(-1, -2) @ w)
        spent += SKETCH_COST * k
        r = torch.sqrt(torch.clamp(fro2 - (t ** 2).sum(-1), min=0))
        thresh = tol * t[..., 0] if relative else torch.full_like(r, tol)
        # every unseen singular value is <= ||H - Q Q^T H||_2 <= r; every seen one lies in [t_j, t_j + r]
        near = ((t - thresh[..., None]).abs() <= r[..., None]).any(-1)
        if bool(((r < thresh) & ~near).all()):
            return t
        k_next = min(2 * k, p)
        if spent + SKETCH_COST * k_next > SKETCH_BUDGET * p:
            return torch.linalg.svdvals(h)
        k = k_next
