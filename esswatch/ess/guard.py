"""Guards of the functional API that run before anything large is allocated: the memory
estimate of one call (:mod:`esswatch.engine.memory`) and the result of an empty batch."""

from __future__ import annotations

import torch

from ..engine.memory import check_memory, estimate_bytes
from ..engine.spectral import compute_dtype
from ..operators import Operator

__all__ = ["call_bytes", "check_call_memory", "check_fallback_memory", "empty_result"]


def call_bytes(op: Operator, idx, estimator: str) -> int:
    """The guard's estimate of one call's big buffers (module doc), with the autograd graph where gradients
    flow (``torch.is_grad_enabled()`` and an operand that requires them)."""
    grad = torch.is_grad_enabled() and op.requires_grad
    ind = torch.as_tensor(idx).tolist()
    if op.has_gramians and (estimator == "gram" or (estimator == "auto" and op.prefers_gram)):
        return op.gram_bytes(len(ind), grad=grad)
    return _blocks_bytes(op, ind, grad, sketch=estimator in ("auto", "randomized"))


def check_call_memory(op: Operator, idx: torch.Tensor, estimator: str, what: str) -> None:
    """Raise :class:`~esswatch.engine.memory.ESSMemoryError` before anything is allocated when
    :func:`call_bytes` exceeds the limit (:mod:`esswatch.engine.memory`)."""
    grad = torch.is_grad_enabled() and op.requires_grad
    check_memory(
        call_bytes(op, idx, estimator),
        op.device,
        f"{what} on a {type(op).__name__} (batch {tuple(op.batch_shape)}, L={op.seq_len}, {idx.numel()} indices"
        + (", with gradients)" if grad else ")"),
    )


def check_fallback_memory(op: Operator, indices: list, what: str, gram_indices: int = 0) -> None:
    """Before the Gramian route's indices that do not factor take the dense route (their blocks, and for most
    operators ``T``): the same check for what that builds; with gradients beside the Gramian route's graph of
    ``gram_indices`` indices, which stays alive until the backward pass."""
    grad = torch.is_grad_enabled() and op.requires_grad
    held = op.gram_bytes(gram_indices, grad=True) if grad and gram_indices else 0
    check_memory(
        held + _blocks_bytes(op, indices, grad, sketch=False),
        op.device,
        f"{what} on a {type(op).__name__} (batch {tuple(op.batch_shape)}, L={op.seq_len}): {len(indices)} indices "
        "whose Gramians do not factor take the dense route" + (" with gradients" if grad else ""),
    )


def _blocks_bytes(op: Operator, ind: list, grad: bool, sketch: bool) -> int:
    itemsize = torch.finfo(compute_dtype(op.dtype)).bits // 8
    L = op.seq_len
    sizes = [len(range(*r.indices(L))) * len(range(*c.indices(L))) for r, c in map(op.hankel_support, ind)]
    held = op.materialize_bytes(ind, grad)
    return estimate_bytes(op.numel_batch(), sizes, itemsize, materialize=held, sketch=sketch, grad=grad)


def empty_result(op: Operator, idx: torch.Tensor, cdt) -> torch.Tensor:
    return torch.zeros(*op.batch_shape, len(idx), dtype=cdt, device=op.device)
