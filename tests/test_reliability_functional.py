"""The functional API under bad input, extreme scales and memory limits (issue 11 items 13, 14
and the denormal note): each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import entropy_ess_ref, gated_recurrence_dense, tolerance_ess_ref

import esswatch
from esswatch import entropy_ess, tolerance_ess
from esswatch.operators import Convolution, Dense, GatedRecurrence, SoftmaxAttention

pytestmark = pytest.mark.usefixtures("single_thread")


def causal(L=8, batch=(2,), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.tril(torch.randn(*batch, L, L, generator=g, dtype=dtype))


def np_entropy_ess(t, indices):
    out = []
    for i in indices:
        s = np.linalg.svd(t[..., i:, :i], compute_uv=False)
        p = s / s.sum(-1, keepdims=True)
        out.append(np.exp(-(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)))
    return np.stack(out, -1)


# -- 13. bad input: one clear ValueError naming the argument -----------------------------------
@pytest.mark.parametrize(
    "indices, match",
    [
        ([], "indices is empty"),
        ("3", "indices"),
        ([1, None], "indices"),
        ({1, 2}, "indices"),
        ([2**70], "indices"),
        (2**70, "indices"),
        ([1.5], "indices"),
        ([True], "indices"),
        (torch.tensor([1], device="meta"), "indices"),
        (torch.tensor([[3, 4]]), "0-d or 1-D"),  # was flattened: a result of 2 entries for len(indices) == 1
        (np.array([[3], [4]]), "0-d or 1-D"),
    ],
)
@pytest.mark.parametrize("fn", [entropy_ess, tolerance_ess])
def test_bad_indices_raise_value_error(fn, indices, match):
    with pytest.raises(ValueError, match=match):
        fn(causal(), indices)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_an_integer_mask_is_a_value_error(dtype):
    """Regression: a 0/1 integer mask (the dtype of a Hugging Face attention_mask) was taken as an additive float
    mask, adding 1 to the allowed scores and blocking nothing, silently. It is now a ValueError that names the
    dtype; the same mask as bool gives the values of the bool mask."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 8, 4, generator=g) for _ in range(2))
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed[:, :2] = False  # two left-padded positions
    allowed[:2, :2] = torch.eye(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"boolean.*{dtype}.*mask.bool"):
        SoftmaxAttention(q, k, mask=allowed.to(dtype))
    bool_ess = entropy_ess(SoftmaxAttention(q, k, mask=allowed.to(dtype).bool()), [3, 6])
    torch.testing.assert_close(bool_ess, entropy_ess(SoftmaxAttention(q, k, mask=allowed), [3, 6]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_additive_mask_with_nan_or_plus_inf_is_a_value_error(bad):
    """+inf used to pass (only NaN was checked) and was then treated as a blocked position; softmax has no
    value there (torch's is NaN). -inf and finfo.min still block."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 8, 4, generator=g) for _ in range(2))
    mask = torch.zeros(8, 8)
    mask[5, 2] = bad
    with pytest.raises(ValueError, match=r"mask contains NaN or \+inf"):
        entropy_ess(SoftmaxAttention(q, k, mask=mask), [3, 6])
    mask[5, 2] = float("-inf")
    ok = mask.clone()
    ok[5, 2] = torch.finfo(torch.float32).min
    torch.testing.assert_close(entropy_ess(SoftmaxAttention(q, k, mask=mask), [3, 6]),
                               entropy_ess(SoftmaxAttention(q, k, mask=ok), [3, 6]))  # fmt: skip


def test_valid_index_forms_still_work():
    t = causal()
    ref = entropy_ess(t, [2, 5])
    for form in ([2, 5], (2, 5), np.array([2, 5]), torch.tensor([2, 5]), [np.int64(2), 5]):
        torch.testing.assert_close(entropy_ess(t, form), ref)
    torch.testing.assert_close(entropy_ess(t, 5), ref[..., 1:])


@pytest.mark.parametrize("fn", [entropy_ess, tolerance_ess])
def test_meta_tensors_rejected(fn):
    with pytest.raises(ValueError, match="meta"):
        fn(torch.zeros(2, 8, 8, device="meta"), [3])
    q = torch.zeros(2, 8, 4, device="meta")
    with pytest.raises(ValueError, match="meta"):
        fn(SoftmaxAttention(q, q), [3])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), True, "1"])
def test_attention_scale_must_be_finite(scale):
    q = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="scale"):
        SoftmaxAttention(q, q, scale=scale)


def test_head_dim_zero_rejected():
    q = torch.zeros(2, 8, 0)
    with pytest.raises(ValueError, match="head dim"):
        SoftmaxAttention(q, q)
    with pytest.raises(ValueError, match="state width|N"):
        entropy_ess(GatedRecurrence(q, q), [3])


@pytest.mark.parametrize("estimator", ["auto", "exact", "randomized"])
def test_empty_batch_gives_an_empty_result(estimator):
    t = torch.zeros(0, 3, 200, 200)
    out = entropy_ess(t, [50, 100], estimator=estimator)
    assert out.shape == (0, 3, 2)
    assert tolerance_ess(t, [50, 100], estimator=estimator).shape == (0, 3, 2)


def test_huge_finite_attention_scores_are_computed_stably():
    g = torch.Generator().manual_seed(0)
    q64 = torch.randn(2, 16, 4, generator=g, dtype=torch.float64) * 3e19
    k64 = torch.randn(2, 16, 4, generator=g, dtype=torch.float64) * 3e19
    q, k = q64.float(), k64.float()
    # float64 reference: row max subtracted before exp (float64 does not overflow at 1e39)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    s = s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    t_ref = torch.softmax(s - s.amax(-1, keepdim=True), dim=-1)
    idx = [4, 8, 12]
    got = entropy_ess(SoftmaxAttention(q, k), idx, estimator="exact")
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), np_entropy_ess(t_ref.numpy(), idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [True, False, float("nan"), float("inf"), "0.1", None])
def test_rtol_and_tol_reject_bools_and_nonfinite(bad):
    t = causal()
    with pytest.raises(ValueError, match="rtol"):
        entropy_ess(t, [3], rtol=bad)
    with pytest.raises(ValueError, match="tol"):
        tolerance_ess(t, [3], tol=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_operator_value_dim_and_window_validated(bad):
    q = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="value_dim"):
        Dense(causal(), value_dim=bad)
    with pytest.raises(ValueError, match="value_dim"):
        SoftmaxAttention(q, q, value_dim=bad)
    with pytest.raises(ValueError, match="value_dim"):
        GatedRecurrence(q, q, value_dim=bad)
    with pytest.raises(ValueError, match="value_dim"):
        Convolution(torch.randn(2, 8), value_dim=bad)
    if bad is not None:
        with pytest.raises(ValueError, match="window"):
            SoftmaxAttention(q, q, window=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", float("nan")])
def test_dense_state_size_validated(bad):
    with pytest.raises(ValueError, match="state_size"):
        Dense(causal(), state_size=bad)


# -- denormal blocks: entropy-ESS is scale-invariant --------------------------------------------
@pytest.mark.parametrize("estimator", ["exact", "randomized"])
def test_denormal_block_has_the_ess_of_its_normal_twin(estimator):
    t = causal(L=12, batch=(3,), dtype=torch.float32)
    tiny = t * 1e-40
    assert (tiny[tiny != 0].abs() < torch.finfo(torch.float32).tiny).all()  # really denormal
    idx = [3, 6, 9]
    ref = entropy_ess(t, idx, estimator=estimator)
    got = entropy_ess(tiny, idx, estimator=estimator)
    assert (got > 0).all()
    # the denormal copy carries fewer significant bits (about 1e-40 / 1.4e-45 = 7e4 steps)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=2e-3)
    assert (entropy_ess(torch.zeros(2, 12, 12), idx, estimator=estimator) == 0).all()
    assert torch.equal(tolerance_ess(tiny, idx), tolerance_ess(t, idx))


def test_denormal_scale_recurrence_and_convolution():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 10, 3, generator=g)
    k = torch.randn(2, 10, 3, generator=g)
    ld = -torch.rand(2, 10, 3, generator=g)
    h = torch.randn(2, 10, generator=g)
    for est in ("gram", "exact"):
        ref = entropy_ess(GatedRecurrence(q, k, ld), [3, 5, 7], estimator=est)
        got = entropy_ess(GatedRecurrence(q * 1e-20, k * 1e-20, ld), [3, 5, 7], estimator=est)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-3)
    ref = entropy_ess(Convolution(h), [3, 5, 7])
    got = entropy_ess(Convolution(h * 1e-40), [3, 5, 7])
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=2e-3)


@pytest.mark.parametrize("scale", [1e-100, 1e-80, 1e80, 1e100])
def test_float64_recurrence_far_from_unit_scale_on_the_gramian_route(scale):
    """Regression: float64 q and k of scale 1e-80 were left as they were (the rescaling started at 1e-150),
    and the Gramians' eigenvalues, of order |q|^2 |k|^2 = 1e-320, underflowed: ESS 0 where it is about 3.9;
    at 1e80 they overflowed and eigh raised. Every estimator now agrees with a NumPy SVD of the unscaled T."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 64, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ld = -0.05 * torch.rand(1, 64, 4, generator=g, dtype=torch.float64)
    idx = [16, 32, 48]
    t = gated_recurrence_dense(q.numpy(), k.numpy(), ld.numpy())
    ref, ref_rank = entropy_ess_ref(t, idx), tolerance_ess_ref(t, idx, 1e-3, True)
    op = GatedRecurrence(q * scale, k * scale, ld)
    for est in ("auto", "gram", "exact"):
        np.testing.assert_allclose(entropy_ess(op, idx, estimator=est).numpy(), ref, rtol=1e-9)
        np.testing.assert_array_equal(tolerance_ess(op, idx, estimator=est).numpy(), ref_rank)


def test_relative_tolerance_of_a_block_trimmed_to_nothing():
    """Regression: relative tolerance-ESS took the largest singular value of an empty list where the
    structural trim leaves nothing of H_i (a window of 1, a pure delay kernel) and raised IndexError."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 16, 4, generator=g, dtype=torch.float64) for _ in range(2))
    h = torch.zeros(16, dtype=torch.float64)
    h[0] = 1.0
    for op in (SoftmaxAttention(q, k, window=1), Convolution(h)):
        ref = tolerance_ess_ref(op.dense().numpy(), [4, 8], 1e-3, True)
        assert (ref == 0).all()
        for est in ("auto", "exact", "randomized"):
            np.testing.assert_array_equal(tolerance_ess(op, [4, 8], estimator=est).numpy(), ref)


def test_scale_normalization_keeps_gradients_finite_and_exact():
    t = causal(L=10, batch=(2,), dtype=torch.float64)
    for c in (1.0, 1e-30):
        x = (t * c).requires_grad_(True)
        entropy_ess(x, [3, 5, 7], estimator="exact").sum().backward()
        assert torch.isfinite(x.grad).all()
        if c == 1.0:
            g1 = x.grad.clone()
        else:  # ESS(cT) = ESS(T) => grad at cT = grad at T / c
            torch.testing.assert_close(x.grad * c, g1, rtol=1e-6, atol=1e-9)
    z = torch.zeros(2, 10, 10, requires_grad=True)
    entropy_ess(z, [3, 5], estimator="exact").sum().backward()
    assert torch.isfinite(z.grad).all()


# -- 14. memory: estimated before allocating -----------------------------------------------------
def test_convolution_dense_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = Convolution(h).dense()
    ref = torch.zeros(3, 2, 9, 9, dtype=torch.float64)
    for r in range(9):
        for c in range(r + 1):
            ref[..., r, c] = h.detach()[..., r - c]
    assert torch.equal(t.detach(), ref)
    t.sum().backward()  # h[d] appears L - d times
    assert torch.equal(h.grad, torch.arange(9, 0, -1, dtype=torch.float64).expand(3, 2, 9))


def test_convolution_dense_builds_no_index_matrix():
    """The old dense() indexed with an int64 L x L matrix (8 bytes per entry, twice the float32 result)."""
    L = 600
    h = torch.randn(1, L)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        Convolution(h).dense()
    peak = max(abs(e.cpu_memory_usage) for e in prof.key_averages())
    assert peak <= 1.5 * L * L * 4, peak


def test_memory_cap_raises_a_clear_error(monkeypatch):
    from esswatch.engine.memory import ESSMemoryError  # noqa: I001

    monkeypatch.setenv("ESSWATCH_MAX_BYTES", "100000")
    h = torch.randn(4, 400)
    with pytest.raises(ESSMemoryError) as ei:
        entropy_ess(Convolution(h), [100, 200])
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "ESSWATCH_MAX_BYTES" in msg and "MB" in msg and "indices" in msg
    q = torch.randn(4, 400, 8)
    with pytest.raises(ESSMemoryError, match="ESSWATCH_MAX_BYTES"):
        tolerance_ess(SoftmaxAttention(q, q), [200])
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str(10**9))
    assert entropy_ess(Convolution(h), [100, 200]).shape == (4, 2)


def test_memory_cap_env_var_validated(monkeypatch):
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="ESSWATCH_MAX_BYTES"):
        entropy_ess(causal(), [3])


def test_memory_error_inside_the_watch_is_a_layer_warning(monkeypatch):
    from esswatch.layers import CausalSelfAttention
    from esswatch.watch import ESSWarning

    torch.manual_seed(0)
    model = torch.nn.Sequential(CausalSelfAttention(16, n_heads=2))
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", "2000")
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    model(torch.randn(2, 64, 16))
    with pytest.warns(ESSWarning, match="ESSWATCH_MAX_BYTES"):
        res = watch.step()
    watch.close()
    assert res["skipped"] == ["0"] and res["failures"] == 1
