"""Reliability of ESSWatch under faults and bad input (issue 11): each test failed before its fix."""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import esswatch
from esswatch.layers import CausalSelfAttention, SequenceModel
from esswatch.operators import SoftmaxAttention
from esswatch.watch import ESSMeasurementError, ESSWarning

VOCAB, D, L, B = 11, 16, 12, 4
pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed=0):
    torch.manual_seed(seed)
    return SequenceModel(VOCAB, d_model=D, n_layers=2, mixer="attention", n_heads=2)


def tokens(n=1, seed=1, length=L):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, length), generator=g) for _ in range(n)]


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def ours(caught):
    return [w for w in caught if issubclass(w.category, ESSWarning)]


def np_entropy_ess(t, i):
    s = np.linalg.svd(t[..., i:, :i], compute_uv=False)
    p = s / s.sum(-1, keepdims=True)
    return np.exp(-(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1))


# -- 1. non-finite regularizer settings ---------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_regularizer_weight_floor_target_rejected(bad):
    model = make_model()
    with pytest.raises(ValueError, match="weight"):
        esswatch.ESSWatch(model, regularizer=bad)
    with pytest.raises(ValueError, match="weight"):
        esswatch.Regularizer(bad)
    with pytest.raises(ValueError, match="floor"):
        esswatch.Regularizer(1.0, floor=bad)
    with pytest.raises(ValueError, match="target"):
        esswatch.Regularizer(1.0, mode="target", target=bad)
    esswatch.ESSWatch(model, regularizer=1.0).close()  # nothing was left attached


# -- 4. a garbage-collected watch releases the model --------------------------------------------
def test_deleted_watch_releases_the_model():
    model = make_model()
    before = hook_count(model)
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    assert hook_count(model) > before
    del watch
    gc.collect()
    assert hook_count(model) == before
    w2 = esswatch.ESSWatch(model, every_n_steps=1)
    model(tokens()[0])
    assert set(w2.step()["layers"]) == {"blocks.0.mixer", "blocks.1.mixer"}
    w2.close()
    assert hook_count(model) == before


# -- 5. an aborted forward leaves no stale record ----------------------------------------------
class Flaky(nn.Module):
    """Attention, then a layer that raises when told to (after layer 'attn' recorded)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = CausalSelfAttention(D, n_heads=2)
        self.boom = False

    def forward(self, x):
        y = self.attn(x)
        if self.boom:
            raise RuntimeError("user error after the mixer")
        return y


def test_aborted_forward_is_replaced_by_the_next_one():
    model = Flaky()
    watch = esswatch.ESSWatch(model, every_n_steps=1, batch_rows=1)
    aborted, good = torch.randn(1, L, D) * 5, torch.randn(1, L, D)
    model.boom = True
    with pytest.raises(RuntimeError, match="user error"):
        model(aborted)
    model.boom = False
    model(good)
    res = watch.step()
    watch.close()
    with esswatch.capture(model) as cap:
        model(good)
    t = cap.operators["attn"].dense().double().numpy()
    ref = np.array([np_entropy_ess(t, i) for i in res["layers"]["attn"]["indices"]]).T  # (1, heads, n)
    np.testing.assert_allclose(res["layers"]["attn"]["entropy"]["per_index"], ref.mean(axis=(0, 1)), rtol=1e-4)


def test_aborted_forward_with_no_forward_after_it_is_not_measured():
    """Regression: a forward that raised and was skipped (an out-of-memory recovery loop), with step() called
    before any other forward, was measured from the layers that ran before the error, on a batch never trained
    on. Now that step logs nothing (warned), and the next step measures its own forward (NumPy SVD)."""
    model = Flaky()
    logged = []
    watch = esswatch.ESSWatch(model, every_n_steps=1, batch_rows=1, sinks=[logged.append])
    aborted, good = torch.randn(1, L, D) * 5, torch.randn(1, L, D)
    model.boom = True
    with pytest.raises(RuntimeError, match="user error"):
        model(aborted)
    with pytest.warns(ESSWarning, match="step 0 was sampled but no watched layer ran"):
        assert watch.step() is None
    model.boom = False
    model(good)
    res = watch.step()
    watch.close()
    assert [r["step"] for r in logged] == [1]
    with esswatch.capture(model) as cap:
        model(good)
    t = cap.operators["attn"].dense().double().numpy()
    ref = np.array([np_entropy_ess(t, i) for i in res["layers"]["attn"]["indices"]]).T
    np.testing.assert_allclose(res["layers"]["attn"]["entropy"]["per_index"], ref.mean(axis=(0, 1)), rtol=1e-4)


def test_a_forward_that_raises_while_paused_keeps_the_steps_record():
    """Regression: an evaluation forward inside watch.paused() that raised (and was caught) left the gate's
    in-forward mark set, so step() dropped the training forward's record as if it had been aborted. The
    paused forward is not the step's: the sample is the training forward's (NumPy SVD)."""
    model = Flaky()
    watch = esswatch.ESSWatch(model, every_n_steps=1, batch_rows=1)
    good = torch.randn(1, L, D)
    model(good)
    model.boom = True
    with watch.paused(), torch.no_grad(), pytest.raises(RuntimeError, match="user error"):
        model(torch.randn(1, L, D))
    model.boom = False
    res = watch.step()
    watch.close()
    with esswatch.capture(model) as cap:
        model(good)
    t = cap.operators["attn"].dense().double().numpy()
    ref = np.array([np_entropy_ess(t, i) for i in res["layers"]["attn"]["indices"]]).T
    np.testing.assert_allclose(res["layers"]["attn"]["entropy"]["per_index"], ref.mean(axis=(0, 1)), rtol=1e-4)


def test_aborted_forward_with_regularizer_uses_latest_graph():
    model = Flaky()
    reg = esswatch.Regularizer(1.0, mode="target", target=0.0)  # penalty = mean(u^2) > 0
    watch = esswatch.ESSWatch(model, every_n_steps=1, batch_rows=1, regularizer=reg)
    aborted, good = torch.randn(1, L, D) * 5, torch.randn(1, L, D)
    model.boom = True
    with pytest.raises(RuntimeError):
        model(aborted)
    model.boom = False
    model(good)
    pen = watch.penalty()
    watch.close()
    # the same penalty computed from a fresh watch on the good forward only
    w2 = esswatch.ESSWatch(model, every_n_steps=1, batch_rows=1, regularizer=reg)
    model(good)
    ref = w2.penalty()
    w2.close()
    assert isinstance(pen, torch.Tensor) and float(pen) > 0
    assert float(pen) == pytest.approx(float(ref), rel=1e-6)


# -- 6. errors in custom operators and in the probe batch never stop training -----------------
class BrokenOperator(nn.Module):
    def forward(self, x):
        return x * 2

    def esswatch_operator(self, args, kwargs, output):
        raise KeyError("bug in the user's esswatch_operator")


def test_custom_operator_exception_becomes_a_layer_warning():
    torch.manual_seed(0)
    model = nn.Sequential(CausalSelfAttention(D, n_heads=2), BrokenOperator())
    x = torch.randn(B, L, D)
    ref = model(x)
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(x)  # must not raise
        res = watch.step()
        model(x)
        res2 = watch.step()
    watch.close()
    assert torch.equal(out, ref)
    w = ours(caught)
    assert len(w) == 1 and "'1'" in str(w[0].message) and "bug in the user" in str(w[0].message)
    assert res["skipped"] == ["1"] and set(res["layers"]) == {"0"} and res["failures"] == 1
    assert res2["failures"] == 2
    strict = esswatch.ESSWatch(model, every_n_steps=1, strict=True)
    model(x)
    with pytest.raises(ESSMeasurementError, match="'1'"):
        strict.step()
    strict.close()


class ProbeFails(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = CausalSelfAttention(D, n_heads=2)

    def forward(self, x, fail=False):
        if fail:
            raise ValueError("probe input is wrong")
        return self.attn(x)


def test_failing_probe_batch_is_counted_and_warned_not_raised():
    model = ProbeFails()
    watch = esswatch.ESSWatch(model, every_n_steps=1, probe_batch={"x": torch.randn(2, L, D), "fail": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert watch.step() is None
        assert watch.step() is None
    w = ours(caught)
    assert len(w) == 1 and "probe_batch" in str(w[0].message) and "probe input is wrong" in str(w[0].message)
    assert watch.failures == 2
    watch.close()
    strict = esswatch.ESSWatch(
        model, every_n_steps=1, strict=True, probe_batch={"x": torch.randn(2, L, D), "fail": True}
    )
    with pytest.raises(ESSMeasurementError, match="probe_batch"):
        strict.step()
    strict.close()


# -- 8. too short to measure is no failure -----------------------------------------------------
class MaybeNaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.nan = False

    def forward(self, x):
        return x

    def esswatch_operator(self, args, kwargs, output):
        x = args[0][:2]
        q = torch.full((x.shape[0], 1, x.shape[1], 4), float("nan") if self.nan else 1.0)
        return SoftmaxAttention(q, q)


@pytest.mark.parametrize("indices", [8, [8, 9], "strict"])
def test_length_one_is_skipped_silently_and_a_later_nan_still_warns(indices):
    """L = 1, and (regression) a sequence shorter than every index of an explicit list (a length curriculum,
    dynamic padding), which counted as a failure, used up the layer's one warning so that a later NaN went
    unreported, and with strict=True stopped training."""
    torch.manual_seed(0)
    bad = MaybeNaN()
    model = nn.Sequential(CausalSelfAttention(D, n_heads=2), bad)
    strict = indices == "strict"
    watch = esswatch.ESSWatch(model, every_n_steps=1, indices=[8, 9] if strict else indices, strict=strict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for short in (1, 2, 6):
            model(torch.randn(B, short, D))
            if indices == 8 and short > 1:  # an int spreads over what the sequence has
                assert set(watch.step()["layers"]) == {"0", "1"}
            else:
                assert watch.step() is None
        assert ours(caught) == [] and watch.failures == 0
        if strict:
            watch.close()
            return
        model(torch.randn(B, L, D))
        assert set(watch.step()["layers"]) == {"0", "1"}
        bad.nan = True
        model(torch.randn(B, L, D))
        res = watch.step()
    watch.close()
    w = ours(caught)
    assert len(w) == 1 and "'1'" in str(w[0].message) and "non-finite" in str(w[0].message)
    assert res["failures"] == 1


# -- 9. attach is atomic across threads ----------------------------------------------------------
def test_concurrent_attach_never_both_succeed():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(60):
            model = make_model()
            ok, errs = [], []
            barrier = threading.Barrier(2)

            def attach():
                barrier.wait()
                try:
                    ok.append(esswatch.ESSWatch(model, every_n_steps=1))
                except RuntimeError as e:
                    errs.append(e)

            ts = [threading.Thread(target=attach) for _ in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert len(ok) == 1 and len(errs) == 1 and "already attached" in str(errs[0])
            ok[0].close()
    finally:
        sys.setswitchinterval(old)


# -- 12. load_state_dict validates first, then applies ------------------------------------------
@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda s: s.pop("schedule"), "schedule"),
        (lambda s: s["schedule"].pop("step"), "step"),
        (lambda s: s.__setitem__("failures", -5), "failures"),
        (lambda s: s.__setitem__("failures", "x"), "failures"),
        (lambda s: s.__setitem__("samples", -1), "samples"),
        (lambda s: s.__setitem__("samples", 1.5), "samples"),
        (lambda s: s.__setitem__("failed_layers", 3), "failed_layers"),
        (lambda s: s.__setitem__("failed_layers", [1]), "failed_layers"),
        (lambda s: s.__setitem__("schedule", None), "schedule"),
        (lambda s: s.pop("failures"), "failures"),
    ],
)
def test_load_state_dict_validates_everything_before_applying(mutate, what):
    model = make_model()
    src = esswatch.ESSWatch(model, every_n_steps=3)
    for _ in range(7):
        src.step()
    state = src.state_dict()
    src.close()
    watch = esswatch.ESSWatch(model, every_n_steps=3)
    watch.step()
    before = watch.state_dict()
    mutate(state)
    with pytest.raises(ValueError, match=what):
        watch.load_state_dict(state)
    assert watch.state_dict() == before
    watch.close()


# -- 2. a watched model pickles; the loaded model is not watched --------------------------------
def test_watched_model_pickles_and_loaded_copy_is_not_watched(tmp_path):
    model = make_model()
    before = hook_count(model)
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    x = tokens()[0]
    ref = model(x)
    watch.step()
    pickle.loads(pickle.dumps(model))  # no "Can't pickle local object"
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)  # same outputs; its first forward drops the inert hooks
    assert hook_count(loaded) == before
    model(x)  # the original is still watched
    assert set(watch.step()["layers"]) == {"blocks.0.mixer", "blocks.1.mixer"}
    w2 = esswatch.ESSWatch(loaded, every_n_steps=1)  # the loaded model is free to watch
    loaded(x)
    assert set(w2.step()["layers"]) == {"blocks.0.mixer", "blocks.1.mixer"}
    w2.close()
    watch.close()
    assert hook_count(model) == before and hook_count(loaded) == before


# -- 3. a deep copy (EMA / AveragedModel) is not watched -----------------------------------------
def test_deepcopy_and_averaged_model_are_not_watched():
    from torch.optim.swa_utils import AveragedModel

    model = make_model()
    before = hook_count(model)
    watch = esswatch.ESSWatch(model, every_n_steps=1, batch_rows=1)
    ema = AveragedModel(model)
    plain = copy.deepcopy(model)
    xs = tokens(2)
    ema.train()
    ema(xs[1])  # a train-mode forward of the copy: must not be measured
    plain(xs[1])
    model(xs[0])
    res = watch.step()
    # reference: the original model's operator on xs[0], computed without the watch
    watch_ops = res["layers"]["blocks.0.mixer"]["entropy"]["per_index"]
    watch.close()
    assert hook_count(model) == before and hook_count(ema.module) == before and hook_count(plain) == before
    with esswatch.capture(model, batch_rows=1) as cap:
        model(xs[0])
    t = cap.operators["blocks.0.mixer"].dense().double().numpy()
    ref = np.array([np_entropy_ess(t, i) for i in res["layers"]["blocks.0.mixer"]["indices"]]).T
    np.testing.assert_allclose(watch_ops, ref.mean(axis=(0, 1)), rtol=1e-4)


def test_close_removes_inert_hooks_from_copies_that_never_ran():
    model = make_model()
    before = hook_count(model)
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    dup = copy.deepcopy(model)
    assert hook_count(dup) > before  # inert until closed or run
    watch.close()
    assert hook_count(dup) == before and hook_count(model) == before


# -- the same class of defect elsewhere: ESSWatch / capture arguments ------------------------------
@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"tol": float("nan")}, "tol"),
        ({"tol": True}, "tol"),
        ({"tol": float("inf")}, "tol"),
        ({"relative": 1}, "relative"),
        ({"indices": [1, True]}, "indices"),
        ({"indices": {2, 3}}, "indices"),
        ({"indices": [2.5]}, "indices"),
        ({"estimator": ["exact"]}, "estimator"),
        ({"metrics": 3}, "metrics"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"batch_rows": True}, "batch_rows"),
        ({"heads": 0}, "heads"),
        ({"images": -1}, "images"),
        ({"histograms": "yes"}, "histograms"),
        ({"logdir": 3}, "logdir"),
    ],
)
def test_bad_watch_arguments_raise_value_error_and_leave_nothing_attached(kwargs, what, tmp_path):
    model = make_model()
    before = hook_count(model)
    with pytest.raises(ValueError, match=what):
        esswatch.ESSWatch(model, **kwargs)
    assert hook_count(model) == before
    esswatch.ESSWatch(model).close()


def test_unknown_options_are_type_errors_with_nothing_attached():
    """The README's guarantee names TypeError for an unknown option: ESSWatch, capture and Regularizer."""
    model = make_model()
    before = hook_count(model)
    for make in (
        lambda: esswatch.ESSWatch(model, no_such=1),
        lambda: esswatch.capture(model, no_such=1),
        lambda: esswatch.Regularizer(1.0, no_such=1),
    ):
        with pytest.raises(TypeError, match="no_such"):
            make()
        assert hook_count(model) == before


@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"batch_rows": True}, "batch_rows"),
        ({"heads": 1.5}, "heads"),
        ({"keep_graph": "no"}, "keep_graph"),
        ({"layers": 3}, "layers"),
        ({"layers": ["nope"]}, "nope"),
    ],
)
def test_bad_capture_arguments_raise_value_error(kwargs, what):
    with pytest.raises(ValueError, match=what):
        esswatch.capture(make_model(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, err, what",
    [
        ({"regularizer": float("nan")}, ValueError, "weight"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"batch_rows": 0}, ValueError, "batch_rows"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"indices": []}, ValueError, "indices"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
    ],
)
def test_framework_callbacks_validate_options_at_construction(kwargs, err, what):
    pytest.importorskip("lightning")
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from esswatch.integrations.lightning import ESSCallback as LightningCallback
    from esswatch.integrations.transformers import ESSCallback as HFCallback

    for cls in (LightningCallback, HFCallback):
        with pytest.raises(err, match=what):
            cls(**kwargs)
