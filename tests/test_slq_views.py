"""The SLQ path on strided views of T (no copies) and its float64 ||H||_F^2 from float32 blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esswatch.engine import adaptive
from esswatch.engine.slq import frobenius2, slq_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


def _flat_tail(L=512, heads=2, d=16, seed=0, dtype=torch.float64):
    """Low-ESS softmax attention with a long flat tail (clustered queries and keys plus noise)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, 4, d, generator=g, dtype=torch.float64)
    h = torch.arange(heads)[:, None]
    k = centers[h, torch.randint(0, 4, (heads, L), generator=g)] + 0.05 * torch.randn(heads, L, d, generator=g)
    q = centers[h, torch.randint(0, 4, (heads, L), generator=g)] + 0.05 * torch.randn(heads, L, d, generator=g)
    s = (4 * q) @ k.mT / d**0.5
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1).to(dtype)


@pytest.mark.parametrize("transpose", [False, True])
def test_frobenius2_float32_view_against_numpy_float64(transpose):
    T = _flat_tail(dtype=torch.float32)
    for i in (100, 256, 400):
        h = T[..., i:, :i]
        h = h.mT if transpose else h
        ref = (h.numpy().astype(np.float64) ** 2).sum((-1, -2))
        got = frobenius2(h)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slq_on_strided_view_equals_contiguous_copy(dtype):
    T = _flat_tail(dtype=dtype)
    for h in (T[..., 200:, :200], T[..., 300:, :300].mT):  # tall views, row stride L
        assert not h.is_contiguous()
        a = slq_entropy(h, 32, torch.Generator().manual_seed(3))
        b = slq_entropy(h.contiguous(), 32, torch.Generator().manual_seed(3))
        for x, y in zip(a, b):
            np.testing.assert_allclose(
                x.double().numpy(), y.double().numpy(), rtol=1e-4 if dtype == torch.float32 else 1e-9
            )
        ex = torch.linalg.svdvals(h.double())
        p = ex / ex.sum(-1, keepdim=True)
        ref = torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(-1))
        assert ((a[0] - ref).abs() / ref <= 0.02).all()


def test_randomized_entropy_on_view_keeps_bounds(monkeypatch):
    monkeypatch.setattr(adaptive, "SLQ_MIN_SIZE", 96)
    T = _flat_tail()
    h = T[..., 300:, :300]  # wide: turned tall as a transposed view
    est, lo, hi = adaptive.randomized_entropy(h, 0.02, torch.Generator().manual_seed(0))
    s = np.linalg.svd(h.numpy(), compute_uv=False)
    p = s / s.sum(-1, keepdims=True)
    ref = np.exp(-(p * np.log(np.clip(p, 1e-300, None))).sum(-1))
    assert np.all(lo.numpy() <= ref * (1 + 1e-9)) and np.all(hi.numpy() >= ref * (1 - 1e-9))
    assert np.all(np.abs(est.numpy() - ref) <= 0.02 * ref)
