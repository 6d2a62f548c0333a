"""Randomized, matrix-free entropy-ESS of one Hankel block, with bounds.

``H`` (``m x n``, ``p = min(m, n)`` singular values ``s_1 >= ... >= s_p``) is only
touched through ``H @ V`` and ``H^T @ W``. A rank-``k`` subspace iteration
(Halko, Martinsson & Tropp 2011, Alg. 4.4) gives an orthonormal ``Q`` and the
singular values ``t_1 >= ... >= t_k`` of ``Q^T H``. Two facts hold
deterministically, whatever the random draw:

1. ``t_j <= s_j`` for ``j <= k`` (singular values of a compression interlace);
2. ``sum_j s_j^2 = ||H||_F^2`` is known exactly (the caller sums the squares of the block
   in float64, :mod:`.adaptive`), so the energy the sketch has not seen is
   ``r^2 = ||H||_F^2 - sum_j t_j^2 >= 0``.

The entropy-ESS depends on the whole spectrum's L1 mass, so the unseen energy
matters. Among all spectra consistent with (1) and (2) the estimator evaluates
two extremes:

* lower: all unseen energy on the top singular value,
  ``(sqrt(t_1^2 + r^2), t_2, ..., t_k, 0, ...)`` (the most concentrated);
* upper: water-filling, ``s_j^2 = max(t_j^2, lam)`` for all ``p`` values with
  ``lam`` chosen so the energies sum to ``||H||_F^2`` (the flattest).

The estimate is their geometric mean; the rank is doubled until
``upper / lower <= (1 + rtol)^2``, which puts the estimate within ``rtol`` of every
value between the bounds. These bounds are functions of (1) and (2) only, so they
do not depend on the random draw holding; that the two configurations are the
extremes of entropy-ESS over the consistent set is checked numerically in the
test-suite (random and adversarial spectra), not proven. See ``docs/estimators.md`` (section 1) and
``docs/ess.md`` section 4.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .spectral import entropy_from_singular_values

__all__ = ["sketch_singular_values", "entropy_bounds", "water_fill"]


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def sketch_singular_values(
    matmul: Callable[[torch.Tensor], torch.Tensor],
    rmatmul: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    batch_shape: torch.Size,
    k: int,
    n_iter: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: Optional[torch.Generator],
    rmatmul_exact: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    return_basis: bool = False,
):
    """Top-``k`` singular values of ``Q^T H`` from a subspace iteration (lower bounds of ``s_1..s_k``).

    The power iterations run in ``dtype``; if ``rmatmul_exact`` is given (a float64
    ``H^T @ W``), the final basis is re-orthonormalized in float64 and projected with
    it, so ``sum t_j^2`` is accurate to float64 round-off (the unseen energy
    ``||H||_F^2 - sum t_j^2`` is a difference of nearly equal numbers).
    """
    omega = torch.randn(*batch_shape, n, k, dtype=dtype, device=device, generator=generator)
    qm = _orth(matmul(omega))
    for _ in range(n_iter):
        qn = _orth(rmatmul(qm))
        qm = _orth(matmul(qn))
    if rmatmul_exact is None:
        b = rmatmul(qm)
    else:
        b = rmatmul_exact(_orth(qm.to(torch.float64)))
    t = torch.linalg.svdvals(b)  # singular values of H^T Q = those of Q^T H
    if return_basis:
        return t, _orth(b.to(torch.float64))
    return t


def water_fill(t2: torch.Tensor, total: torch.Tensor, p: int) -> torch.Tensor:
    """Flattest squared spectrum of length ``p`` with ``x_j >= t2_j`` and ``sum x = total``.

    ``t2``: ``batch + (k,)`` descending, ``k <= p``; ``total``: ``batch``.
    Returns ``batch + (p,)``: ``x_j = max(t2_j, lam)`` (``t2_j = 0`` for ``j > k``).
    """
    k = t2.shape[-1]
    full = torch.zeros(*t2.shape[:-1], p, dtype=t2.dtype, device=t2.device)
    full[..., :k] = t2
    # ascending order: raising the j smallest values to level lam costs j*lam - sum(smallest j)
    asc = torch.flip(full, dims=[-1])
    csum = torch.cumsum(asc, dim=-1)
    j = torch.arange(1, p + 1, dtype=t2.dtype, device=t2.device)
    rest = total[..., None] - (csum[..., -1:] - csum)  # total minus the untouched largest p-j values
    lam = rest / j  # level if the j smallest are raised
    # the right j: largest j with lam >= asc[j-1] (level at least the largest raised value)
    valid = lam >= asc - 1e-300
    jstar = (valid * j).amax(dim=-1, keepdim=True).clamp(min=1).long() - 1
    level = torch.gather(lam, -1, jstar)
    return torch.maximum(full, level)


def entropy_bounds(t: torch.Tensor, fro2: torch.Tensor, p: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(estimate, lower, upper)`` of entropy-ESS from sketched values ``t`` and exact ``||H||_F^2``.

    ``t``: ``batch + (k,)`` descending; ``fro2``: ``batch``; ``p`` = number of singular values.
    """
    t = torch.clamp(t, min=0)
    t2 = t * t
    r2 = torch.clamp(fro2 - t2.sum(-1), min=0)
    low_s = t.clone()
    low_s[..., 0] = torch.sqrt(t2[..., 0] + r2)
    lower = entropy_from_singular_values(low_s)
    upper = entropy_from_singular_values(torch.sqrt(water_fill(t2, t2.sum(-1) + r2, p)))
    upper = torch.maximum(upper, lower)
    est = torch.sqrt(lower * upper)
    return est, lower, upper
