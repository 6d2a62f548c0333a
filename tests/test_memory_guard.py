"""The memory guard with gradients: the estimate counts the autograd graph of the dense routes (what the
regularizer's penalty holds until its backward pass), and the Gramian route's indices that fall back to ``T``
are checked before ``T`` is built. Limits are set through ``ESSWATCH_MAX_BYTES`` between the estimates, so
each test checks which side of the limit a call lands on; the estimates themselves are measured against real
peaks by ``examples/benchmarks/memory_guard.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import esswatch
import esswatch.operators.delta as delta_mod
from esswatch.engine.memory import ESSMemoryError
from esswatch.ess.guard import call_bytes
from esswatch.operators import Convolution, DeltaRule, GatedRecurrence, SoftmaxAttention
from esswatch.watch.regularizer import Regularizer, penalty_terms

IDX = [40, 100, 160]


def _operands(kind, L=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "attention":
        return SoftmaxAttention, [rnd(2, 3, L, 8), rnd(2, 3, L, 8)]
    if kind == "delta":
        k = torch.nn.functional.normalize(rnd(2, 3, L, 8), dim=-1)
        beta, log_decay = torch.rand(2, 3, L, generator=g), -0.1 * torch.rand(2, 3, L, generator=g)
        return DeltaRule, [rnd(2, 3, L, 8), k, beta, log_decay]
    if kind == "gla":
        return GatedRecurrence, [rnd(2, 3, L, 8), rnd(2, 3, L, 8), -0.1 * torch.rand(2, 3, L, 8, generator=g)]
    return Convolution, [rnd(2, 3, L) / L**0.5]


@pytest.mark.parametrize("kind", ["attention", "delta", "gla", "convolution"])
def test_the_estimate_counts_the_autograd_graph(kind, monkeypatch):
    """With gradients the dense routes keep ``T``'s graph and every block's singular vectors until the backward
    pass: the estimate grows, and a limit between the two estimates lets the call through without gradients
    (the same values as without a limit) and refuses it, before allocating, with them."""
    build, parts = _operands(kind)
    plain = build(*parts)
    leaves = [p.clone().requires_grad_() for p in parts]
    with torch.no_grad():
        free = call_bytes(plain, torch.tensor(IDX), "exact")
        want = esswatch.entropy_ess(plain, IDX, estimator="exact")
    with_grad = call_bytes(build(*leaves), torch.tensor(IDX), "exact")
    assert with_grad > 1.1 * free
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str((free + with_grad) // 2))
    with torch.no_grad():
        assert torch.equal(esswatch.entropy_ess(build(*leaves), IDX, estimator="exact"), want)
    with pytest.raises(ESSMemoryError, match="with gradients"):
        esswatch.entropy_ess(build(*leaves), IDX, estimator="exact")
    # the operands were left untouched (nothing ran backward)
    assert all(x.grad is None for x in leaves)


def test_the_penalty_is_refused_for_that_layer_only(monkeypatch):
    """The regularizer's terms (``penalty_terms``, what ``ESSWatch.penalty()`` runs): a layer whose term would
    exceed the limit with its graph is reported through ``on_error`` and left out; the other layer's term is
    the one computed without a limit."""
    cfg = Regularizer(weight=1.0)
    small = SoftmaxAttention(*[x.requires_grad_() for x in _operands("attention", L=40)[1]])
    large_build, large_parts = _operands("attention", L=400)
    large = large_build(*[x.requires_grad_() for x in large_parts])
    _, free_terms = penalty_terms({"small": small}, cfg)
    small_bytes = call_bytes(small, torch.arange(1, 9) * 4, "exact")
    large_bytes = call_bytes(large, torch.tensor([44, 89, 133, 178, 222, 267, 311, 356]), "exact")
    assert large_bytes > 4 * small_bytes
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str(2 * small_bytes))
    errors = []
    total, terms = penalty_terms({"small": small, "large": large}, cfg, on_error=lambda n, e: errors.append((n, e)))
    assert [n for n, _ in errors] == ["large"] and isinstance(errors[0][1], ESSMemoryError)
    assert "with gradients" in str(errors[0][1])
    assert set(terms) == {"small"} and torch.equal(terms["small"], free_terms["small"])
    total.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (small.q, small.k))


def _rank_one_delta_rule(L=512):
    """Keys and queries along one direction with no decay: both Gramians are singular at every index (they do
    not factor), the envelope does not decay (no window), so with gradients the Gramian route's indices take
    the dense route and build ``T``."""
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(2, L, 4, dtype=torch.float64)
    q[..., 0] = torch.randn(2, L, generator=g, dtype=torch.float64)
    k = torch.zeros(2, L, 4, dtype=torch.float64)
    k[..., 0] = 1.0
    beta = 0.5 * torch.ones(2, L, dtype=torch.float64) + 0.1 * torch.rand(2, L, generator=g, dtype=torch.float64)
    return q, k, beta, torch.zeros(2, L, dtype=torch.float64)


def test_the_dense_fallback_of_the_gramian_route_is_checked_before_t(monkeypatch):
    """The call's check counts the Gramians; the indices that then fall back to ``T`` are checked before it is
    built: with a limit above the Gramians' estimate and below ``T``'s graph, the call is refused and
    ``delta_rule_dense`` never runs. Without the limit the same call builds ``T`` once, and its values are
    rank one's (entropy-ESS 1)."""
    idx = [128, 256, 384]
    x = [t.requires_grad_() for t in _rank_one_delta_rule()]
    op = DeltaRule(*x)
    gram = op.gram_bytes(len(idx), grad=True)
    dense = op.materialize_bytes(idx, grad=True)
    assert dense > 2 * gram
    calls = []
    real = delta_mod.delta_rule_dense
    monkeypatch.setattr(delta_mod, "delta_rule_dense", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    e = esswatch.entropy_ess(op, idx, estimator="gram")
    assert calls == [1]
    np.testing.assert_allclose(e.detach().numpy(), 1.0, rtol=1e-9)
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str(2 * gram))
    with pytest.raises(ESSMemoryError, match="do not factor"):
        esswatch.entropy_ess(DeltaRule(*x), idx, estimator="gram")
    assert calls == [1]
    with torch.no_grad():  # without gradients the square-root route resolves them: no T, no refusal
        np.testing.assert_allclose(esswatch.entropy_ess(DeltaRule(*x), idx).numpy(), 1.0, rtol=1e-9)
    assert calls == [1]


def test_the_fallback_check_counts_the_gramian_graph_it_runs_beside(monkeypatch):
    """With gradients the Gramian route's graph stays alive until the backward pass, so the indices that fall
    back to ``T`` are checked with it: a limit above the call's own estimate and above the fallback's blocks
    alone, but below the two together, refuses the call before ``T`` is built."""
    from esswatch.ess.guard import _blocks_bytes

    idx = [128, 256, 384]
    op = DeltaRule(*[t.requires_grad_() for t in _rank_one_delta_rule()])
    gram = op.gram_bytes(len(idx), grad=True)
    fallback = _blocks_bytes(op, idx, True, sketch=False)
    limit = fallback + gram // 2
    assert limit > max(gram, fallback, call_bytes(op, torch.tensor(idx), "gram"))
    calls = []
    real = delta_mod.delta_rule_dense
    monkeypatch.setattr(delta_mod, "delta_rule_dense", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str(limit))
    with pytest.raises(ESSMemoryError, match="do not factor"):
        esswatch.entropy_ess(op, idx, estimator="gram")
    assert calls == []
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str(fallback + gram + 1))
    np.testing.assert_allclose(esswatch.entropy_ess(op, idx, estimator="gram").detach().numpy(), 1.0, rtol=1e-9)
    assert calls == [1]


def test_a_sliding_window_is_counted_by_its_blocks_not_t(monkeypatch):
    """With a window ``T`` is never built (each block comes from its rows' scores), so the estimate follows the
    window, not ``L``: a limit of a quarter of ``T``'s size lets the call through, with and without gradients,
    and with the values of the call without a limit; without the window the same limit refuses the call."""
    g = torch.Generator().manual_seed(1)
    L, idx = 2048, [500, 1000, 1500]
    q, k = torch.randn(2, 2, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g)
    op = SoftmaxAttention(q, k, window=64)
    free = esswatch.entropy_ess(op, idx)
    t_bytes = 4 * L * L * 4  # T of the 4 matrices in float32: 67 MB
    assert call_bytes(op, torch.tensor(idx), "auto") < t_bytes / 20
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    assert call_bytes(SoftmaxAttention(*leaves, window=64), torch.tensor(idx), "exact") < t_bytes / 4
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str(t_bytes // 4))
    assert torch.equal(esswatch.entropy_ess(op, idx), free)
    e = esswatch.entropy_ess(SoftmaxAttention(*leaves, window=64), idx, estimator="exact")
    np.testing.assert_allclose(e.detach().numpy(), free.numpy(), rtol=1e-5)
    e.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    with pytest.raises(ESSMemoryError):
        esswatch.entropy_ess(SoftmaxAttention(q, k), idx)


def test_a_short_kernel_is_counted_by_its_blocks_not_t(monkeypatch):
    """A convolution whose kernel is shorter than the sequence cuts each block from its taps (``T`` is never
    built), so its estimate follows the kernel, not ``L``: a limit of a quarter of ``T``'s size lets the call
    through, with and without gradients, with NumPy's entropy-ESS of the Toeplitz ``T`` and the gradient of the
    dense route (whole blocks of ``T``, before the limit is set); a kernel as long as the sequence is refused by
    the same limit."""
    from reference import entropy_ess_ref

    g = torch.Generator().manual_seed(2)
    L, K, idx = 2048, 64, [500, 1000, 1500]
    h = torch.nn.functional.pad(torch.randn(2, 2, K, generator=g), (0, L - K))
    lag = np.subtract.outer(np.arange(L), np.arange(L))
    T = np.where(lag >= 0, h.double().numpy()[..., np.clip(lag, 0, None)], 0.0)
    want = entropy_ess_ref(T, idx)
    t_bytes = 4 * L * L * 4  # T of the 4 matrices in float32: 67 MB
    assert call_bytes(Convolution(h), torch.tensor(idx), "exact") < t_bytes / 20
    # the gradient through the whole blocks of the dense T (no trimming, no limit yet)
    ref_leaf = h.clone().requires_grad_()
    lag_t = torch.as_tensor(lag)
    dense_t = torch.where(lag_t >= 0, ref_leaf[..., lag_t.clamp(min=0)], torch.zeros(()))
    esswatch.entropy_ess(esswatch.operators.Dense(dense_t), idx, estimator="exact").sum().backward()
    leaf = h.clone().requires_grad_()
    assert call_bytes(Convolution(leaf), torch.tensor(idx), "exact") < t_bytes / 10
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", str(t_bytes // 4))
    np.testing.assert_allclose(esswatch.entropy_ess(Convolution(h), idx, estimator="exact").numpy(), want, rtol=1e-5)
    e = esswatch.entropy_ess(Convolution(leaf), idx, estimator="exact")
    np.testing.assert_allclose(e.detach().numpy(), want, rtol=1e-5)
    e.sum().backward()
    np.testing.assert_allclose(leaf.grad.numpy(), ref_leaf.grad.numpy(), atol=1e-4 * float(ref_leaf.grad.abs().max()))
    with pytest.raises(ESSMemoryError):
        esswatch.entropy_ess(Convolution(torch.randn(2, 2, L, generator=g)), idx, estimator="exact")


def test_exact_blocks_in_chunks_give_the_same_values_and_a_bounded_estimate(monkeypatch):
    """Without gradients the exact route builds and decomposes a call's blocks in chunks of
    EXACT_CHUNK_BYTES (a window's thousands of equal blocks held every score buffer at once: 6.7 GB at
    L = 4096 in a review's measurement, 0.8 GB in chunks). Chunks of one index give the values of one
    chunk, equal to NumPy; the windowed estimate stops growing with the indices beyond one chunk."""
    from reference import entropy_ess_ref

    import esswatch.ess.plan as plan
    from esswatch import entropy_ess
    from esswatch.operators import SoftmaxAttention

    g = torch.Generator().manual_seed(0)
    op = SoftmaxAttention(torch.randn(2, 96, 8, generator=g), torch.randn(2, 96, 8, generator=g), window=16)
    whole = entropy_ess(op, None, estimator="exact")
    monkeypatch.setattr(plan, "EXACT_CHUNK_BYTES", 1)
    assert [len(c) for c in plan._chunks(op, list(range(1, 96)))] == [1] * 95
    chunked = entropy_ess(op, None, estimator="exact")
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)  # round-off: one matrix per LAPACK call
    np.testing.assert_allclose(chunked.numpy(), entropy_ess_ref(op.dense().double().numpy(), range(1, 96)), rtol=1e-5)
    big = SoftmaxAttention(torch.randn(2, 4096, 8), torch.randn(2, 4096, 8), window=128)
    assert big.materialize_bytes(range(1, 4096), grad=False) == big.materialize_bytes(range(1, 2048), grad=False)
    assert big.materialize_bytes(range(1, 4096), grad=True) > 1.9 * big.materialize_bytes(range(1, 2048), grad=True)
