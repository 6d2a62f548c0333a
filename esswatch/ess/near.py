"""Blocks of decaying recurrences near their index: where the gates forget within a few steps, everything of
``H_i`` that matters lies in a few rows and columns around ``i``, and its singular values come from that
window (:meth:`Operator.hankel_window`) instead of the Gramian recurrence over the whole sequence or the ``L x L``
operator.

The window is taken from the operator's envelope (:meth:`Operator.envelope`,
:mod:`esswatch.engine.envelope`): the part of ``H_i`` it leaves out has a Frobenius norm of at most
:data:`NEAR_RTOL` times ``||H_i||_F``, so every singular value is within that much of ``||H_i||_F`` of the
exact one (Weyl), well below what the squared Gramian route resolves. ``||H_i||_F`` is not known before the
block is, so the window is first taken at :data:`FIRST_GUESS` of the envelope's own bound on it, and the
block's norm (a lower bound of ``||H_i||_F``) then checks it; where the check fails, a second window is
taken from the block's norm, and that one passes by construction (a larger window has a larger norm).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from ..engine.envelope import Envelope
from ..engine.exact import batched_svdvals, trim_zero_lines
from ..operators import Operator

__all__ = ["NEAR_RTOL", "NEAR_COST", "FIRST_GUESS", "envelope_of", "near_values", "near_block"]

#: a window leaves out at most this fraction of ``||H_i||_F`` (Frobenius norm)
NEAR_RTOL = 1e-12
#: the windows are taken where ``sum_i w_i^3 <= NEAR_COST * L * N^2`` over the call's indices (``w_i`` rows plus
#: columns of index ``i``'s window, ``N`` the state width), else the Gramians run: a window costs about its
#: width cubed (two segments' closed forms and an SVD), the Gramian recurrence ``L N^2`` per matrix. Measured at
#: N = 128, L = 2048, 8 heads x 2 rows, 8 indices, constant decays: windows of 212, 422 and 646 positions took
#: 0.32x, 0.95x and 2.7x the Gramians' time (examples/benchmarks/near_window.py, ``--sections cross``)
NEAR_COST = 16
#: the first window is taken at this fraction of the envelope's bound on ``||H_i||_F`` times ``NEAR_RTOL``
FIRST_GUESS = 1e-6


def _values(block: torch.Tensor, N: int) -> torch.Tensor:
    """The singular values of a window, zero-padded or cut to the state width ``N`` (``H_i`` has rank at most
    ``N``: any further values are round-off)."""
    sv = batched_svdvals([trim_zero_lines(block)])[0][..., :N]
    return torch.nn.functional.pad(sv, (0, N - sv.shape[-1]))


def envelope_of(op: Operator) -> Optional[Envelope]:
    """The operator's :class:`~esswatch.engine.envelope.Envelope` (its sums precomputed), or ``None`` where it
    has none. Built once per call and shared by :func:`near_values` and :func:`near_block`."""
    env = op.envelope()
    return None if env is None else Envelope(*env)


def near_values(op: Operator, env: Envelope, indices: Sequence[int]) -> Dict[int, torch.Tensor]:
    """``{i: singular values}`` (``batch + (N,)``) of the indices resolved from their windows (module doc):
    every index, or ``{}`` where the windows would cost more than the Gramians (:data:`NEAR_COST`), or all but
    an index whose second window would (it takes the Gramians). ``env``: :func:`envelope_of` ``op``."""
    if not indices:
        return {}
    L, N = op.seq_len, op.state_width
    limit, cost, wins = NEAR_COST * L * N * N, 0, {}
    middle_first = sorted(indices, key=lambda i: abs(2 * i - L))  # long memory shows at the first one
    i = middle_first[0]  # a window of more than limit^(1/3) rows or columns is over the limit alone
    if env.wider_than(i, env.bound_norm(i) + math.log(NEAR_RTOL * FIRST_GUESS), math.ceil(limit ** (1 / 3))):
        return {}  # decided without the envelope's cumulative sums
    for i in middle_first:
        a, b = env.window(i, env.bound_norm(i) + math.log(NEAR_RTOL * FIRST_GUESS))
        cost += (a + b) ** 3
        if (a, b) == (L - i, i) or cost > limit:
            return {}
        wins[i] = (a, b)
    out = {}
    for i in indices:
        a, b = wins[i]
        block = op.hankel_window(i, a, b)
        with torch.no_grad():
            log_norm = 0.5 * torch.log(block.detach().to(torch.float64).square().sum(dim=(-1, -2)))
        log_eps = log_norm + math.log(NEAR_RTOL)
        if not bool((env.left_out(i, a, b) <= log_eps).all()):
            # a second window from the block's norm passes: a larger window's norm is at least this one's
            a2, b2 = env.window(i, log_eps)
            if (a2, b2) == (L - i, i) or (a2 + b2) ** 3 > limit:
                continue  # (a window of zeros, say): this index takes the Gramians
            block = op.hankel_window(i, a2, b2)
        out[i] = _values(block, N)
    return out


def near_block(op: Operator, env: Envelope, i: int, fro2: torch.Tensor, where: torch.Tensor) -> Optional[torch.Tensor]:
    """The singular values (``batch + (N,)``) of ``H_i``'s window leaving out at most ``NEAR_RTOL *
    ||H_i||_F`` in the batch entries ``where`` (``fro2 = ||H_i||_F^2``, float64, from the Gramians); ``None``
    where the window would span the whole block. ``env``: :func:`envelope_of` ``op``."""
    log_eps = torch.where(where, 0.5 * torch.log(fro2.detach().to(torch.float64)) + math.log(NEAR_RTOL), torch.inf)
    a, b = env.window(i, log_eps)
    if (a, b) == (op.seq_len - i, i):
        return None
    return _values(op.hankel_window(i, a, b), op.state_width)
