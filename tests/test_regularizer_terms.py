"""The regularizer's penalty: values against independent formulas, gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import entropy_ess_ref

import esswatch as ew
from esswatch.layers import SequenceModel
from esswatch.watch.regularizer import Regularizer, penalty_terms, spread_indices


def _penalty(model, tokens, cfg):
    with ew.capture(model, keep_graph=True) as cap:
        model(tokens)
    total, terms = penalty_terms(cap.operators, cfg)
    return total, terms, cap


@pytest.mark.parametrize("mixer", ["gla", "attention", "ssm"])
def test_penalty_value_matches_numpy_formula(mixer):
    torch.manual_seed(0)
    model = SequenceModel(32, d_model=16, n_layers=2, mixer=mixer, **({"d_state": 4} if mixer == "ssm" else {}))
    tokens = torch.randint(0, 32, (2, 24))
    for cfg in (Regularizer(0.3), Regularizer(0.3, mode="target", target=0.4)):
        total, terms, cap = _penalty(model, tokens, cfg)
        idx = spread_indices(24, cfg.indices)
        expect = []
        for name, op in cap.operators.items():
            ess = entropy_ess_ref(op.dense().detach().double().numpy(), idx.tolist())
            tss = op.tss(idx).numpy()
            u = ess / tss
            t = (
                ((u - cfg.target) ** 2).mean()
                if cfg.mode == "target"
                else (np.maximum(cfg.floor - u, 0) ** 2).mean() / cfg.floor**2
            )
            np.testing.assert_allclose(float(terms[name].detach()), t, rtol=1e-4, atol=1e-7)
            expect.append(t)
        np.testing.assert_allclose(float(total.detach()), 0.3 * np.mean(expect), rtol=1e-4, atol=1e-7)


def test_identity_penalty_matches_formula():
    torch.manual_seed(0)
    model = SequenceModel(32, d_model=16, n_layers=1, mixer="gla")
    tokens = torch.randint(0, 32, (2, 12))
    total, terms, cap = _penalty(model, tokens, Regularizer(2.0, kind="identity"))
    (op,) = cap.operators.values()
    a = np.exp(op.log_decay.detach().double().numpy())
    ref = np.sqrt(((a - 1) ** 2).sum(-1)).mean()
    np.testing.assert_allclose(float(total.detach()), 2.0 * ref, rtol=1e-5)


@pytest.mark.parametrize(
    "mixer,cfg",
    [
        ("gla", Regularizer(1.0, floor=1.0)),
        ("gla", Regularizer(1.0, mode="target", target=0.2)),
        ("attention", Regularizer(1.0, mode="target", target=0.1)),
        ("gla", Regularizer(1.0, kind="identity")),
    ],
)
def test_penalty_gradient_matches_finite_differences(mixer, cfg):
    torch.manual_seed(1)
    model = SequenceModel(16, d_model=8, n_layers=1, mixer=mixer, n_heads=2).double()
    tokens = torch.randint(0, 16, (1, 12))
    total, _, _ = _penalty(model, tokens, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction) if gr is not None)
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = float(_penalty(model, tokens, cfg)[0])
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = float(_penalty(model, tokens, cfg)[0])
        for p, d in zip(params, direction):
            p.add_(eps * d)
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-8
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-9)
    assert all(torch.isfinite(gr).all() for gr in grads if gr is not None)


def test_config_validation():
    for bad in (
        dict(weight=-1),
        dict(weight=1, kind="x"),
        dict(weight=1, mode="y"),
        dict(weight=1, mode="target"),
        dict(weight=1, every_n_steps=0),
        dict(weight=1, floor=0),
    ):
        with pytest.raises(ValueError):
            Regularizer(**bad)


def test_penalty_gradient_is_finite_for_small_linear_attention():
    """Regression: with a 1-layer, d_model 8, 2-head linear attention (key width 4, L = 10) the
    Gramian of some batch entries cannot be Cholesky-factored; the backward of that failed
    factorization (discarded by torch.where) still poisoned the gradient with NaN."""
    import warnings

    import esswatch
    from esswatch.layers import SequenceModel

    warnings.simplefilter("ignore")
    for seed in (1, 2, 3, 4):
        torch.manual_seed(seed)
        model = SequenceModel(11, d_model=8, n_layers=1, mixer="linear_attention", n_heads=2)
        x = torch.randint(0, 11, (4, 10))
        watch = esswatch.ESSWatch(
            model, probe_batch=x, indices=[5], every_n_steps=1, regularizer=esswatch.Regularizer(0.1, indices=4)
        )
        model.train()
        out = model(x)
        pen = watch.penalty()
        assert isinstance(pen, torch.Tensor) and torch.isfinite(pen)
        (out.float().mean() + pen).backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (seed, name)
        watch.close()


def test_gram_gradient_finite_where_one_gramian_cannot_be_factored():
    """Engine level: one head's keys are all equal (P_i of rank 1: no Cholesky), the other's are
    random. Values equal the exact SVD's, and the gradient is finite and, for the healthy head,
    equal to the exact estimator's gradient."""
    from esswatch import entropy_ess
    from esswatch.operators import GatedRecurrence

    torch.manual_seed(0)
    L, N = 12, 4
    q = torch.randn(2, L, N, dtype=torch.float64)
    k = torch.randn(2, L, N, dtype=torch.float64)
    k[0] = k[0, :1].expand(L, N)  # head 0: rank-1 past
    grads = {}
    for est in ("gram", "exact"):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        e = entropy_ess(GatedRecurrence(qq, kk), [6], estimator=est)
        e.sum().backward()
        grads[est] = (e.detach(), qq.grad, kk.grad)
    eg, qg, kg = grads["gram"]
    ee, qe, ke = grads["exact"]
    assert torch.allclose(eg, ee, rtol=1e-6)
    assert torch.isfinite(qg).all() and torch.isfinite(kg).all()
    assert torch.allclose(qg[1], qe[1], rtol=1e-5, atol=1e-8) and torch.allclose(kg[1], ke[1], rtol=1e-5, atol=1e-8)
