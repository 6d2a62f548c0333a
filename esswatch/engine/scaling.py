"""Blocks far from unit scale, and all-zero blocks, for the randomized estimator of entropy-ESS.

Entropy-ESS is scale-free, but the estimator's arithmetic is not: a float32 block whose
Frobenius norm is far below one (a strongly decaying recurrence, a softmax block that holds
little of its operator's mass) has squared entries and vector norms that underflow, and the
Golub-Kahan runs stop a probe whose norm falls below an absolute floor. The functional API
rescales each operator to entries of order one, but a block can still be tiny relative to its
operator. :func:`on_unit_scale` runs the estimator on each batch entry multiplied by a power of
two (exact in floating point: the estimate is that of the block itself) that brings its norm
within ``2^-SAFE_LOG2 .. 2^SAFE_LOG2``, and answers all-zero entries (a batch row that is all
padding at this index) with ``ESS = 0`` (``docs/ess.md``) without running the estimator on them.
Blocks already in range, with no zero entry, are passed through untouched (no copy), so the
estimator's results on them do not change. Pure tensor math on the block.
"""

from __future__ import annotations

import math

import torch

from .slq import frobenius2

__all__ = ["SAFE_LOG2", "on_unit_scale"]

#: entries whose ||h||_F lies within 2^-SAFE_LOG2 .. 2^SAFE_LOG2 are left as they are
SAFE_LOG2 = 30
#: the largest power-of-two exponent applied (float32's normal range ends at 2^-126)
_MAX_SHIFT = {torch.float32: 120}


def on_unit_scale(estimate, h: torch.Tensor, fro2: torch.Tensor):
    """``estimate(h, fro2) -> (est, lo, hi)`` (each ``batch``) run on ``h`` (``batch + (m, n)``) with
    every batch entry brought within unit scale and all-zero entries answered with 0 (module doc).

    ``fro2``: ``||h||_F^2`` per entry (float64), which may have underflowed where it was summed in
    float32. Entries outside ``2^(-2 SAFE_LOG2) .. 2^(2 SAFE_LOG2)`` are scaled by ``2^-e``, ``2^e``
    the power of two nearest their largest magnitude (zero: the entry is all zero), and their norm
    is summed again in float64 after the scaling (before it, it may not be representable)."""
    lo_f, hi_f = 2.0 ** (-2 * SAFE_LOG2), 2.0 ** (2 * SAFE_LOG2)
    off = (fro2 < lo_f) | (fro2 > hi_f)
    if h.numel() == 0 or not bool(off.any()):  # an empty block (a window of 1) is the estimator's own case
        return estimate(h, fro2)
    batch, (m, n) = h.shape[:-2], h.shape[-2:]
    flat, f2 = h.reshape(fro2.numel(), m, n), fro2.reshape(-1).clone()
    shift = torch.zeros_like(f2)
    cap = _MAX_SHIFT.get(h.dtype, 1000)
    for e in off.reshape(-1).nonzero()[:, 0].tolist():
        top = float(flat[e].abs().amax())
        if top == 0:
            f2[e] = 0.0
            continue
        shift[e] = min(max(round(math.log2(top)), -cap), cap)
        f2[e] = frobenius2(flat[e].to(torch.float64) * 2.0 ** -float(shift[e]))
    nz = (f2 > 0).nonzero()[:, 0]
    out = [torch.zeros(f2.shape, dtype=f2.dtype, device=f2.device) for _ in range(3)]
    if nz.numel():
        sub = flat[nz] * torch.exp2(-shift[nz]).to(h.dtype)[:, None, None]  # exact: powers of two
        for o, x in zip(out, estimate(sub, f2[nz])):
            o[nz] = x.to(o.dtype)
    return tuple(o.reshape(batch) for o in out)
