"""The engine (pure tensor math) against independent NumPy float64 references: spectral functions,
Frobenius norms of Hankel blocks, exact batched SVDs, randomized sketches and their bounds.
(Gramians, the deflated SLQ and the adaptive loops: tests/test_estimators_fast.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esswatch.engine.exact import oriented_svdvals, trim_zero_lines
from esswatch.engine.hankel import hankel_fro2_dense
from esswatch.engine.randomized import entropy_bounds, sketch_singular_values, water_fill
from esswatch.engine.spectral import compute_dtype, entropy_from_singular_values, tolerance_from_singular_values

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- spectral --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_compute_dtype_is_float64_or_float32(dtype, expected):
    assert compute_dtype(dtype) == expected


def test_entropy_and_tolerance_of_singular_values_match_numpy():
    s = torch.rand(4, 9, generator=torch.Generator().manual_seed(1), dtype=F64) ** 3
    s[1, 5:] = 0
    p = s.numpy() / s.numpy().sum(-1, keepdims=True)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)
    np.testing.assert_allclose(entropy_from_singular_values(s).numpy(), np.exp(-plogp.sum(-1)), rtol=1e-12)
    for tol, relative in ((0.1, True), (1e-3, True), (0.05, False)):
        thresh = tol * s.numpy().max(-1, keepdims=True) if relative else tol
        ref = ((s.numpy() > thresh) & (s.numpy() > 0)).sum(-1)
        np.testing.assert_array_equal(tolerance_from_singular_values(s, tol, relative).numpy(), ref)


# -- Hankel norms and exact SVDs -------------------------------------------------------------


def test_hankel_fro2_dense_matches_numpy():
    L = 13
    t = torch.tril(_rand(3, L, L, seed=2))
    idx = torch.tensor([1, 2, 6, 12])
    ref = np.stack([(t[..., i:, :i].numpy() ** 2).sum((-1, -2)) for i in idx.tolist()], -1)
    np.testing.assert_allclose(hankel_fro2_dense(t, idx).numpy(), ref, rtol=1e-12)


def test_trimmed_oriented_svdvals_match_numpy():
    h = torch.zeros(2, 9, 6, dtype=F64)
    h[:, 2:5, 1:4] = _rand(2, 3, 3, seed=3)
    trimmed = trim_zero_lines(h)
    assert trimmed.shape[-2:] == (3, 3)
    ref = np.linalg.svd(h.numpy(), compute_uv=False)[..., :3]
    np.testing.assert_allclose(oriented_svdvals(trimmed).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(
        oriented_svdvals(h.transpose(-1, -2)).numpy(),
        np.linalg.svd(h.numpy(), compute_uv=False),
        rtol=1e-12,
        atol=1e-14,
    )


# -- randomized sketches and their bounds ----------------------------------------------------


def test_sketch_values_interlace_below_the_true_singular_values():
    h = _rand(2, 40, 30, seed=4)
    s = np.linalg.svd(h.numpy(), compute_uv=False)
    t = sketch_singular_values(
        lambda v: h @ v,
        lambda w: h.transpose(-1, -2) @ w,
        30,
        h.shape[:-2],
        8,
        2,
        F64,
        h.device,
        torch.Generator().manual_seed(0),
    )
    assert t.shape == (2, 8)
    assert np.all(t.numpy() <= s[..., :8] * (1 + 1e-12))
    np.testing.assert_allclose(t.numpy()[..., 0], s[..., 0], rtol=0.05)  # the top value is found


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1e-30, 1)), min_size=2, max_size=30),
    st.integers(1, 30),
    st.floats(0.0, 1.0),
    st.integers(0, 10_000),
)
def test_entropy_bounds_contain_every_consistent_spectrum(vals, k, shrink_pow, seed):
    """For any true spectrum s and sketch values t_j <= s_j, lower <= ESS(s) <= upper, up to the float64
    round-off of ||s||^2: the upper bound grows with the unseen energy, and a tail whose energy is below
    that round-off (s = [1, 4e-10]: ESS 1 + 9e-9 against an upper bound of 1) is invisible to it, so it
    is checked with ||s||^2 raised by that round-off (len(s) ulps)."""
    s = torch.tensor(sorted(vals, reverse=True), dtype=F64)
    if float(s.sum()) == 0:
        return
    k = min(k, len(vals))
    g = torch.Generator().manual_seed(seed)
    t = (s[:k] * torch.rand(k, generator=g, dtype=F64) ** (3 * shrink_pow)).sort(descending=True).values
    fro2 = (s**2).sum()
    est, lo, hi = entropy_bounds(t, fro2, len(vals))
    _, _, hi_ulp = entropy_bounds(t, fro2 * (1 + len(vals) * torch.finfo(F64).eps), len(vals))
    ex = float(entropy_from_singular_values(s))
    assert float(lo) <= ex * (1 + 1e-9) + 1e-12
    assert float(hi_ulp) >= ex * (1 - 1e-9) - 1e-12
    assert float(hi) * (1 - 1e-12) <= float(hi_ulp) <= float(hi) * (1 + 1e-4)  # by little: sqrt(30 ulps) x log


@pytest.mark.parametrize("vals", [[1.0, 4.002385552133958e-10], [1.0, 1e-9, 1e-9]])
def test_entropy_bounds_miss_only_a_tail_below_the_energy_round_off(vals):
    """The case hypothesis found: the tail's energy is lost in ||s||^2 (float64), so the plain upper
    bound misses the exact value by about 1e-8 of it; with one ulp of energy it holds."""
    s = torch.tensor(vals, dtype=F64)
    t, fro2 = s[:1], (s**2).sum()
    ex = float(entropy_from_singular_values(s))
    _, _, hi = entropy_bounds(t, fro2, len(vals))
    assert float(fro2) == 1.0 and 0 < ex / float(hi) - 1 < 1e-7  # invisible, and small
    _, _, hi_ulp = entropy_bounds(t, fro2 * (1 + len(vals) * torch.finfo(F64).eps), len(vals))
    assert float(hi_ulp) >= ex


def test_water_fill():
    x = water_fill(torch.tensor([4.0, 1.0], dtype=F64), torch.tensor(8.0, dtype=F64), 4)
    np.testing.assert_allclose(x.numpy(), [4.0, 4 / 3, 4 / 3, 4 / 3])
    x = water_fill(torch.tensor([4.0, 1.0], dtype=F64), torch.tensor(5.0, dtype=F64), 3)
    np.testing.assert_allclose(x.numpy(), [4.0, 1.0, 0.0])
