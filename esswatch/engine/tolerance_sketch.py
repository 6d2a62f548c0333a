"""Randomized tolerance-ESS of one Hankel block: sketched top singular values, enough to count exactly.

The sketches and their cost model are those of :mod:`.adaptive` (``SKETCH_RANK0``, ``SKETCH_POWER_ITERS``,
``SKETCH_COST``, ``SKETCH_BUDGET``, read at call time). Pure tensor math on the block.
"""

from __future__ import annotations

import torch

from . import adaptive
from .exact import oriented_svdvals
from .randomized import sketch_singular_values
from .slq import products

__all__ = ["randomized_tolerance_sv"]


def randomized_tolerance_sv(h: torch.Tensor, tol: float, relative: bool, generator):
    """Sketched top singular values of ``h``, enough that counting them above the threshold is exact."""
    batch, (m, n) = h.shape[:-2], h.shape[-2:]
    p = min(m, n)
    h64 = h.to(torch.float64)
    fro2 = (h64**2).sum(dim=(-1, -2))
    matmul, rmatmul = products(h)
    _, rmatmul64 = products(h64)
    k = min(adaptive.SKETCH_RANK0, p)
    spent = 0.0
    while True:
        if k >= p:
            return oriented_svdvals(h)
        t = sketch_singular_values(
            matmul,
            rmatmul,
            n,
            batch,
            k,
            adaptive.SKETCH_POWER_ITERS,
            h.dtype,
            h.device,
            generator,
            rmatmul_exact=rmatmul64,
        )
        spent += adaptive.SKETCH_COST * k
        r = torch.sqrt(torch.clamp(fro2 - (t**2).sum(-1), min=0))
        thresh = tol * t[..., 0] if relative else torch.full_like(r, tol)
        # every unseen singular value is <= ||H - Q Q^T H||_2 <= r; every seen one lies in [t_j, t_j + r]
        near = ((t - thresh[..., None]).abs() <= r[..., None]).any(-1)
        if bool(((r < thresh) & ~near).all()):
            return t
        k_next = min(2 * k, p)
        if spent + adaptive.SKETCH_COST * k_next > adaptive.SKETCH_BUDGET * p:
            return oriented_svdvals(h)
        k = k_next
