"""Entropy-ESS and tolerance-ESS of a vector of singular values.

``docs/ess.md`` section 2: with ``p_j = s_j / sum_k s_k``,
``ESS = exp(-sum_j p_j log p_j)`` (``0 log 0 = 0``; ``ESS = 0`` when all ``s = 0``).

Gradients stay finite at zero and tiny singular values: the derivative of
``p log p`` is ``log p + 1``, unbounded at 0, so the backward pass evaluates the
log at ``max(p, eps)`` (``eps`` of the compute dtype). Values below ``eps`` are
round-off of a zero singular value anyway; the forward value is unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["entropy_from_singular_values", "tolerance_from_singular_values", "compute_dtype", "xlogx", "safe_sqrt"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16, float32) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _XLogX(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x > 0, x * torch.log(torch.where(x > 0, x, torch.ones_like(x))), torch.zeros_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        floor = torch.finfo(x.dtype).eps
        return g * (torch.log(torch.clamp(x, min=floor)) + 1.0)


def xlogx(x: torch.Tensor) -> torch.Tensor:
    """``x log x`` with ``0 log 0 = 0`` and a finite derivative everywhere (see module doc)."""
    return _XLogX.apply(x)


class _SafeSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sqrt(torch.clamp(x, min=0))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # d sqrt(x)/dx = 1/(2 sqrt x): floor sqrt x at sqrt(eps) * max along the last dim.
        scale = y.amax(dim=-1, keepdim=True) if y.dim() else y
        floor = torch.clamp(scale * torch.finfo(y.dtype).eps ** 0.5, min=torch.finfo(y.dtype).tiny)
        return torch.where(y > 0, g * 0.5 / torch.maximum(y, floor), torch.zeros_like(g))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` with a finite gradient (zero where ``x <= 0``)."""
    return _SafeSqrt.apply(x)


def entropy_from_singular_values(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy-ESS of non-negative singular values along ``dim``.

    Exactly ``r`` for ``r`` equal nonzero values, 0 for an all-zero vector.
    """
    s = torch.clamp(s, min=0)
    total = s.sum(dim=dim, keepdim=True)
    nonzero = total > 0
    safe_total = torch.where(nonzero, total, torch.ones_like(total))
    p = s / safe_total
    h = -xlogx(p).sum(dim=dim, keepdim=True)
    ess = torch.where(nonzero, torch.exp(h), torch.zeros_like(h))
    return ess.squeeze(dim)


def tolerance_from_singular_values(s: torch.Tensor, tol: float, relative: bool, dim: int = -1) -> torch.Tensor:
    """Number of singular values ``> tol`` (absolute) or ``> tol * max(s)`` (relative), as float."""
    if relative:
        if s.shape[dim] == 0:  # a block trimmed to nothing (a window of 1, a delay kernel): rank 0
            return s.sum(dim=dim)
        thresh = tol * s.amax(dim=dim, keepdim=True)
        # an all-zero block has rank 0 under either convention
        return ((s > thresh) & (s > 0)).sum(dim=dim).to(s.dtype)
    return (s > tol).sum(dim=dim).to(s.dtype)
