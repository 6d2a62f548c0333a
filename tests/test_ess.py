"""The functional API (``entropy_ess``, ``tolerance_ess``): every estimator against a NumPy SVD of
``T[i:, :i]``, the randomized bounds, analytic cases, gradients, dtypes and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from operator_cases import F64
from operator_cases import ops as _ops
from operator_cases import rand as _rand
from operator_cases import trained_like_attention as _trained_like_attention
from reference import (
    convolution_loop,
    entropy_ess_ref,
    gated_recurrence_loop,
    softmax_attention_loop,
    tolerance_ess_ref,
)

import esswatch as ew
from esswatch.engine.spectral import entropy_from_singular_values
from esswatch.operators import Convolution, Dense, GatedRecurrence, SoftmaxAttention

# -- every estimator against NumPy SVD ---------------------------------------------------


@pytest.mark.parametrize("name", list(_ops().keys()))
def test_estimators_match_numpy_reference(name):
    op = _ops(L=24)[name]
    T = op.dense().numpy()
    idx = list(range(1, 24))
    ref = entropy_ess_ref(T, idx)
    estimators = ["exact", "randomized", "auto"] + (["gram"] if isinstance(op, GatedRecurrence) else [])
    for est in estimators:
        e, lo, hi = ew.entropy_ess(op, idx, estimator=est, return_bounds=True)
        assert e.shape == op.batch_shape + (len(idx),)
        assert e.dtype == F64
        if est == "randomized":
            np.testing.assert_allclose(e.numpy(), ref, rtol=0.02, err_msg=f"{name}/{est}")
            assert (lo.numpy() <= ref * (1 + 1e-9)).all() and (hi.numpy() >= ref * (1 - 1e-9)).all()
        else:
            np.testing.assert_allclose(e.numpy(), ref, rtol=1e-5, atol=1e-9, err_msg=f"{name}/{est}")
            assert torch.equal(lo, e) and torch.equal(hi, e)


@pytest.mark.parametrize("kind", ["random_softmax", "trained_like", "long_tail_dense"])
def test_randomized_within_rtol_with_valid_bounds(kind):
    L = 256
    if kind == "random_softmax":
        op = SoftmaxAttention(_rand(2, L, 16, seed=3), _rand(2, L, 16, seed=4))
    elif kind == "trained_like":
        op = _trained_like_attention(L)
    else:
        # a long tail of small singular values: U diag(s) V^T with power-law s, made causal
        g = torch.Generator().manual_seed(5)
        u, _ = torch.linalg.qr(torch.randn(L, L, generator=g, dtype=F64))
        v, _ = torch.linalg.qr(torch.randn(L, L, generator=g, dtype=F64))
        s = torch.arange(1, L + 1, dtype=F64) ** -1.5
        op = Dense(torch.tril(u @ torch.diag(s) @ v.T))
    idx = [70, 128, 180]  # min(i, L-i) > 64: auto/randomized really sketch here
    ref = entropy_ess_ref(op.dense().numpy(), idx)
    for rtol in (0.02, 0.1):
        e, lo, hi = ew.entropy_ess(op, idx, estimator="randomized", rtol=rtol, return_bounds=True)
        assert np.all(np.abs(e.numpy() - ref) <= rtol * ref + 1e-9), (kind, rtol, e, ref)
        assert np.all(lo.numpy() <= ref * (1 + 1e-9)) and np.all(hi.numpy() >= ref * (1 - 1e-9))
        # the bounds are useful: far tighter than the trivial [1, min(i, L-i)]
        assert np.all(hi.numpy() / lo.numpy() <= (1 + rtol) ** 2 + 1e-9)


def test_randomized_does_not_touch_global_rng():
    op = _trained_like_attention(200)
    state = torch.random.get_rng_state()
    ew.entropy_ess(op, [100], estimator="randomized")
    assert torch.equal(state, torch.random.get_rng_state())
    # and is reproducible
    a = ew.entropy_ess(op, [100], estimator="randomized")
    b = ew.entropy_ess(op, [100], estimator="randomized")
    assert torch.equal(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(2, 20),
    N=st.integers(1, 5),
    batch=st.integers(1, 3),
    decay=st.sampled_from(["none", "full", "head"]),
    scale=st.floats(0.01, 10.0),
    seed=st.integers(0, 10_000),
)
def test_hypothesis_gated_recurrence(L, N, batch, decay, scale, seed):
    q, k = _rand(batch, L, N, seed=seed, scale=scale), _rand(batch, L, N, seed=seed + 1)
    ld = None
    if decay != "none":
        ld = (
            -torch.rand(
                batch, L, N if decay == "full" else 1, generator=torch.Generator().manual_seed(seed + 2), dtype=F64
            )
            * 2
        )
    op = GatedRecurrence(q, k, ld)
    T = gated_recurrence_loop(q.numpy(), k.numpy(), None if ld is None else ld.numpy())
    idx = list(range(1, L))
    ref = entropy_ess_ref(T, idx)
    for est in ("exact", "gram", "auto"):
        np.testing.assert_allclose(ew.entropy_ess(op, idx, estimator=est).numpy(), ref, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
        ew.tolerance_ess(op, idx, estimator="gram", tol=1e-6).numpy(), tolerance_ess_ref(T, idx, 1e-6, True)
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(2, 24),
    d=st.integers(1, 6),
    window=st.one_of(st.none(), st.integers(1, 8)),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 20.0),
)
def test_hypothesis_softmax_and_conv(L, d, window, seed, scale):
    q, k = _rand(2, L, d, seed=seed, scale=scale), _rand(2, L, d, seed=seed + 1)
    op = SoftmaxAttention(q, k, window=window)
    T = softmax_attention_loop(q.numpy(), k.numpy(), 1 / math.sqrt(d), window=window)
    idx = list(range(1, L))
    for est in ("exact", "randomized", "auto"):
        e, lo, hi = ew.entropy_ess(op, idx, estimator=est, return_bounds=True)
        ref = entropy_ess_ref(T, idx)
        np.testing.assert_allclose(e.numpy(), ref, rtol=1e-5 if est != "randomized" else 0.02, atol=1e-9)
        assert np.all(lo.numpy() <= ref * (1 + 1e-9) + 1e-12) and np.all(hi.numpy() >= ref * (1 - 1e-9) - 1e-12)
    h = _rand(L, seed=seed + 3)
    np.testing.assert_allclose(
        ew.entropy_ess(Convolution(h), idx).numpy(),
        entropy_ess_ref(convolution_loop(h.numpy()), idx),
        rtol=1e-5,
        atol=1e-9,
    )


def test_lti_recurrence_has_tolerance_ess_N():
    L, N = 40, 4
    decays = torch.tensor([0.3, 0.55, 0.75, 0.9], dtype=F64)
    q = torch.ones(L, N, dtype=F64) * _rand(N, seed=1)
    k = torch.ones(L, N, dtype=F64) * _rand(N, seed=2)
    op = GatedRecurrence(q, k, torch.log(decays).expand(L, N))
    idx = list(range(1, L))
    tol = ew.tolerance_ess(op, idx, tol=1e-9)
    exact = ew.tolerance_ess(op, idx, tol=1e-9, estimator="exact")
    for j, i in enumerate(idx):
        if N <= i <= L - N:
            assert tol[j] == N and exact[j] == N, (i, tol[j])
        else:
            assert tol[j] == min(i, L - i)


def test_linear_attention_rank_at_most_dk_and_window_at_most_w():
    L, dk = 48, 3
    op = GatedRecurrence(_rand(2, L, dk, seed=1), _rand(2, L, dk, seed=2))
    t = ew.tolerance_ess(op, tol=1e-10, estimator="exact")
    assert t.max() <= dk and t[:, dk : L - dk].min() == dk
    assert (ew.entropy_ess(op) <= dk + 1e-9).all()
    w = 5
    sw = SoftmaxAttention(_rand(2, L, 8, seed=3), _rand(2, L, 8, seed=4), window=w)
    assert ew.tolerance_ess(sw, tol=1e-12, estimator="exact").max() <= w
    assert (ew.entropy_ess(sw) <= w + 1e-9).all()


# -- analytic cases -------------------------------------------------------------------------


def test_zero_operator_and_flat_spectrum():
    L = 12
    z = torch.zeros(2, L, L, dtype=F64)
    assert torch.equal(ew.entropy_ess(z), torch.zeros(2, L - 1, dtype=F64))
    assert torch.equal(ew.tolerance_ess(z), torch.zeros(2, L - 1, dtype=F64))
    # H_i with r equal nonzero singular values: place an r x r scaled orthogonal block
    for r in (1, 3, 5):
        T = torch.zeros(L, L, dtype=F64)
        qmat, _ = torch.linalg.qr(_rand(r, r, seed=r))
        T[6 : 6 + r, 6 - r : 6] = 2.5 * qmat
        assert abs(float(ew.entropy_ess(T, [6])) - r) < 1e-12
    s = torch.tensor([3.0, 3.0, 3.0, 0.0], dtype=F64)
    assert abs(float(entropy_from_singular_values(s)) - 3) < 1e-12
    assert torch.equal(entropy_from_singular_values(torch.zeros(5)), torch.tensor(0.0))


def test_ess_bounded_by_geometry():
    op = SoftmaxAttention(_rand(3, 30, 8, seed=1), _rand(3, 30, 8, seed=2))
    e = ew.entropy_ess(op)
    geo = torch.minimum(torch.arange(1, 30), 30 - torch.arange(1, 30)).to(F64)
    assert (e >= 0).all() and (e <= geo + 1e-9).all()
    assert torch.equal(op.tss(torch.arange(1, 30)), geo)
    assert GatedRecurrence(_rand(30, 4), _rand(30, 4)).tss(torch.tensor([2, 10, 28])).tolist() == [2, 4, 2]


# -- gradients --------------------------------------------------------------------------------


def test_gradcheck_exact_and_gram():
    L, N = 7, 2
    q = _rand(1, L, N, seed=1).requires_grad_()
    k = _rand(1, L, N, seed=2).requires_grad_()
    ld = (-torch.rand(1, L, N, generator=torch.Generator().manual_seed(3), dtype=F64) - 0.1).requires_grad_()
    idx = [2, 3, 4]
    for est in ("exact", "gram"):
        torch.autograd.gradcheck(
            lambda q, k, ld, est=est: ew.entropy_ess(GatedRecurrence(q, k, ld), idx, estimator=est), (q, k, ld)
        )
    t = torch.tril(_rand(2, L, L, seed=4)).requires_grad_()
    torch.autograd.gradcheck(lambda t: ew.entropy_ess(torch.tril(t), [2, 3, 5], estimator="exact"), (t,))
    qa, ka = _rand(1, L, 3, seed=5).requires_grad_(), _rand(1, L, 3, seed=6).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: ew.entropy_ess(SoftmaxAttention(a, b, window=4), [3, 4]), (qa, ka))
    h = _rand(L, seed=7).requires_grad_()
    torch.autograd.gradcheck(lambda h: ew.entropy_ess(Convolution(h), [2, 4]), (h,))


def test_gradients_finite_with_zero_and_repeated_singular_values():
    L = 10
    # zero operator, rank-1 operator (many zero singular values), repeated values (scaled orthogonal block)
    T0 = torch.zeros(L, L, dtype=F64, requires_grad=True)
    T1 = torch.tril(torch.ones(L, L, dtype=F64)).requires_grad_()
    qmat, _ = torch.linalg.qr(_rand(4, 4, seed=1))
    T2 = torch.zeros(L, L, dtype=F64)
    T2[5:9, 1:5] = qmat
    T2.requires_grad_()
    for T in (T0, T1, T2):
        ess = ew.entropy_ess(T, estimator="exact").sum()
        (g,) = torch.autograd.grad(ess, T)
        assert torch.isfinite(g).all()
    # gram path: identical channels give repeated/zero singular values
    q = torch.ones(1, 12, 3, dtype=F64, requires_grad=True)
    k = torch.ones(1, 12, 3, dtype=F64, requires_grad=True)
    ld = torch.full((1, 12, 3), -0.5, dtype=F64, requires_grad=True)
    ess = ew.entropy_ess(GatedRecurrence(q, k, ld), estimator="gram").sum()
    grads = torch.autograd.grad(ess, (q, k, ld))
    assert all(torch.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(
        ew.entropy_ess(GatedRecurrence(q, k, ld), estimator="gram").detach().numpy(),
        entropy_ess_ref(GatedRecurrence(q, k, ld).dense().detach().numpy(), range(1, 12)),
        rtol=1e-5,
    )


def test_float32_and_half_inputs_compute_in_float32():
    op = SoftmaxAttention(_rand(2, 20, 4, seed=1).float(), _rand(2, 20, 4, seed=2).float())
    e32 = ew.entropy_ess(op)
    assert e32.dtype == torch.float32
    e64 = ew.entropy_ess(op.to(dtype=F64))
    np.testing.assert_allclose(e32.numpy(), e64.numpy(), rtol=1e-4)
    eh = ew.entropy_ess(SoftmaxAttention(op.q.bfloat16(), op.k.bfloat16()))
    assert eh.dtype == torch.float32 and torch.isfinite(eh).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ea = ew.entropy_ess(op)
    assert ea.dtype == torch.float32
    np.testing.assert_allclose(ea.numpy(), e32.numpy(), rtol=1e-6)


# -- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ew.entropy_ess(torch.randn(5, 5)), "not causal"),
        (lambda: ew.entropy_ess(torch.randn(5, 4)), r"\(\.\.\., L, L\)"),
        (lambda: ew.entropy_ess(torch.tril(torch.ones(5, 5)), [0]), "1..L-1"),
        (lambda: ew.entropy_ess(torch.tril(torch.ones(5, 5)), [5]), "1..L-1"),
        (lambda: ew.entropy_ess(torch.tril(torch.ones(5, 5)), [1.5]), "integers"),
        (lambda: ew.entropy_ess(torch.tril(torch.full((5, 5), float("nan")))), "non-finite"),
        (lambda: ew.entropy_ess(torch.tril(torch.full((5, 5), float("inf")))), "non-finite"),
        (lambda: ew.entropy_ess(torch.ones(1, 1)), "at least 2"),
        (lambda: ew.entropy_ess(torch.tril(torch.ones(5, 5)), estimator="svd"), "estimator"),
        (lambda: ew.entropy_ess(torch.tril(torch.ones(5, 5)), estimator="gram"), "GatedRecurrence"),
        (lambda: ew.entropy_ess(torch.tril(torch.ones(5, 5)), rtol=0), "rtol"),
        (lambda: ew.entropy_ess([[1.0]]), "Operator"),
        (lambda: ew.tolerance_ess(torch.tril(torch.ones(5, 5)), tol=-1), "tol"),
        (lambda: ew.entropy_ess(GatedRecurrence(torch.randn(5, 3), torch.full((5, 3), float("nan")))), "non-finite"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- CUDA ------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    for name, op in _ops(L=40).items():
        cpu = ew.entropy_ess(op)
        gpu = ew.entropy_ess(op.to(device="cuda"))
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-6, err_msg=name)
    op = _trained_like_attention(256).to(dtype=torch.float32, device="cuda")
    e = ew.entropy_ess(op, [100, 128])
    ref = entropy_ess_ref(op.dense().double().cpu().numpy(), [100, 128])
    assert np.all(np.abs(e.cpu().numpy() - ref) <= 0.021 * ref)


def test_flush_denormal_state_is_restored():
    from esswatch.ess import _flush_denormal_enabled

    op = SoftmaxAttention(_rand(1, 30, 4, seed=1), _rand(1, 30, 4, seed=2))
    assert not _flush_denormal_enabled()
    ew.entropy_ess(op)
    assert not _flush_denormal_enabled()
    try:
        torch.set_flush_denormal(True)
        ew.entropy_ess(op)
        assert _flush_denormal_enabled()
    finally:
        torch.set_flush_denormal(False)
