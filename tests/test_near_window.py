"""Windows near the index (``esswatch.engine.envelope``, ``esswatch.ess.near``): where the gates forget within a
few steps, ``H_i`` is taken from a few rows and columns around ``i``. Checked against brute-force sums of the
envelope, against ``T`` built by running the recurrences literally (``reference``), and against NumPy SVDs of
the whole ``T[i:, :i]``; values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import delta_rule_loop, entropy_ess_ref, gated_recurrence_loop, tolerance_ess_ref
from test_delta_gram import CASES, _inputs, check_penalty

import esswatch
import esswatch.operators.delta as delta_mod
from esswatch.engine.envelope import Envelope
from esswatch.ess.near import NEAR_RTOL
from esswatch.operators import DeltaRule, GatedRecurrence

F64 = torch.float64


def _envelope(family, seed, shape=(3,), L=80):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(*shape, L, generator=g, dtype=F64)
    inp = torch.randn(*shape, L, generator=g, dtype=F64)
    if family == "fast":
        step = -2 - 3 * torch.rand(*shape, L, generator=g, dtype=F64)
    elif family == "resets":  # no decay but a few resets, some growth (beta up to 2)
        step = torch.where(torch.rand(*shape, L, generator=g, dtype=F64) < 0.1, -20.0, 0.05).to(F64)
    else:  # "zeros": zero rows and columns (padding), mixed decays
        step = -torch.rand(*shape, L, generator=g, dtype=F64)
        out[..., :9] = -math.inf
        inp[..., 50:60] = -math.inf
    return out, inp, step


def _brute(out, inp, step, i):
    """``log |bound|`` of ``H_i``'s entries, ``batch + (L - i, i)``."""
    G = torch.cumsum(step, -1)
    return out[..., i:, None] + G[..., i:, None] + inp[..., None, :i] - G[..., None, :i]


def _log_sum_sq(m):
    return torch.logsumexp(2 * m.reshape(*m.shape[:-2], -1), -1) if m.numel() else torch.full(m.shape[:-2], -math.inf)


@pytest.mark.parametrize("family", ["fast", "resets", "zeros"])
def test_near_window_leaves_out_at_most_eps_and_is_the_smallest_such_window(family):
    """Against brute-force sums of the envelope's bound over ``H_i``'s entries: what the window leaves out is at
    most ``eps`` (in Frobenius norm) in every batch entry; one row or one column fewer breaks the half budget of
    its side in some entry; ``left_out`` is the two separated sums exactly and bounds the entries left out."""
    env = _envelope(family, seed=1)
    L = env[0].shape[-1]
    e = Envelope(*env)
    for i in (1, 9, 40, 55, 79):
        m = _brute(*env, i)
        total = 0.5 * _log_sum_sq(m)
        for drop in (5.0, 20.0, 60.0):
            log_eps = total - drop
            a, b = e.window(i, log_eps)
            assert 1 <= a <= L - i and 1 <= b <= i
            mask = torch.ones(m.shape[-2:], dtype=torch.bool)
            mask[:a, i - b :] = False
            left = 0.5 * _log_sum_sq(torch.where(mask, m, -math.inf))
            assert (left <= log_eps + 1e-9).all()
            lo = e.left_out(i, a, b)
            # the separated sums: sum_{r >= i+a} x_r sum_c y_c + sum_r x_r sum_{c < i-b} y_c
            G = torch.cumsum(env[2], -1)
            lx = 2 * (env[0][..., i:] + G[..., i:])
            ly = 2 * (env[1][..., :i] - G[..., :i])
            sep = torch.logaddexp(
                torch.logsumexp(lx[..., a:], -1) + torch.logsumexp(ly, -1),
                torch.logsumexp(ly[..., : i - b], -1) + torch.logsumexp(lx, -1),
            )
            assert torch.equal(torch.isinf(lo), torch.isinf(sep))  # -inf: nothing left out
            fin = torch.isfinite(sep)
            np.testing.assert_allclose(torch.exp(lo[fin] - 0.5 * sep[fin]).numpy(), 1.0, rtol=1e-9)
            assert (lo >= left - 1e-9).all()
            # smallest: one row (column) fewer puts that side's sum over half the budget in some entry
            half = 2 * log_eps - math.log(2)
            if a > 1:
                assert (torch.logsumexp(lx[..., a - 1 :], -1) + torch.logsumexp(ly, -1) > half).any()
            if b > 1:
                assert (torch.logsumexp(ly[..., : i - b + 1], -1) + torch.logsumexp(lx, -1) > half).any()
        assert torch.allclose(e.bound_norm(i), total, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", ["fast", "resets", "zeros"])
def test_wider_than_agrees_with_the_window_before_and_after_the_cumulative_sums(family):
    """``wider_than`` decides from a few sums, before the envelope's cumulative ones exist, whether a window
    would be more than ``width`` rows or columns wide. Against ``window`` on a fresh envelope: it never says
    "wider" where the window is not, and it says so wherever the window is wider by more than one row or
    column. ``bound_norm`` from the few sums equals the brute-force total; the cumulative sums are not formed
    by either."""
    env = _envelope(family, seed=2)
    L = env[0].shape[-1]
    decided = 0
    for i in (1, 9, 40, 55, 79):
        total = 0.5 * _log_sum_sq(_brute(*env, i))
        for drop in (0.0, 5.0, 20.0, 60.0, math.inf):
            for width in (1, 3, 10, 30, 70):
                e = Envelope(*env)
                assert torch.allclose(e.bound_norm(i), total, rtol=1e-12, atol=0)
                wider = e.wider_than(i, total - drop, width)
                assert e._rows is None and e._cols is None
                a, b = e.window(i, total - drop)
                if wider:
                    assert a > width or b > width
                elif (i + width + 1 < L and a > width + 1) or (width + 1 < i and b > width + 1):
                    raise AssertionError((i, drop, width, a, b))
                decided += wider
    assert decided > 10  # the check does decide in these families


def _bound_holds(T, env):
    out, inp, step = (x.numpy() for x in env)
    G = np.cumsum(step, -1)
    log_bound = out[..., :, None] + G[..., :, None] + inp[..., None, :] - G[..., None, :]
    causal = np.tril(np.ones(T.shape[-2:], dtype=bool))
    nz = (T != 0) & causal
    assert (np.log(np.abs(np.where(nz, T, 1.0)))[nz] <= log_bound[nz] + 1e-9).all()


@pytest.mark.parametrize("case", CASES)
def test_the_delta_rule_envelope_bounds_every_entry_of_t(case):
    """``|T[r, c]| <= exp(out_r + inp_c + step_{c+1} + ... + step_r)`` on ``T`` from the literal recurrence,
    for inputs nobody tuned it for (``beta`` up to 2 and unnormalized keys grow the state: ``step > g``)."""
    q, k, beta, ld = _inputs(case)
    _bound_holds(delta_rule_loop(q, k, beta, ld), DeltaRule(q, k, beta, ld).envelope())


def test_the_gated_recurrence_envelope_bounds_every_entry_of_t():
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 90, 5, generator=g, dtype=F64) for _ in range(2))
    for ld in (-3 * torch.rand(2, 90, 5, generator=g, dtype=F64), -torch.rand(2, 90, 1, generator=g, dtype=F64)):
        T = np.stack([gated_recurrence_loop(q[b].numpy(), k[b].numpy(), ld[b].numpy()) for b in range(2)])
        _bound_holds(T, GatedRecurrence(q, k, ld).envelope())
    assert GatedRecurrence(q, k, None).envelope() is None  # no decay: nothing is negligible


@pytest.mark.parametrize("case", CASES)
def test_hankel_window_equals_t(case):
    """``DeltaRule.hankel_window`` (two segments' closed forms) equals ``T[i:i+a, i-b:i]`` of the literal
    recurrence, including windows that reach the ends of the sequence."""
    q, k, beta, ld = _inputs(case)
    T = delta_rule_loop(q, k, beta, ld)
    op = DeltaRule(q, k, beta, ld)
    L = q.shape[-2]
    for i, a, b in ((1, 5, 1), (40, 30, 17), (75, 75, 75), (149, 1, 149), (100, 50, 100)):
        got = op.hankel_window(i, a, b)
        assert got.dtype == F64 and got.shape[-2:] == (a, b) and i + a <= L
        ref = T[..., i : i + a, i - b : i]
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def _fast(seed=0, shape=(2, 3), L=300, N=16, slow_head=False, dtype=F64):
    """Fast gates (Qwen3-Next's form with ``A ~ U(4, 16)``: forgotten within a few steps); with ``slow_head``
    one head keeps a long memory (``A = 0.01``)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, L, N, generator=g, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(*shape, L, N, generator=g, dtype=F64), dim=-1)
    beta = torch.rand(*shape, L, generator=g, dtype=F64)
    A = 4 + 12 * torch.rand(shape[-1], 1, generator=g, dtype=F64)
    if slow_head:
        A[0] = 0.01
    ld = -A * torch.nn.functional.softplus(0.5 * torch.randn(*shape, L, generator=g, dtype=F64) + 1)
    return tuple(x.to(dtype) for x in (q, k, beta, ld))


def _fail(*args, **kwargs):
    raise AssertionError("this route must not run")


def test_fast_gates_take_windows_not_the_gramians_nor_t(monkeypatch):
    """With fast gates ``entropy_ess`` takes every index from its window: neither the Gramians nor ``T`` are
    computed, and the values equal NumPy's SVDs of the whole ``T[i:, :i]`` (float64: 1e-9; float32 input:
    1e-5, its own round-off); the gradients equal those of the dense route (``T``, then ``svdvals``)."""
    base = _fast()
    idx = [round(j * 300 / 9) for j in range(1, 9)]
    want = entropy_ess_ref(delta_rule_loop(*base), idx)
    grads = {}
    for est in ("gram", "exact"):
        if est == "gram":
            monkeypatch.setattr(DeltaRule, "gram_spectrum", _fail)
            monkeypatch.setattr(delta_mod, "delta_rule_dense", _fail)
        xs = [x.clone().requires_grad_() for x in base]
        e = esswatch.entropy_ess(DeltaRule(*xs), idx, estimator=est)
        np.testing.assert_allclose(e.detach().numpy(), want, rtol=1e-9)
        e.sum().backward()
        grads[est] = [x.grad for x in xs]
        if est == "gram":
            f32 = esswatch.entropy_ess(DeltaRule(*(x.float() for x in base)), idx)
            assert f32.dtype == torch.float32
            np.testing.assert_allclose(f32.numpy(), want, rtol=1e-5)
            monkeypatch.undo()
    for a, b in zip(grads["gram"], grads["exact"]):
        assert torch.isfinite(a).all()
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9 * b.abs().max().item())


def test_a_slow_head_sends_the_call_to_the_gramians_and_windows_take_what_does_not_factor(monkeypatch):
    """One long-memory head makes the windows too wide, so the Gramians run; with gradients the fast heads,
    whose Gramians do not factor, take their windows (no ``T``). Values equal NumPy's, gradients the dense
    route's."""
    base = _fast(slow_head=True)
    idx = [60, 150, 240]
    want = entropy_ess_ref(delta_rule_loop(*base), idx)
    calls = []
    spectrum = DeltaRule.gram_spectrum

    def spy(self, indices):
        out = spectrum(self, indices)
        calls.append((~out[1]).sum().item())
        return out

    monkeypatch.setattr(DeltaRule, "gram_spectrum", spy)
    monkeypatch.setattr(delta_mod, "delta_rule_dense", _fail)
    xs = [x.clone().requires_grad_() for x in base]
    e = esswatch.entropy_ess(DeltaRule(*xs), idx, estimator="gram")
    assert len(calls) == 1 and calls[0] > 0  # the Gramians ran, and some entries did not factor
    np.testing.assert_allclose(e.detach().numpy(), want, rtol=1e-9)
    e.sum().backward()
    monkeypatch.undo()
    ys = [x.clone().requires_grad_() for x in base]
    esswatch.entropy_ess(DeltaRule(*ys), idx, estimator="exact").sum().backward()
    for a, b in zip(xs, ys):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-6, atol=1e-9 * b.grad.abs().max().item())


def test_gated_recurrence_fast_decays_take_windows(monkeypatch):
    """A diagonal recurrence (GLA-like per-channel gates) that forgets within a few steps: windows, values equal
    NumPy's (the Gramians are not computed)."""
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 200, 8, generator=g, dtype=F64) for _ in range(2))
    ld = -3 - 5 * torch.rand(2, 200, 8, generator=g, dtype=F64)
    T = np.stack([gated_recurrence_loop(q[b].numpy(), k[b].numpy(), ld[b].numpy()) for b in range(2)])
    monkeypatch.setattr(GatedRecurrence, "gram_spectrum", _fail)
    idx = [30, 100, 170]
    got = esswatch.entropy_ess(GatedRecurrence(q, k, ld), idx, estimator="gram")
    np.testing.assert_allclose(got.numpy(), entropy_ess_ref(T, idx), rtol=1e-9)


def test_the_window_is_within_near_rtol_of_the_whole_block():
    """Every singular value of the window is within ``NEAR_RTOL ||H_i||_F`` of NumPy's for the whole
    ``T[i:, :i]`` (Weyl's bound on what the window leaves out), on fast gates in float64."""
    from esswatch.ess.near import envelope_of, near_values

    q, k, beta, ld = _fast(seed=7, shape=(2,), L=240, N=8)
    T = delta_rule_loop(q, k, beta, ld)
    op = DeltaRule(q, k, beta, ld)
    got = near_values(op, envelope_of(op), [50, 120, 200])
    assert sorted(got) == [50, 120, 200]
    for i, sv in got.items():
        ref = np.linalg.svd(T[..., i:, :i], compute_uv=False)[..., :8]
        fro = np.linalg.norm(T[..., i:, :i], axis=(-2, -1))
        assert (np.abs(sv.numpy() - ref) <= 2 * NEAR_RTOL * fro[..., None] + 1e-15 * fro[..., None]).all()


def test_the_regularizer_on_fast_gates_builds_neither_t_nor_the_gramians(monkeypatch):
    """The ESS penalty of a fast-forgetting ``DeltaRule`` layer (what Qwen3-Next's gates give at
    initialisation): its value follows from NumPy's ESS of the whole blocks, its gradient is finite, and
    neither ``T`` nor the Gramian recurrence is computed (before, ``T`` was built with its autograd graph)."""
    q, k, beta, ld = _fast(seed=9, shape=(2,), L=256, N=16)
    monkeypatch.setattr(DeltaRule, "gram_spectrum", _fail)
    monkeypatch.setattr(delta_mod, "delta_rule_dense", _fail)
    check_penalty(q, k, beta, ld)


def test_short_sequences_take_windows_under_auto(monkeypatch):
    """Below ``GRAM_FROM N`` positions ``auto`` materializes ``T`` (there it beats the Gramians), except where
    the gates forget within a few steps: then every index comes from its window, ``T`` is never built, the
    values equal NumPy's and the gradients the dense route's. One long-memory head sends the call back to
    ``T`` (built once). The regularizer's penalty takes the same route."""
    from esswatch.operators.delta import GRAM_FROM

    base = _fast(L=80, N=16)
    assert base[0].shape[-2] < GRAM_FROM * 16
    idx = [round(j * 80 / 9) for j in range(1, 9)]
    want = entropy_ess_ref(delta_rule_loop(*base), idx)
    monkeypatch.setattr(DeltaRule, "gram_spectrum", _fail)
    monkeypatch.setattr(delta_mod, "delta_rule_dense", _fail)
    xs = [x.clone().requires_grad_() for x in base]
    e = esswatch.entropy_ess(DeltaRule(*xs), idx)
    np.testing.assert_allclose(e.detach().numpy(), want, rtol=1e-9)
    e.sum().backward()
    check_penalty(*_fast(seed=9, shape=(2,), L=80, N=16))
    counts = esswatch.tolerance_ess(DeltaRule(*base), idx, tol=1e-3)
    np.testing.assert_array_equal(counts.numpy(), tolerance_ess_ref(delta_rule_loop(*base), idx, 1e-3, True))
    monkeypatch.undo()
    ys = [x.clone().requires_grad_() for x in base]
    esswatch.entropy_ess(DeltaRule(*ys), idx, estimator="exact").sum().backward()
    for a, b in zip(xs, ys):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-6, atol=1e-9 * b.grad.abs().max().item())
    slow = _fast(L=80, N=16, slow_head=True)
    calls = []
    real = delta_mod.delta_rule_dense
    monkeypatch.setattr(delta_mod, "delta_rule_dense", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = esswatch.entropy_ess(DeltaRule(*slow), idx)
    assert calls == [1]
    np.testing.assert_allclose(got.numpy(), entropy_ess_ref(delta_rule_loop(*slow), idx), rtol=1e-9)
