"""ESSWatch in real training loops: event files read back with TensorBoard's own reader,
values checked against independent NumPy recomputations."""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from reference import gated_recurrence_dense, softmax_attention_dense
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch import nn

import esswatch
from esswatch.layers import CausalSelfAttention, SequenceModel
from esswatch.operators import SoftmaxAttention
from esswatch.watch import ESSMeasurementError, ESSWarning

VOCAB, D, L, B = 11, 16, 12, 4
STATS = ("avg", "max", "total", "utilization")


# -- helpers ------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(mixer="attention", seed=0, **kw):
    torch.manual_seed(seed)
    kw = kw or ({"n_heads": 2} if mixer in ("attention", "gla") else {})
    return SequenceModel(VOCAB, d_model=D, n_layers=2, mixer=mixer, **kw)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, L), generator=g) for _ in range(n)]


def train_step(model, opt, x):
    logits = model(x)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def read_events(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return ea


def np_entropy_ess(t, indices):
    """(rows, heads, n) entropy-ESS of H_i = T[..., i:, :i] by NumPy's SVD (float64)."""
    out = np.zeros(t.shape[:-2] + (len(indices),))
    for j, i in enumerate(indices):
        s = np.linalg.svd(t[..., i:, :i], compute_uv=False)
        tot = s.sum(-1, keepdims=True)
        p = s / np.where(tot > 0, tot, 1)
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)
        out[..., j] = np.where(tot[..., 0] > 0, np.exp(h), 0)
    return out


class InputRecorder:
    """Our own hooks keeping each mixer's features of the first 2 rows on a chosen forward, computed
    with the weights of that forward (independent of esswatch): ``feats[name] = (module, featurize(...))``."""

    def __init__(self, model):
        self.feats, self.on = {}, False
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n.endswith("mixer")]

    def _hook(self, name):
        def hook(module, args, out):
            if self.on and name not in self.feats:
                with torch.no_grad():
                    self.feats[name] = (module, module.featurize(args[0][:2]))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# -- the main loop: tags, steps, bounds, independent values --------------------------------
def test_training_loop_writes_event_files_with_correct_values(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    results = []
    rec = InputRecorder(model)
    check_step = 15
    with esswatch.ESSWatch(
        model, logdir=str(tmp_path), every_n_steps=5, sinks=[results.append], batch_rows=2, images=True
    ) as watch:
        for s, x in enumerate(batches(30)):
            rec.on = s == check_step
            train_step(model, opt, x)
            watch.step()
    rec.remove()

    names = ["blocks.0.mixer", "blocks.1.mixer"]
    ea = read_events(tmp_path)
    scalars = set(ea.Tags()["scalars"])
    expected = {f"ess/entropy/{st}/{n}" for st in STATS for n in names + ["model"]} | {"ess/failures"}
    assert expected <= scalars
    assert not any("tolerance" in t for t in scalars)
    for tag in expected:
        ev = ea.Scalars(tag)
        assert [e.step for e in ev] == [0, 5, 10, 15, 20, 25]
        assert all(math.isfinite(e.value) for e in ev)
    assert [e.value for e in ea.Scalars("ess/failures")] == [0.0] * 6
    # the logged values are the results' values (float32 in the event file)
    for r in results:
        for tag, v in r["scalars"].items():
            ev = {e.step: e.value for e in ea.Scalars(tag)}
            assert ev[r["step"]] == pytest.approx(v, rel=1e-6, abs=1e-6)
    # bounds per index: 0 <= ESS <= min(i, L-i); utilization in [0, 1]
    for r in results:
        for n in names:
            lay = r["layers"][n]
            assert lay["indices"] == [1, 3, 4, 5, 7, 8, 9, 11]  # round(j * 12 / 9), j = 1..8
            for i, e in zip(lay["indices"], lay["entropy"]["per_index"]):
                assert 0 <= e <= min(i, L - i) + 1e-5
            assert 0 <= lay["entropy"]["utilization"] <= 1 + 1e-6
            assert lay["rows"] == 2 and lay["heads"] == 2
    # independent recomputation for the sampled step 15: NumPy softmax + NumPy SVD
    logged = {e.step: e.value for e in ea.Scalars("ess/entropy/avg/blocks.1.mixer")}
    r15 = next(r for r in results if r["step"] == check_step)
    for n in names:
        mixer, feats = rec.feats[n]
        t = softmax_attention_dense(feats["q"], feats["k"])
        idx = r15["layers"][n]["indices"]
        e = np_entropy_ess(t, idx)  # (rows, heads, n)
        assert r15["layers"][n]["entropy"]["avg"] == pytest.approx(e.mean(), rel=1e-4)
        assert r15["layers"][n]["entropy"]["per_index"] == pytest.approx(e.mean((0, 1)).tolist(), rel=1e-4)
        assert r15["layers"][n]["entropy"]["total"] == pytest.approx((e.sum(1) * mixer.head_dim).mean(), rel=1e-4)
        tss = np.minimum(np.array(idx), L - np.array(idx))
        assert r15["layers"][n]["entropy"]["utilization"] == pytest.approx((e / tss).mean(), rel=1e-4)
    assert logged[check_step] == pytest.approx(r15["layers"]["blocks.1.mixer"]["entropy"]["avg"], rel=1e-6)
    model_avg = np.mean([r15["layers"][n]["entropy"]["avg"] for n in names])
    assert {e.step: e.value for e in ea.Scalars("ess/entropy/avg/model")}[check_step] == pytest.approx(model_avg)

    # histograms (one value per head), config text, custom-scalars layout, profile images
    tags = ea.Tags()
    assert set(tags["histograms"]) == {f"ess_heads/entropy/{n}" for n in names}
    h = ea.Histograms("ess_heads/entropy/blocks.0.mixer")
    assert [x.step for x in h] == [0, 5, 10, 15, 20, 25] and all(x.histogram_value.num == 2 for x in h)
    text = tensor_util.make_ndarray(ea.Tensors("esswatch/config/text_summary")[0].tensor_proto).item().decode()
    assert "| every_n_steps | 5 |" in text and "blocks.0.mixer" in text
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(ea.Tensors("custom_scalars__config__")[0].tensor_proto).item())
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    (rx,) = charts["entropy-ESS avg, all layers"]  # TensorBoard matches it with re.match
    assert {t for t in tags["scalars"] if re.match(rx, t)} == {
        t for t in tags["scalars"] if t.startswith("ess/entropy/avg/")
    }
    pytest.importorskip("matplotlib")
    imgs = ea.Images("ess_profile/entropy")
    assert [i.step for i in imgs] == [0, 5, 10, 15, 20, 25] and imgs[0].width > 100


def test_recurrence_and_tolerance_metric_match_numpy():
    """GLA through the gram estimator, entropy and tolerance, against NumPy on the explicit T."""
    model = make_model("gla")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    rec = InputRecorder(model)
    rec.on = True
    watch = esswatch.ESSWatch(
        model, every_n_steps=3, indices="all", estimator="gram", metrics=("entropy", "tolerance"), heads=1, batch_rows=2
    )
    train_step(model, opt, batches(1)[0])
    feats = {n: f for n, (m, f) in rec.feats.items()}
    r = watch.step()
    watch.close()
    rec.remove()
    assert r["step"] == 0 and set(r["scalars"]) >= {"ess/tolerance/avg/model", "ess/entropy/total/blocks.0.mixer"}
    for n, f in feats.items():
        t = gated_recurrence_dense(f["q"][:, :1], f["k"][:, :1], f["log_decay"][:, :1])
        lay = r["layers"][n]
        assert lay["indices"] == list(range(1, L)) and lay["heads"] == 1 and lay["state_size"] == f["q"].shape[-1]
        e = np_entropy_ess(t, lay["indices"])
        assert lay["entropy"]["per_index"] == pytest.approx(e.mean((0, 1)).tolist(), rel=1e-4, abs=1e-6)
        s = [np.linalg.svd(t[..., i:, :i], compute_uv=False) for i in lay["indices"]]
        tol = [((sv > 1e-3 * sv[..., :1]) & (sv > 0)).sum(-1).mean() for sv in s]
        assert lay["tolerance"]["per_index"] == pytest.approx(tol)
        tss = np.minimum(np.minimum(np.arange(1, L), L - np.arange(1, L)), f["q"].shape[-1])
        assert lay["tss"] == tss.tolist()
        assert lay["tolerance"]["utilization"] == pytest.approx((np.array(tol) / tss).mean())


# -- schedule, state, adapters' extension points --------------------------------------------
def test_state_dict_resume_continues_the_schedule(tmp_path):
    xs = batches(14)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    w1 = esswatch.ESSWatch(model, logdir=str(tmp_path / "a"), every_n_steps=3)
    steps1 = []
    for x in xs[:7]:
        train_step(model, opt, x)
        r = w1.step()
        steps1.append(r and r["step"])
    state = w1.state_dict()
    w1.close()
    assert [s for s in steps1 if s is not None] == [0, 3, 6]
    assert state["schedule"]["step"] == 7 and state["samples"] == 3

    model2 = make_model(seed=5)
    opt2 = torch.optim.SGD(model2.parameters(), lr=1e-2)
    w2 = esswatch.ESSWatch(model2, logdir=str(tmp_path / "b"), every_n_steps=3)
    w2.load_state_dict(state)
    assert w2.global_step == 7
    steps2 = []
    for x in xs[7:]:
        train_step(model2, opt2, x)
        r = w2.step()
        steps2.append(r and r["step"])
    w2.close()
    assert steps2 == [None, None, 9, None, None, 12, None]
    assert [e.step for e in read_events(tmp_path / "b").Scalars("ess/entropy/avg/model")] == [9, 12]
    assert w2.state_dict()["schedule"]["step"] == 14 and w2.state_dict()["samples"] == 5
    with pytest.raises(ValueError, match="not an ESSWatch state"):
        w2.load_state_dict({"step": 3})


def test_set_step_feeds_a_framework_step_and_keeps_accumulated_records():
    model = make_model()
    watch = esswatch.ESSWatch(model, every_n_steps=10)
    xs = batches(3)
    watch.set_step(19)  # e.g. trainer.global_step at batch start: not sampled
    model(xs[0]).sum().backward()
    assert watch.step() is None and watch.global_step == 20
    for x in xs[1:]:  # two micro-batches of step 20, the adapter calls set_step each time
        watch.set_step(20)
        model(x).sum().backward()
    r = watch.step()
    watch.close()
    assert r["step"] == 20
    # the first micro-batch's forward is the one kept
    ref = esswatch.ESSWatch(model, every_n_steps=1)
    with torch.no_grad():
        model(xs[1])
    r_ref = ref.step()
    ref.close()
    assert r["layers"]["blocks.0.mixer"]["entropy"]["avg"] == r_ref["layers"]["blocks.0.mixer"]["entropy"]["avg"]


def test_eval_forwards_are_not_recorded():
    model = make_model()
    xs = batches(3)
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    model.eval()
    model(xs[0])  # a validation forward while armed: ignored
    model.train()
    model(xs[1]).sum().backward()
    r = watch.step()
    watch.close()
    cap_model = make_model()  # same weights, reference through the capture API
    with esswatch.capture(cap_model, batch_rows=2) as cap:  # the watch's default: 2 rows
        cap_model(xs[1])
    ops = cap.operators
    for n, op in ops.items():
        ref = esswatch.entropy_ess(op, r["layers"][n]["indices"]).mean().item()
        assert r["layers"][n]["entropy"]["avg"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_a_no_gradient_forward_in_training_mode_gives_way_to_the_training_forward(context):
    """Regression: a forward without gradients on a model left in training mode (a validation batch under
    torch.no_grad() or torch.inference_mode(), generate() for sample logging) between steps was measured
    instead of the training forward that followed. A forward with gradients now takes precedence: it replaces
    such a record, and after it no-gradient forwards record nothing. Values: the capture API on the training
    batch. A step with only a no-gradient forward is still measured (that forward)."""
    model = make_model()
    xs = batches(4)
    other = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    results = []
    for before, after in ((True, False), (False, True)):
        if before:
            with ctx():
                model(other)
        model(xs[0]).sum().backward()
        if after:
            with ctx():
                model(other)
        results.append(watch.step())
    with ctx():
        model(other)
    only = watch.step()
    watch.close()
    cap_model = make_model()
    with esswatch.capture(cap_model, batch_rows=2) as cap:
        cap_model(xs[0])
    for r in results:
        for n, op in cap.operators.items():
            assert r["layers"][n]["indices"][-1] >= 7  # the training batch (L = 12), not the other one (7)
            ref = esswatch.entropy_ess(op, r["layers"][n]["indices"]).mean().item()
            assert r["layers"][n]["entropy"]["avg"] == pytest.approx(ref, rel=1e-6)
    assert all(lay["indices"][-1] < 7 for lay in only["layers"].values())


def test_an_eval_mode_forward_with_gradients_keeps_the_training_mode_record():
    """Regression (review of this release): an eval-mode forward with gradients after a training-mode forward
    without them cleared that record although it would record nothing itself, and the step measured nothing."""
    model = make_model()
    xs = batches(2)
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    with torch.no_grad():
        model(xs[0])  # training mode, no gradients: the step's record
    model.eval()
    model(xs[1])  # eval mode with gradients: recorded nowhere, and it keeps the record above
    model.train()
    r = watch.step()
    watch.close()
    cap_model = make_model()
    with esswatch.capture(cap_model, batch_rows=2) as cap:
        cap_model(xs[0])
    for n, op in cap.operators.items():
        ref = esswatch.entropy_ess(op, r["layers"][n]["indices"]).mean().item()
        assert r["layers"][n]["entropy"]["avg"] == pytest.approx(ref, rel=1e-6)


def test_no_forward_warns_once_and_logs_nothing():
    model = make_model()
    watch = esswatch.ESSWatch(model, every_n_steps=1)
    with pytest.warns(ESSWarning, match="no watched layer ran"):
        assert watch.step() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert watch.step() is None
    watch.close()


def test_writer_and_callable_sinks(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    seen = []
    model = make_model()
    with esswatch.ESSWatch(
        model, writer=writer, every_n_steps=2, sinks=lambda r: seen.append(r["scalars"]), images=False
    ) as watch:
        for x in batches(4):
            model(x).sum().backward()
            watch.step()
        latest = watch.latest()
    writer.add_scalar("user/after_close", 1.0, 0)  # the watch did not close the user's writer
    writer.close()
    ea = read_events(tmp_path)
    assert "user/after_close" in ea.Tags()["scalars"] and not ea.Tags()["images"]
    assert [s["ess/entropy/avg/model"] for s in seen] == [
        e.value for e in ea.Scalars("ess/entropy/avg/model")
    ] or np.allclose(
        [s["ess/entropy/avg/model"] for s in seen], [e.value for e in ea.Scalars("ess/entropy/avg/model")], rtol=1e-6
    )
    assert latest["step"] == 2 and latest["scalars"] == seen[-1]
    latest["layers"].clear()  # latest() is a copy
    assert watch.latest()["layers"]


def test_configuration_is_validated_up_front():
    model = make_model()
    bad = [
        dict(every_n_steps=0),
        dict(every_n_steps=2.5),
        dict(metrics=("entropy", "rank")),
        dict(metrics=()),
        dict(indices=0),
        dict(indices="some"),
        dict(indices=[0, 3]),
        dict(estimator="svd"),
        dict(batch_rows=0),
        dict(heads=-1),
        dict(strict="yes"),
        dict(probe_batch=3),
        dict(logdir="x", writer=object()),
        dict(layers="blocks.0.norm1"),
        dict(layers="nope"),
        dict(sinks=[3]),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            esswatch.ESSWatch(model, **kw).close()
    with pytest.raises(ValueError, match="no supported sequence-mixing layer"):
        esswatch.ESSWatch(nn.Sequential(nn.Linear(3, 3)))
    w = esswatch.ESSWatch(model, layers=["blocks.1.mixer"])
    with pytest.raises(RuntimeError, match="already attached"):
        esswatch.ESSWatch(model)
    w.close()
    w.close()  # idempotent
    esswatch.ESSWatch(model).close()  # hooks were removed


# -- never stops training ---------------------------------------------------------------------
class NaNMixer(nn.Module):
    """An identity mixer whose operator is NaN (a diverged layer, as the monitor sees it)."""

    def forward(self, x):
        return x

    def esswatch_operator(self, args, kwargs, output):
        x = args[0][:2]
        q = torch.full((x.shape[0], 1, x.shape[1], 4), float("nan"))
        return SoftmaxAttention(q, q)


def nan_model():
    torch.manual_seed(0)
    return nn.Sequential(CausalSelfAttention(D, n_heads=2), NaNMixer(), CausalSelfAttention(D, n_heads=2))


def test_nan_layer_warns_once_counts_and_others_still_log(tmp_path):
    model = nan_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    xs = [torch.randn(B, L, D) for _ in range(6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with esswatch.ESSWatch(model, logdir=str(tmp_path), every_n_steps=2) as watch:
            for x in xs:
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                watch.step()
            latest = watch.latest()
    ours = [w for w in caught if issubclass(w.category, ESSWarning)]
    assert len(ours) == 1 and "'1'" in str(ours[0].message) and "contains non-finite" in str(ours[0].message)
    ea = read_events(tmp_path)
    assert [(e.step, e.value) for e in ea.Scalars("ess/failures")] == [(0, 1.0), (2, 2.0), (4, 3.0)]
    assert [e.step for e in ea.Scalars("ess/entropy/avg/0")] == [0, 2, 4]
    assert [e.step for e in ea.Scalars("ess/entropy/avg/2")] == [0, 2, 4]
    assert not any(t.endswith("/1") for t in ea.Tags()["scalars"])
    assert latest["skipped"] == ["1"] and set(latest["layers"]) == {"0", "2"} and latest["failures"] == 3
    if esswatch.watch.plot.matplotlib_available():  # default: a profile image every 10th sample
        assert [i.step for i in ea.Images("ess_profile/entropy")] == [0]
    assert watch.state_dict()["failed_layers"] == ["1"]


def test_failing_sink_warns_once_and_other_sinks_still_receive():
    model = make_model()
    seen = []

    def broken(result):
        raise OSError("disk full")

    watch = esswatch.ESSWatch(model, every_n_steps=1, sinks=[broken, seen.append])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in batches(3):
            model(x).sum().backward()
            watch.step()
    watch.close()
    ours = [w for w in caught if issubclass(w.category, ESSWarning)]
    assert len(ours) == 1 and "disk full" in str(ours[0].message)
    assert [r["step"] for r in seen] == [0, 1, 2]


def test_strict_raises_naming_the_layer():
    model = nan_model()
    watch = esswatch.ESSWatch(model, every_n_steps=1, strict=True)
    model(torch.randn(B, L, D))
    with pytest.raises(ESSMeasurementError, match=r"layer '1' at step 0"):
        watch.step()
    watch.close()


@pytest.mark.parametrize("background", [False, True])
def test_strict_error_still_counts_its_step(background):
    """Regression: after ``strict=True`` raised and the caller went on training, the watch's step stayed
    behind, so every later sample was logged one step early (and with ``background`` the step whose
    ``step()`` raised lost its own sample). Steps 0..4, step 1's batch all NaN: the other four are logged
    at their own steps, with the values of their own batches (NumPy SVD of the module's attention)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, 2, batch_first=True)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    xs = [torch.randn(B, L, D) for _ in range(5)]
    xs[1][:] = float("nan")
    logged, raised = {}, []
    watch = esswatch.ESSWatch(
        mha, every_n_steps=1, strict=True, background=background, batch_rows=1, indices=[3, 6],
        sinks=[lambda r: logged.__setitem__(r["step"], r["layers"][""]["entropy"]["per_index"])],
    )  # fmt: skip
    for step, x in enumerate(xs):
        mha(x, x, x, attn_mask=causal)
        try:
            watch.step()
        except ESSMeasurementError:
            raised.append(step)
        if background:
            assert watch._offload.worker.wait_idle(timeout=60)
    watch.close()
    assert raised == ([1] if not background else [2]) and watch.global_step == 5
    assert sorted(logged) == [0, 2, 3, 4]
    for step in (0, 2, 3, 4):
        _, w = mha(xs[step][:1], xs[step][:1], xs[step][:1], attn_mask=causal, average_attn_weights=False)
        ref = np_entropy_ess(w[0].detach().double().numpy(), [3, 6]).mean(axis=0)
        assert np.allclose(np.asarray(logged[step], dtype=float), ref, rtol=1e-4), step


# -- mixed precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_computes_ess_in_float32(dtype):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    rec = InputRecorder(model)
    rec.on = True
    watch = esswatch.ESSWatch(model, every_n_steps=1, batch_rows=2)
    x = batches(1)[0]
    with torch.autocast("cpu", dtype=dtype):
        logits = model(x)
    feats = {n: f for n, (m, f) in rec.feats.items()}
    assert logits.dtype == dtype and all(f["q"].dtype == dtype for f in feats.values())
    logits.float().sum().backward()
    opt.step()
    r = watch.step()
    watch.close()
    rec.remove()
    for n, f in feats.items():
        # NumPy float64 on the very same low-precision q, k: a float32 computation agrees to ~1e-6,
        # a bf16/fp16 one would be off by ~1e-2
        e = np_entropy_ess(softmax_attention_dense(f["q"], f["k"]), r["layers"][n]["indices"])
        assert r["layers"][n]["entropy"]["avg"] == pytest.approx(e.mean(), rel=2e-5)


# -- cost: flag-off identity and no leak ----------------------------------------------------------
def _train(watch_kw, steps=12, dropout=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Dropout(0.1) if dropout else nn.Identity(),
        CausalSelfAttention(D, n_heads=2),
        nn.Dropout(0.1) if dropout else nn.Identity(),
        CausalSelfAttention(D, n_heads=2),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    watch = esswatch.ESSWatch(model, **watch_kw) if watch_kw is not None else None
    for _ in range(steps):
        model(torch.randn(B, L, D, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if watch:
            watch.step()
    if watch:
        watch.close()
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


@pytest.mark.parametrize("every", [1000, 1, 3])
def test_watch_leaves_training_bit_identical(every):
    ref, rng_ref = _train(None)
    got, rng = _train(dict(every_n_steps=every))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert torch.equal(rng, rng_ref)


def test_probe_batch_leaves_training_state_untouched():
    def run(probe):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D, D), nn.Dropout(0.2), CausalSelfAttention(D, n_heads=2))
        bn = nn.BatchNorm1d(L)
        model.insert(1, bn)  # (B, L, D): BatchNorm1d over the L "channels"
        model[3].eval()  # a user-set mode on one submodule must survive too
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        watch = esswatch.ESSWatch(model, every_n_steps=2, probe_batch=probe) if probe is not None else None
        results, states = [], []
        for _ in range(5):
            model(torch.randn(B, L, D, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if watch:
                before = (
                    torch.get_rng_state(),
                    bn.running_mean.clone(),
                    bn.num_batches_tracked.clone(),
                    [m.training for m in model.modules()],
                )
                r = watch.step()
                after = (
                    torch.get_rng_state(),
                    bn.running_mean.clone(),
                    bn.num_batches_tracked.clone(),
                    [m.training for m in model.modules()],
                )
                states.append((before, after))
                results.append(r)
        if watch:
            watch.close()
        return model, results, states

    probe = torch.randn(3, L, D, generator=torch.Generator().manual_seed(9))
    ref, _, _ = run(None)
    model, results, states = run(probe)
    for before, after in states:
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        assert torch.equal(before[2], after[2]) and before[3] == after[3]
    assert [m.training for m in model.modules()] == [True, True, True, True, False, False, False]
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert [r and (r["step"], r["source"]) for r in results] == [(0, "probe"), None, (2, "probe"), None, (4, "probe")]
    # the last probe measurement is the eval-mode forward of the fixed batch (first 2 rows), final weights
    model.eval()
    with torch.no_grad(), esswatch.capture(model, batch_rows=2) as cap:
        model(probe)
    ref_avg = esswatch.entropy_ess(cap.operators["3"], results[4]["layers"]["3"]["indices"]).mean().item()
    assert results[4]["layers"]["3"]["entropy"]["avg"] == pytest.approx(ref_avg, rel=1e-6)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_leak_over_2000_steps(tmp_path):
    """2,000 steps, a sample every 10: no growth in live tensors or gc-tracked Python objects,
    Python allocations (tracemalloc) and resident memory within a small constant (records, results
    and the TensorBoard queue are
    all released)."""
    import gc
    import tracemalloc

    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=8, n_layers=1, mixer="attention", n_heads=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randint(0, VOCAB, (2, 8))

    def census():
        gc.collect()
        objs = gc.get_objects()
        return sum(1 for o in objs if issubclass(type(o), torch.Tensor)), len(objs)

    watch = esswatch.ESSWatch(model, logdir=str(tmp_path), every_n_steps=10, indices=2, images=False)
    tracemalloc.start()
    try:
        for s in range(2000):
            train_step(model, opt, x)
            watch.step()
            if s == 299:
                (base_tensors, base_objs), base_rss = census(), _rss_bytes()
                base_py = tracemalloc.get_traced_memory()[0]
        (tensors, objs), rss = census(), _rss_bytes()
        py = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        watch.close()
    assert py - base_py < 128 * 1024, f"Python allocations grew by {(py - base_py) / 1024:.0f} KiB"
    assert tensors <= base_tensors
    assert objs - base_objs < 200, f"{objs - base_objs} more gc-tracked objects"
    assert rss - base_rss < 8 * 2**20, f"resident memory grew by {(rss - base_rss) / 2**20:.1f} MiB"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_loop_memory_constant():
    model = make_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = batches(1)[0].cuda()
    watch = esswatch.ESSWatch(model, every_n_steps=5)
    for s in range(300):
        train_step(model, opt, x)
        r = watch.step()
        if s == 49:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base
    assert math.isfinite(r["model"]["entropy"]["avg"]) if r else True
    watch.close()


def test_without_matplotlib_everything_but_the_image_is_logged(tmp_path):
    """matplotlib is optional: in a fresh interpreter where it cannot be imported, the watch logs
    scalars and histograms and no image (and importing esswatch never imports matplotlib)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None           # import matplotlib -> ImportError
        import torch, esswatch
        from esswatch.layers import SequenceModel
        torch.set_num_threads(1)
        model = SequenceModel({VOCAB}, d_model=16, n_layers=1, mixer="attention", n_heads=2)
        with esswatch.ESSWatch(model, logdir={str(tmp_path)!r}, every_n_steps=1) as watch:
            for _ in range(2):
                model(torch.randint(0, {VOCAB}, (2, 8))).sum().backward()
                watch.step()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    ea = read_events(tmp_path)
    assert not ea.Tags()["images"]
    assert [e.step for e in ea.Scalars("ess/entropy/avg/blocks.0.mixer")] == [0, 1]
    assert ea.Tags()["histograms"] == ["ess_heads/entropy/blocks.0.mixer"]

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, esswatch; esswatch.ESSWatch; "
            "print('matplotlib' in sys.modules, 'torch._dynamo' in sys.modules)",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.split() == ["False", "False"]
