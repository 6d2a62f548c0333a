"""ESSWatch(regularizer=...): the one-flag ESS penalty in a plain training loop."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from spawned import run_rank

import esswatch as ew
from esswatch.layers import SequenceModel
from esswatch.watch.regularizer import Regularizer, penalty_terms

VOCAB, L, B = 16, 16, 4


def _model(mixer="gla", seed=0, **kw):
    torch.manual_seed(seed)
    return SequenceModel(VOCAB, d_model=16, n_layers=2, mixer=mixer, n_heads=2, **kw)


def _batches(n, seed=1, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, L), generator=g) for _ in range(n)]


def _train(model, batches, watch=None, penalty=True, accumulate=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pens = []
    for j, x in enumerate(batches):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        if watch is not None and penalty:
            p = watch.penalty()
            pens.append(p)
            loss = loss + p
        (loss / accumulate).backward()
        if (j + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
            if watch is not None:
                watch.step()
    return pens


def test_flag_off_is_exactly_zero_and_training_bit_identical():
    batches = _batches(6)
    ref = _model()
    _train(ref, batches)
    for reg in (None, 0, 0.0):
        model = _model()
        with ew.ESSWatch(model, every_n_steps=2, regularizer=reg) as watch:
            pens = _train(model, batches, watch)
        assert all(type(p) is float and p == 0.0 for p in pens)
        for a, b in zip(ref.parameters(), model.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mixer", ["gla", "attention"])
def test_penalty_value_equals_independent_computation(mixer):
    model = _model(mixer)
    (x,) = _batches(1)
    watch = ew.ESSWatch(model, every_n_steps=1000, regularizer=0.5, batch_rows=2)
    out = model(x)
    pen = watch.penalty()
    assert isinstance(pen, torch.Tensor) and pen.requires_grad and pen.dim() == 0
    watch.close()
    # independently: capture the same rows with the graph kept and apply the documented formula
    with ew.capture(model, batch_rows=2, keep_graph=True) as cap:
        out2 = model(x)
    assert torch.equal(out, out2)
    ref, _ = penalty_terms(cap.operators, Regularizer(0.5))
    assert float(pen.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert float(pen.detach()) > 0


@pytest.mark.parametrize("cut", [dict(heads=1), dict(budget_seconds=1e-6)])
def test_the_penalty_ignores_what_the_measurement_cuts(cut):
    """Regression: heads= and a budget's cut (1 row, 1 head) also cut the regularizer's records, so the
    penalty changed and every head but the first got no gradient. The penalty is now that of the kept rows
    and every head (independent computation), while the measurement on the same step keeps its cut."""
    model = _model("attention")
    x, x2 = _batches(2)
    watch = ew.ESSWatch(model, every_n_steps=1, regularizer=0.5, batch_rows=2, **cut)
    model(x)
    watch.penalty()
    watch.step()  # a budget decides here
    model(x2)
    pen = watch.penalty()
    res = watch.step()
    watch.close()
    with ew.capture(model, batch_rows=2, keep_graph=True) as cap:
        model(x2)
    ref, _ = penalty_terms(cap.operators, Regularizer(0.5))
    assert float(pen.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    grads = torch.autograd.grad(pen, [model.blocks[0].mixer.qkv.weight])[0]
    d = 16 // 2  # rows of the q projection per head
    assert all(float(grads[h * d : (h + 1) * d].abs().sum()) > 0 for h in range(2))  # both heads
    with ew.ESSWatch(model, every_n_steps=1, batch_rows=2, **cut) as plain:  # the same cut, no regularizer
        model(x)
        plain.step()
        model(x2)
        want = plain.step()
    for name, lay in res["layers"].items():
        assert lay["heads"] == want["layers"][name]["heads"] == 1 and lay["rows"] == want["layers"][name]["rows"]
        np.testing.assert_allclose(lay["entropy"]["per_index"], want["layers"][name]["entropy"]["per_index"], rtol=1e-6)
    assert watch.config()["regularizer"]["weight"] == 0.5  # the config text names it


def test_penalty_changes_gradients_and_is_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batches = _batches(4)
    base, reg = _model(), _model()
    _train(base, batches[:1])
    watch = ew.ESSWatch(reg, logdir=str(tmp_path), every_n_steps=2, regularizer=1.0)
    pens = _train(reg, batches, watch)
    watch.close()
    assert all(isinstance(p, torch.Tensor) and torch.isfinite(p) for p in pens)
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert "ess/penalty/total" in tags
    assert {"ess/penalty/blocks.0.mixer", "ess/penalty/blocks.1.mixer"} <= set(tags)
    logged = {e.step: e.value for e in ea.Scalars("ess/penalty/total")}
    assert sorted(logged) == [0, 2]
    assert logged[0] == pytest.approx(float(pens[0]), rel=1e-5)
    assert logged[2] == pytest.approx(float(pens[2]), rel=1e-5)
    # the regularized run moved differently from the plain run after one step
    plain = _model()
    _train(plain, batches[:1])
    regone = _model()
    w1 = ew.ESSWatch(regone, every_n_steps=100, regularizer=1.0)
    _train(regone, batches[:1], w1)
    w1.close()
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), regone.parameters()))


def test_penalty_on_the_last_micro_batch_only_penalizes_that_forward():
    """Regression: with gradient accumulation and penalty() called on the last micro-batch only, the penalty
    was built from the first micro-batch's record, whose graph its own backward had freed: a RuntimeError in
    training. It is now the term of the forward that just ran (independent computation)."""
    model = _model("gla")
    x0, x1 = _batches(2)
    watch = ew.ESSWatch(model, every_n_steps=10, regularizer=0.5, batch_rows=2)
    F.cross_entropy(model(x0).flatten(0, 1), x0.flatten()).backward()  # micro-batch 0: no penalty
    loss = F.cross_entropy(model(x1).flatten(0, 1), x1.flatten())
    pen = watch.penalty()
    (loss + pen).backward()  # raised before
    watch.step()
    watch.close()
    with ew.capture(model, batch_rows=2, keep_graph=True) as cap:
        model(x1)
    ref, _ = penalty_terms(cap.operators, Regularizer(0.5))
    assert float(pen.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)


def test_every_k_steps_and_identity_kind():
    model = _model()
    watch = ew.ESSWatch(model, every_n_steps=100, regularizer=ew.Regularizer(0.3, kind="identity", every_n_steps=2))
    pens = _train(model, _batches(4), watch)
    watch.close()
    assert [type(p) is float for p in pens] == [False, True, False, True]
    assert all(float(p) > 0 for p in pens[::2])


def test_gradient_accumulation_penalizes_each_micro_batch():
    model = _model()
    batches = _batches(4, batch=2)
    watch = ew.ESSWatch(model, every_n_steps=1, regularizer=1.0, batch_rows=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays fixed, compare values
    values = []
    for j, x in enumerate(batches):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        p = watch.penalty()
        values.append(float(p))
        (loss + p).backward()
        if j % 2 == 1:
            opt.step()
            opt.zero_grad()
            watch.step()
    watch.close()
    for x, v in zip(batches, values):
        with ew.capture(model, batch_rows=2, keep_graph=True) as cap:
            model(x)
        assert v == pytest.approx(float(penalty_terms(cap.operators, Regularizer(1.0))[0]), rel=1e-6)
    assert len(set(values)) == 4


def test_fp16_autocast_with_grad_scaler_matches_float32():
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler unavailable")
    (x,) = _batches(1)
    grads = {}
    for mode in ("fp32", "fp16"):
        model = _model(mixer="attention")
        watch = ew.ESSWatch(model, every_n_steps=100, regularizer=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=(mode == "fp16"))
        with torch.autocast("cpu", dtype=torch.float16, enabled=(mode == "fp16")):
            model(x)
            pen = watch.penalty()
        scaler.scale(pen).backward()
        if mode == "fp16":
            assert pen.dtype == torch.float32  # ESS ran in float32 under autocast
        grads[mode] = [p.grad / (1024.0 if mode == "fp16" else 1.0) for p in model.parameters() if p.grad is not None]
        watch.close()
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(grads["fp16"], grads["fp32"])) ** 0.5
    den = sum(float((b**2).sum()) for b in grads["fp32"]) ** 0.5
    assert den > 0 and num / den < 0.05


def _ddp_body(rank, tmp):
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    watch = ew.ESSWatch(model, every_n_steps=2, regularizer=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pens = []
    for x in _batches(3, seed=10 + rank):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten()) + watch.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
        pens.append(float(loss))
        watch.step()
    watch.close()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    with open(os.path.join(tmp, f"r{rank}.json"), "w") as f:
        json.dump({"loss": pens, "params": flat[:50].tolist()}, f)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_ranks_with_regularizer(tmp_path):
    mp.spawn(run_rank, args=(_ddp_body, 2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert all(np.isfinite(r0["loss"])) and r0["loss"] != r1["loss"]  # own data per rank
    np.testing.assert_allclose(r0["params"], r1["params"], rtol=0, atol=0)  # gradients all-reduced


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_a_penalty_without_gradient_is_a_layer_warning_not_a_silent_no_op(mixer):
    """Regression: under reentrant activation checkpointing (torch.utils.checkpoint(use_reentrant=True), Hugging
    Face gradient_checkpointing with use_reentrant=True) the recorded forward runs under no_grad, so the penalty
    had no gradient: it trained nothing, and ess/penalty was logged as if it had. Such a layer's term is now left
    out with a once-per-layer warning, and the layer is still measured (not a failure). With use_reentrant=False
    the penalty and its gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    x = _batches(1)[0]
    grads, penalties = {}, {}
    for mode in ("plain", "non_reentrant", "reentrant"):
        model = _model(mixer)
        watch = ew.ESSWatch(model, every_n_steps=1, regularizer=1.0, histograms=False, images=False)
        if mode == "plain":
            model(x)
        else:
            checkpoint(model, x, use_reentrant=mode == "reentrant")
        if mode == "reentrant":
            with pytest.warns(ew.ESSWarning, match="carries no gradient.*use_reentrant=False") as caught:
                p = watch.penalty()
            assert len([w for w in caught if issubclass(w.category, ew.ESSWarning)]) == 2  # each layer once
        else:
            p = watch.penalty()
            p.backward()
            grads[mode] = [q.grad.clone() for q in model.parameters() if q.grad is not None]
        penalties[mode] = p
        result = watch.step()
        assert watch.failures == 0 and set(result["layers"]) == {"blocks.0.mixer", "blocks.1.mixer"}
        watch.close()
    assert penalties["reentrant"] == 0.0
    assert torch.equal(penalties["plain"].detach(), penalties["non_reentrant"].detach())
    assert len(grads["plain"]) == len(grads["non_reentrant"]) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads["plain"], grads["non_reentrant"]))


def test_a_frozen_layer_is_still_measured_with_the_regularizer_on():
    """Regression (found while fixing the above): leaving a term without gradient out of the penalty removed the
    layer from the step's measurement too (the stash the measurement reuses was the same dict), so a frozen mixer
    vanished from the logs once the regularizer was on. The frozen layer is measured, with the values the watch
    gives without the regularizer; only its penalty term is left out, with one warning."""
    x = _batches(1)[0]
    model = _model("attention")
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    for q in model.embed.parameters():
        q.requires_grad_(False)
    results = {}
    for reg in (None, 1.0):
        watch = ew.ESSWatch(model, every_n_steps=1, regularizer=reg, histograms=False, images=False)
        model(x)
        if reg:
            with pytest.warns(ew.ESSWarning, match="'blocks.0.mixer'.*carries no gradient"):
                p = watch.penalty()
            assert p.requires_grad
        results[reg] = watch.step()
        assert watch.failures == 0
        watch.close()
    for name in ("blocks.0.mixer", "blocks.1.mixer"):
        a, b = (results[r]["layers"][name]["entropy"]["avg"] for r in (None, 1.0))
        assert a == pytest.approx(b, rel=1e-6)
    assert set(results[1.0]["penalty"]["layers"]) == {"blocks.1.mixer"}
