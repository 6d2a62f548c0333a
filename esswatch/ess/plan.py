"""The planner of one functional-API call: validate and prepare the operator, pick an
estimator per index, and compute the exact entries (``"exact"`` and ``"gram"``) in as few
batched calls as possible. The randomized entries are left to the caller
(:mod:`esswatch.engine.adaptive`)."""

from __future__ import annotations

import torch

from ..engine.exact import EXACT_CHUNK_BYTES, batched_svdvals
from ..engine.spectral import compute_dtype, entropy_from_singular_values, safe_sqrt
from ..engine.validation import check_indices, check_not_meta
from ..operators import Operator
from .blocks import BlockCache
from .guard import check_call_memory, check_fallback_memory
from .near import envelope_of, near_block, near_values
from .spectra import Spectra

__all__ = [
    "ESTIMATORS",
    "EXACT_BELOW",
    "prepare",
    "plan",
    "windows_first",
    "singular_values_by_plan",
    "entropy_table",
]

ESTIMATORS = ("auto", "exact", "gram", "randomized")

#: auto: indices with min(i, L - i) (or the smaller side of the block's structural
#: non-zero range: windows, short kernels) at most this are computed exactly. An exact SVD
#: in the tall orientation costs about max(m, n) p^2, a sketch max(m, n) p k per pass: below
#: p = 128 the sketches do not pay (examples/benchmarks/estimators.py).
EXACT_BELOW = 128


def prepare(op: Operator, indices, estimator, what="entropy_ess", normalize=True):
    """``(op, idx, cdt)``: the validated operator (rescaled when ``normalize``, cast to the
    compute dtype ``cdt``) and the indices as a 1-D int64 tensor. Raises ``ValueError``."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "gram" and not op.has_gramians:
        raise ValueError(
            f"estimator='gram' needs an operator with Gramians (GatedRecurrence, DeltaRule), got {type(op).__name__}"
        )
    for t in op._tensors():
        check_not_meta(t, f"{type(op).__name__} operand")
    if op.seq_len < 2:
        raise ValueError(f"ESS needs a sequence length of at least 2, got L={op.seq_len}")
    idx = check_indices(indices, op.seq_len)
    if op.numel_batch() == 0:
        return op, idx, compute_dtype(op.dtype)
    check_call_memory(op, idx, estimator, what)
    op.validate()
    if normalize:  # scale-invariant metrics: no denormal flush, no overflow
        op = op.normalized()
    cdt = compute_dtype(op.dtype)
    if op.dtype != cdt:
        op = op.to(dtype=cdt)
    return op, idx, cdt


def support_size(op: Operator, i: int) -> int:
    """The smaller side of ``H_i``'s structural non-zero range (:meth:`Operator.hankel_support`)."""
    rows, cols = op.hankel_support(i)
    L = op.seq_len
    return min(len(range(*rows.indices(L))), len(range(*cols.indices(L))))


def plan(op: Operator, idx: torch.Tensor, estimator: str, need_grad: bool) -> dict:
    """One estimator name per distinct index (``"auto"`` resolved)."""
    out = {}
    for i in dict.fromkeys(idx.tolist()):
        if estimator != "auto":
            out[i] = estimator
        elif op.has_gramians and op.prefers_gram:
            out[i] = "gram"
        elif need_grad or support_size(op, i) <= EXACT_BELOW:
            out[i] = "exact"
        else:
            out[i] = "randomized"
    return out


def windows_first(op: Operator, by_index: dict, estimator: str) -> dict:
    """Under ``"auto"``, an operator with Gramians that does not prefer them (``DeltaRule`` on short sequences,
    where materializing ``T`` beats the Gramians) still takes windows near each index where its gates forget
    within a few steps (:func:`~esswatch.ess.near.near_values`: every index or none, a check of milliseconds).
    Returns ``{i: singular values}`` of those indices and marks them ``"near"`` in ``by_index``."""
    if estimator != "auto" or not op.has_gramians or op.prefers_gram:
        return {}
    env = envelope_of(op)
    got = {} if env is None else near_values(op, env, list(by_index))
    for i in got:
        by_index[i] = "near"
    return got


def singular_values_by_plan(op: Operator, by_index: dict, cache: BlockCache) -> Spectra:
    """Exact singular values (:class:`~esswatch.ess.spectra.Spectra`) for the ``"exact"`` and ``"gram"`` entries of
    the plan.

    Gram indices with ``min(i, L - i) < N`` (rank-deficient Gramians; unless the operator resolves
    them, ``gram_at_ends``) and those whose Gramians are numerically singular go to the batched dense
    SVD with the ``"exact"`` ones, unless the operator's envelope confines what matters of ``H_i`` to a
    window near ``i`` (:func:`~esswatch.ess.near.near_block`): then the entries that do not factor take
    that window's singular values, and ``T`` is not materialized. (Without gradients the Gramian route
    itself resolves such entries from square roots, :mod:`esswatch.engine.gram_spectrum`.) Before any of
    this, where the windows of all gram indices cost less than the Gramians (gates that forget within a
    few steps), every index is taken from its window (:func:`~esswatch.ess.near.near_values`).
    """
    out = Spectra()
    L = op.seq_len
    dense_idx = [i for i, e in by_index.items() if e == "exact"]
    gram_idx = [i for i, e in by_index.items() if e == "gram"]
    planned_dense, n_gram = len(dense_idx), 0
    if gram_idx:
        N = op.state_width
        via_gram = sorted(i for i in gram_idx if op.gram_at_ends or min(i, L - i) >= N)
        dense_idx += [i for i in gram_idx if not op.gram_at_ends and min(i, L - i) < N]
        env = envelope_of(op) if via_gram else None  # None: no bound per step (no windows)
        near = {} if env is None else near_values(op, env, via_gram)  # fast gates: all of H_i near i
        out.update(near)
        via_gram = [i for i in via_gram if i not in near]
        n_gram = len(via_gram)
        if via_gram:
            lam, ok, fro2 = op.gram_spectrum(torch.tensor(via_gram))
            sv = safe_sqrt(lam).to(compute_dtype(op.dtype))
            ok_all = (ok.all(dim=tuple(range(ok.dim() - 1))) if ok.dim() > 1 else ok).tolist()
            if all(ok_all):  # every entry resolved: the whole stack as one group
                out.add_group(via_gram, sv)
                via_gram = []
            for j, i in enumerate(via_gram):
                window = None if ok_all[j] or env is None else near_block(op, env, i, fro2[..., j], ~ok[..., j])
                if ok_all[j]:
                    out.add(i, sv[..., j, :])
                elif window is not None:  # the entries that do not factor from a window near i (not T)
                    out.add(i, torch.where(ok[..., j, None], sv[..., j, :], window.to(sv.dtype)))
                else:
                    dense_idx.append(i)
    if len(dense_idx) > planned_dense:  # the call's memory check counted the Gramians, not these blocks
        check_fallback_memory(op, dense_idx[planned_dense:], "ESS", n_gram)
    for chunk in _chunks(op, dense_idx):
        for i, sv in zip(chunk, batched_svdvals([cache.hankel(i) for i in chunk])):
            out.add(i, sv)
    return out


def _chunks(op: Operator, idx: list) -> list:
    """``idx`` in consecutive groups of at most :data:`EXACT_CHUNK_BYTES` of block values (one group with a
    graph: the backward keeps every block anyway)."""
    if not idx or (torch.is_grad_enabled() and op.requires_grad):
        return [idx] if idx else []
    L, per = op.seq_len, op.numel_batch() * torch.finfo(compute_dtype(op.dtype)).bits // 8
    groups, cur, size = [], [], 0
    for i in idx:
        rows, cols = op.hankel_support(i)
        nbytes = per * len(range(*rows.indices(L))) * len(range(*cols.indices(L)))
        if cur and size + nbytes > EXACT_CHUNK_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += nbytes
    return groups + [cur]


def entropy_table(svs: Spectra, dtype):
    """``(keys, ess)``: entropy-ESS of every entry of ``svs``, ``ess[..., j]`` that of index ``keys[j]``, one batched
    call per group (zero padding leaves entropy-ESS unchanged: ``0 log 0 = 0``)."""
    if not len(svs):
        return [], None
    return svs.table(entropy_from_singular_values, dtype)
