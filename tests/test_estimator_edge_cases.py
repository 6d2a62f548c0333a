"""The randomized estimator on blocks its construction did not plan for, against NumPy SVDs.

Left padding leaves a batch row's block all zero at early indices (ESS 0); a block can be tiny
relative to its operator (the functional API rescales the operator, not each block); a block can
be exactly low-rank (uniform attention, an all-ones kernel: rank 1), so that the quadrature's
Golub-Kahan runs break down at once. Before ``esswatch/engine/scaling.py``, float32 ``auto`` and
``randomized`` raised a LinAlgError on the first, and both dtypes were up to 20% off on the
second; before the breakdown rule of ``GolubKahanRuns.coefficients``, float32 answered ESS 2.53
for the all-ones blocks of ESS 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import entropy_ess_ref

import esswatch as ew
from esswatch.operators import Convolution, Dense, SoftmaxAttention

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
L = 768
RTOL = 0.02


def _clustered(seed=0, heads=4, d=16, clusters=4, noise=0.05, sharp=4.0):
    """Low-ESS attention with a long flat tail (the quadrature's case): clustered q, k plus noise."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, clusters, d, generator=g, dtype=F64)
    h = torch.arange(heads)[:, None]
    pick = lambda: centers[h, torch.randint(0, clusters, (heads, L), generator=g)]  # noqa: E731
    k = pick() + noise * torch.randn(heads, L, d, generator=g, dtype=F64)
    q = pick() + noise * torch.randn(heads, L, d, generator=g, dtype=F64)
    return q * sharp, k


def _check(op, ref, idx, estimator):
    e, lo, hi = (
        x.double().numpy()
        for x in ew.entropy_ess(
            op, idx, estimator=estimator, rtol=RTOL, return_bounds=True, generator=torch.Generator().manual_seed(0)
        )
    )
    assert np.isfinite(e).all()
    np.testing.assert_array_less(np.abs(e - ref), RTOL * ref + 1e-12)
    assert (lo <= ref * (1 + 1e-5) + 1e-12).all() and (ref <= hi * (1 + 1e-5) + 1e-12).all()
    return e, lo, hi


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("estimator", ["auto", "randomized"])
def test_blocks_that_are_all_left_padding_have_ess_zero(dtype, estimator):
    """Batch row 3 is left-padded to 200 valid tokens (its first 568 keys masked, and their query rows
    see nothing), row 2 right-padded to 500: at i <= 568 row 3's block is all zero, ESS exactly 0,
    while the other rows' blocks are large enough for the quadrature."""
    q, k = _clustered()
    keep = torch.ones(4, L, L, dtype=torch.bool)
    keep[3, :, : L - 200] = False
    keep[2, :, 500:] = False
    op = SoftmaxAttention(q, k, mask=keep)
    idx = [300, 384, 500, 568, 600]
    ref = entropy_ess_ref(op.dense().numpy(), idx)
    assert (ref[3, :4] == 0).all() and (ref[3, 4] > 0) and (ref[:3] > 1).all()
    e, lo, hi = _check(op.to(dtype=dtype), ref, idx, estimator)
    assert (e[3, :4] == 0).all() and (lo[3, :4] == 0).all() and (hi[3, :4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_block_tiny_against_its_operator_keeps_its_ess(dtype):
    """``T = I + s A`` (``A`` strictly lower, low-ESS attention): ``H_i = s A[i:, :i]`` has the ESS of
    ``A``'s block for every ``s``, while the operator's scale stays that of ``I``. Float32 sums of
    squares underflow below about ``s = 2^-60``, and float64 Golub-Kahan runs stopped at an absolute
    floor below ``2^-100``."""
    q, k = _clustered(seed=1)
    A = torch.tril(SoftmaxAttention(q, k).dense(), -1)
    eye = torch.eye(L, dtype=F64).expand(4, L, L)
    idx = [384, 500]
    ref = entropy_ess_ref(A.numpy(), idx)
    shifts = [0, 40, 80, 100] + ([300, 600] if dtype == F64 else [])
    for s in shifts:
        e, _, _ = _check(Dense((eye + 2.0**-s * A).to(dtype)), ref, idx, "randomized")
        if s == 0:
            first = e
    # and every scale agrees with the unscaled estimate within rtol
    np.testing.assert_allclose(e, first, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", ["all-ones kernel", "uniform attention"])
def test_exactly_low_rank_blocks(dtype, case):
    """Rank-1 blocks at sizes where the quadrature runs (L = 1024, 12 indices, 4 generator seeds): a
    convolution with an all-ones kernel (``T`` the causal all-ones matrix) and attention whose keys
    are all equal (``T[r, c] = 1 / (r + 1)``). The deflated remainder is round-off and the
    Golub-Kahan runs break down at their first step; the answer must still be ESS 1 (the float32
    all-ones case put 9 of 192 answers at about 2.5 before the breakdown rule)."""
    n = 1024
    if case == "all-ones kernel":
        op = Convolution(torch.ones(4, n, dtype=F64))
    else:
        g = torch.Generator().manual_seed(2)
        q, k = torch.randn(4, n, 16, generator=g, dtype=F64), torch.randn(4, 1, 16, generator=g, dtype=F64)
        op = SoftmaxAttention(q, k.expand(4, n, 16))
    op = op.to(dtype=dtype)
    idx = list(range(300, n - 299, 37))
    ref = entropy_ess_ref(op.dense().double().numpy(), idx)
    assert np.allclose(ref, 1.0, rtol=2e-3)  # the float32 matrices' own round-off values: up to 1.0008
    for seed in range(4):
        e, lo, hi = (
            x.double().numpy()
            for x in ew.entropy_ess(
                op, idx, estimator="randomized", return_bounds=True, generator=torch.Generator().manual_seed(seed)
            )
        )
        np.testing.assert_array_less(np.abs(e - ref), RTOL * ref)
        # entries answered exactly carry float32 SVD round-off: values near eps s_1 move ESS 1 by up to 3e-5
        slack = 1e-4 if dtype == torch.float32 else 1e-9
        assert (lo <= ref * (1 + slack)).all() and (ref <= hi * (1 + slack)).all()


@pytest.mark.parametrize("estimator", ["randomized", "auto"])
def test_a_window_of_one_leaves_empty_blocks_with_ess_zero(estimator):
    """A window of 1 makes ``T`` diagonal: every ``H_i`` is zero and trimmed to an empty block
    (a property test found the rescaling step failing on it)."""
    q, k = _clustered(seed=3)
    op = SoftmaxAttention(q[:, :40], k[:, :40], window=1)
    idx = [1, 2, 20, 39]
    ref = entropy_ess_ref(op.dense().numpy(), idx)
    assert (ref == 0).all()
    for dtype in (torch.float32, F64):
        e = ew.entropy_ess(op.to(dtype=dtype), idx, estimator=estimator, return_bounds=True)
        assert all((x == 0).all() for x in e)
