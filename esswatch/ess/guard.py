"""Guards of the functional API that run before anything large is allocated: the memory
estimate of one call (:mod:`esswatch.engine.memory`) and the result of an empty batch."""

from __future__ import annotations

import torch

from ..engine.memory import check_memory, estimate_bytes
from ..engine.spectral import compute_dtype
from ..operators import Operator, SoftmaxAttention

__all__ = ["check_call_memory", "empty_result"]


def check_call_memory(op: Operator, idx: torch.Tensor, estimator: str, what: str) -> None:
    """Estimate the call's big buffers before any is allocated (:mod:`esswatch.engine.memory`)."""
    itemsize = torch.finfo(compute_dtype(op.dtype)).bits // 8
    L, ind = op.seq_len, idx.tolist()
    gram = op.has_gramians and (estimator == "gram" or (estimator == "auto" and op.prefers_gram))
    nbytes = estimate_bytes(
        op.numel_batch(),
        L,
        [] if gram else ind,
        itemsize,
        dense=not gram,
        scores=isinstance(op, SoftmaxAttention),
        sketch=estimator in ("auto", "randomized") and not gram,
    )
    if gram:
        nbytes += op.gram_bytes(len(ind))
    check_memory(
        nbytes, op.device, f"{what} on a {type(op).__name__} (batch {tuple(op.batch_shape)}, L={L}, {len(ind)} indices)"
    )


def empty_result(op: Operator, idx: torch.Tensor, cdt) -> torch.Tensor:
    return torch.zeros(*op.batch_shape, len(idx), dtype=cdt, device=op.device)
