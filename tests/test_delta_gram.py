"""The gated delta rule's Gramians (``esswatch.engine.delta_gram``) against NumPy SVDs of ``T`` built by running
the recurrence literally (``reference.delta_rule_loop``), on inputs nobody tuned the segments for: random
initialisation, ``beta`` up to 2, unnormalized keys, decays that reset the state, no decay, left padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import delta_rule_loop, entropy_ess_ref

import esswatch
from esswatch.engine.delta_gram import delta_gram_squared_singular_values, delta_gramians
from esswatch.engine.gram import gramian_squared_singular_values
from esswatch.operators import DeltaRule

F64 = torch.float64


def _inputs(case, seed=0, shape=(2, 3), L=150, N=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, L, N, generator=g, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(*shape, L, N, generator=g, dtype=F64), dim=-1)
    beta = torch.rand(*shape, L, generator=g, dtype=F64)
    ld = -0.2 * torch.rand(*shape, L, generator=g, dtype=F64)
    if case == "beta up to 2":  # DeltaNet's negative-eigenvalue variant: I - beta k k^T reflects
        beta = 2 * beta
    elif case == "unnormalized keys":
        k = 0.7 * torch.randn(*shape, L, N, generator=g, dtype=F64)
    elif case == "resets and no decay":  # exp(-30) ~ 1e-13: the state is all but erased at a few steps
        ld = torch.where(torch.rand(*shape, L, generator=g, dtype=F64) < 0.03, -30.0, 0.0).to(F64)
    elif case == "fast gates":  # Qwen3-Next's gate at initialisation: g = -A softplus(a + 1), A ~ U(0, 16) per head
        A = 16 * torch.rand(*shape[:-1], shape[-1], 1, generator=g, dtype=F64)
        ld = -A * torch.nn.functional.softplus(0.5 * torch.randn(*shape, L, generator=g, dtype=F64) + 1)
    elif case == "no decay":
        ld = torch.zeros_like(ld)
    elif case == "left padding":  # what a padded batch row gives: q = k = 0, beta = sigmoid(0), the gate's bias
        q, k = q.clone(), k.clone()
        q[..., :17, :] = 0
        k[..., :17, :] = 0
        beta = beta.clone()
        beta[..., :17] = 0.5
    return q, k, beta, ld


CASES = ["random", "beta up to 2", "unnormalized keys", "resets and no decay", "fast gates", "no decay", "left padding"]


@pytest.mark.parametrize("segment", [64, 7])
@pytest.mark.parametrize("case", CASES)
def test_gramians_give_numpy_singular_values_at_every_index(case, segment):
    """Every index of an L = 150 sequence (segments of 64 end mid-sequence; segments of 7 put boundaries
    everywhere): the squared singular values from the Gramians equal NumPy's of ``T[i:, :i]`` to the
    round-off of an eigenproblem of ``P Q`` in float64, ``1e-9 s_1^2 + 1e-13 ||P|| ||Q||`` (the second term
    matters where fast gates make ``s_1^2`` much smaller than ``||P|| ||Q||``), wherever they are resolved."""
    q, k, beta, ld = _inputs(case)
    T = delta_rule_loop(q, k, beta, ld)
    L, N = q.shape[-2:]
    idx = torch.arange(1, L)
    P, Q = delta_gramians(q, k, beta, ld, idx, segment=segment)
    lam, ok, fro2 = gramian_squared_singular_values(P, Q)
    if case not in ("resets and no decay", "fast gates"):  # an erased state leaves both Gramians singular
        assert ok[..., N : L - N].all()  # elsewhere one of them factors away from the ends (padding: Q does)
    checked = 0
    for j, i in enumerate(idx.tolist()):
        s = np.linalg.svd(T[..., i:, :i], compute_uv=False)  # batch + (min(i, L - i),)
        top = s[..., :1] ** 2
        np.testing.assert_allclose(fro2[..., j].numpy(), (s**2).sum(-1), rtol=1e-9, atol=1e-12 * top.max())
        m = min(N, s.shape[-1])
        got = lam[..., j, :m].numpy()
        good = ok[..., j].numpy()
        floor = 1e-13 * (
            np.linalg.norm(P[..., j, :, :], 2, axis=(-2, -1)) * np.linalg.norm(Q[..., j, :, :], 2, axis=(-2, -1))
        )
        bound = 1e-9 * top + floor[..., None]
        assert (np.abs(got - s[..., :m] ** 2) <= bound)[good].all(), (i, (np.abs(got - s[..., :m] ** 2) / bound).max())
        assert (lam[..., j, m:].numpy() <= bound[..., :1])[good].all()  # rank min(i, L - i, N)
        checked += int(good.sum())
    assert checked >= 0.8 * ok.numel()
    # near the ends, the spectrum from the explicit factor: exactly min(i, L - i) values, NumPy's
    lam2, ok2, _ = delta_gram_squared_singular_values(q, k, beta, ld, idx, segment=segment)
    for j, i in enumerate(idx.tolist()):
        m = min(i, L - i)
        if m >= N:
            continue
        assert ok2[..., j].all() and (lam2[..., j, m:] == 0).all()
        s = np.linalg.svd(T[..., i:, :i], compute_uv=False)
        err = np.abs(lam2[..., j, :m].numpy() - s**2) / np.maximum(s[..., :1] ** 2, 1e-300)
        assert (err < 1e-10).all(), (i, err.max())


@pytest.mark.parametrize("case", CASES)
def test_entropy_ess_by_gram_equals_numpy(case):
    """``entropy_ess`` (``auto`` = ``gram``; the indices below ``N`` from each end and unresolved ones go to
    the dense SVD) equals NumPy SVDs of the literal recurrence's ``T``, and the exact (dense) route."""
    q, k, beta, ld = _inputs(case, seed=1)
    op = DeltaRule(q, k, beta, ld)
    T = delta_rule_loop(q, k, beta, ld)
    idx = [1, 3, 6, 17, 23, 63, 64, 65, 100, 128, 143, 146, 149]
    ref = entropy_ess_ref(T, idx)
    # gram: squares resolve singular values down to about 1e-8 s_1 in float64 (entropy-ESS within 1e-6)
    for est, rtol in (("auto", 1e-6), ("gram", 1e-6), ("exact", 1e-9)):
        np.testing.assert_allclose(esswatch.entropy_ess(op, idx, estimator=est).numpy(), ref, rtol=rtol, err_msg=est)
    tol = esswatch.tolerance_ess(op, idx, tol=1e-3, estimator="gram").numpy()
    np.testing.assert_array_equal(tol, esswatch.tolerance_ess(op, idx, tol=1e-3, estimator="exact").numpy())


def test_gram_never_materializes_t_not_even_at_the_ends(monkeypatch):
    """No index builds ``T`` (``delta_rule_dense`` is never called): near the ends (``min(i, L - i) < N``) the
    spectrum comes from the explicit factor and the other Gramian. float32 input: float64 Gramians, float32
    results within 1e-5 of NumPy's. A state erased on both sides of an index (both Gramians singular) still
    gives NumPy's value, by whichever route."""
    import esswatch.operators.delta as delta

    calls = []
    real = delta.delta_rule_dense
    monkeypatch.setattr(delta, "delta_rule_dense", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, beta, ld = (x.float() for x in _inputs("random", seed=2, L=300, N=16))
    idx = [1, 3, 15, 16, 40, 150, 284, 285, 297, 299]
    got = esswatch.entropy_ess(DeltaRule(q, k, beta, ld), idx)
    assert calls == [] and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), entropy_ess_ref(delta_rule_loop(q, k, beta, ld), idx), rtol=1e-5)
    # a short sequence (L < GRAM_FROM * N): auto materializes T, as fast or faster there
    from esswatch.operators.delta import GRAM_FROM

    short = [
        x[..., : GRAM_FROM * 16 - 1, :] if x.dim() == 4 else x[..., : GRAM_FROM * 16 - 1] for x in (q, k, beta, ld)
    ]
    got = esswatch.entropy_ess(DeltaRule(*short), [40])
    assert calls == [1]
    np.testing.assert_allclose(got.numpy(), entropy_ess_ref(delta_rule_loop(*short), [40]), rtol=1e-5)
    ld = ld.clone()
    ld[..., [140, 160]] = -1000.0  # rank of H_150 at most 10 < N, from either side
    got = esswatch.entropy_ess(DeltaRule(q, k, beta, ld), [150])
    np.testing.assert_allclose(got.numpy(), entropy_ess_ref(delta_rule_loop(q, k, beta, ld), [150]), rtol=1e-5)


def test_gram_gradients_equal_the_exact_routes():
    """The Gramian route is differentiable and its gradients with respect to ``q, k, beta, g`` equal those
    of the dense route (``delta_rule_dense`` then ``svdvals``), including at a segment boundary."""
    base = _inputs("random", seed=3, shape=(2,), L=80, N=4)
    idx = [10, 64, 70]
    grads = {}
    for est in ("gram", "exact"):
        xs = [x.clone().requires_grad_() for x in base]
        esswatch.entropy_ess(DeltaRule(*xs), idx, estimator=est).sum().backward()
        grads[est] = [x.grad for x in xs]
    for a, b in zip(grads["gram"], grads["exact"]):
        assert torch.isfinite(a).all()
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)


def test_the_regularizer_takes_the_gram_route_on_a_delta_rule():
    """The ESS penalty of a ``DeltaRule`` layer: its value follows from NumPy's ESS, and its gradient is
    finite (it runs through the Gramians: no ``T`` in the graph)."""
    q, k, beta, ld = _inputs("random", seed=4, shape=(2,), L=96, N=4)
    check_penalty(q, k, beta, ld)


def check_penalty(q, k, beta, ld):
    """The collapse penalty (floor 0.99) of one ``DeltaRule`` layer equals NumPy's from the literal recurrence,
    and its gradient with respect to ``q`` is finite and not zero."""
    from esswatch.watch.regularizer import Regularizer, penalty_terms, spread_indices

    L, N = q.shape[-2:]
    q.requires_grad_()
    cfg = Regularizer(weight=1.0, floor=0.99)
    total, terms = penalty_terms({"layer": DeltaRule(q, k, beta, ld)}, cfg)
    idx = spread_indices(L, cfg.indices).tolist()
    u = entropy_ess_ref(delta_rule_loop(q, k, beta, ld), idx) / np.minimum(np.minimum(idx, L - np.array(idx)), N)
    np.testing.assert_allclose(terms["layer"].item(), (np.maximum(0.99 - u, 0) ** 2).mean() / 0.99**2, rtol=1e-9)
    total.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gram_on_cuda_matches_numpy():
    """The Gramian route on a CUDA device (the segments' products and solves, the square-root route of fast
    gates): results on the device, equal to NumPy's."""
    for case in ("random", "fast gates"):
        q, k, beta, ld = _inputs(case, seed=5, L=200, N=16)
        idx = [3, 50, 100, 150, 197]
        got = esswatch.entropy_ess(DeltaRule(q, k, beta, ld).to(device="cuda"), idx, estimator="gram")
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), entropy_ess_ref(delta_rule_loop(q, k, beta, ld), idx), rtol=1e-6)


def test_the_memory_guard_counts_the_gramians_not_t(monkeypatch):
    """With a limit (``ESSWATCH_MAX_BYTES``) below ``T``'s size but above the Gramians' buffers, the Gramian
    route runs (the same values as without a limit) and the dense route is refused before allocating."""
    from esswatch.engine.memory import ESSMemoryError

    q, k, beta, ld = (x.float() for x in _inputs("random", seed=6, shape=(2, 8), L=1024, N=16))
    op, idx = DeltaRule(q, k, beta, ld), [100, 500, 900]
    free = esswatch.entropy_ess(op, idx)
    assert 16 * 1024 * 1024 * 4 > 40e6 > op.gram_bytes(len(idx))  # T alone is 67 MB
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", "40e6")
    assert torch.equal(esswatch.entropy_ess(op, idx), free)
    with pytest.raises(ESSMemoryError, match="DeltaRule"):
        esswatch.entropy_ess(op, idx, estimator="exact")


@pytest.mark.parametrize("grad", [False, True])
def test_gramians_at_repeated_and_unsorted_indices_follow_the_given_order(grad):
    """Regression (review of this release): the Gramian stacks, now written in place, left a repeated index's
    other slots unwritten (uninitialised memory, silently wrong singular values), and with a graph the stack came
    in sorted order. Every slot now holds its own index's Gramians, in the order given, with and without a graph:
    the same matrices as one call per index."""
    q, k, beta, ld = (x.requires_grad_(grad) for x in _inputs("random"))
    idx = [90, 10, 10, 140, 45]
    with torch.set_grad_enabled(grad):
        P, Q = delta_gramians(q, k, beta, ld, torch.tensor(idx))
        for j, i in enumerate(idx):
            p1, q1 = delta_gramians(q, k, beta, ld, torch.tensor([i]))
            torch.testing.assert_close(P[..., j, :, :], p1[..., 0, :, :], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(Q[..., j, :, :], q1[..., 0, :, :], rtol=1e-12, atol=1e-12)
