"""The Lightning adapter in real ``lightning.Trainer.fit`` runs on CPU.

Logs are read back from the loggers' own files (TensorBoard's EventAccumulator,
CSVLogger's metrics.csv); logged ESS values are checked against a NumPy SVD of the
operator the layer computed on the very batch and parameters of the sampled step
(snapshotted independently at batch start).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from esswatch.integrations.lightning import ESSCallback  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from reference import entropy_ess_ref  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import esswatch  # noqa: E402
from esswatch.layers import SequenceModel  # noqa: E402
from esswatch.watch import ESSWarning  # noqa: E402
from esswatch.watch.regularizer import PENALTY_TAG  # noqa: E402

VOCAB, D, SEQ, VAL_SEQ, BATCH = 11, 16, 12, 9, 4
LAYERS = ("model.blocks.0.mixer", "model.blocks.1.mixer")
STATS = ("avg", "max", "total", "utilization")
INDICES = [2, 5, 9]


# -- a tiny LightningModule (module level: ddp_spawn pickles it) ---------------------------------
def make_seq_model(seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(VOCAB, d_model=D, n_layers=2, mixer="attention", n_heads=2)


class TinyLM(L.LightningModule):
    """Calls ``self.model`` (not ``self``) in ``training_step``, as many LightningModules do."""

    def __init__(self, seed: int = 0, lr: float = 0.1) -> None:
        super().__init__()
        self.model = make_seq_model(seed)
        self.lr = lr

    def training_step(self, x, batch_idx):
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, x, batch_idx):
        self.model(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loaders(n_train: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    train = [torch.randint(0, VOCAB, (SEQ,), generator=g) for _ in range(n_train)]
    val = [torch.randint(0, VOCAB, (VAL_SEQ,), generator=g) for _ in range(2 * BATCH)]
    dl = torch.utils.data.DataLoader
    return dl(train, batch_size=BATCH), dl(val, batch_size=BATCH)


def trainer(tmp_path, callbacks, logger, **kw) -> L.Trainer:
    opts = dict(
        max_steps=10,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    opts.update(kw)
    return L.Trainer(callbacks=callbacks, logger=logger, **opts)


class DestroyProcessGroup(L.Callback):
    """Test-only: destroys the default process group when ``fit`` ends, before the spawned process
    exits (torch's advice; without it a spawned rank sometimes aborted at exit under pytest)."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Snapshot(L.Callback):
    """Test-only: the parameters and the batch at the start of chosen steps."""

    def __init__(self, steps) -> None:
        self.steps, self.snaps = set(steps), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        s = trainer.global_step
        if s in self.steps and s not in self.snaps:
            self.snaps[s] = (copy.deepcopy(pl_module.model.state_dict()), batch.clone())


def reference_avg(state, batch, rows: int = 2):
    """Per layer: NumPy entropy-ESS of the attention matrix on ``batch[:rows]``, mean over rows, heads, INDICES."""
    model = make_seq_model()
    model.load_state_dict(state)
    with torch.no_grad(), esswatch.capture(model) as cap:
        model(batch[:rows])
    return {f"model.{n}": float(entropy_ess_ref(op.dense().numpy(), INDICES).mean()) for n, op in cap.operators.items()}


def read_events(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return ea


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ess_rows(rows, tag="ess/entropy/avg/model"):
    return {int(r["step"]): r for r in rows if r.get(tag)}


# -- tests ----------------------------------------------------------------------------------------
def test_tensorboard_logger_gets_all_tags_at_the_sampled_steps(tmp_path):
    """TensorBoardLogger: scalars at global steps 3, 7 (where Lightning logs the loss) equal to the
    NumPy reference of the
    training batch of that step (not the validation or sanity-check batches, which have another
    length), per-head histograms, the profile image and the configuration, in the logger's file."""
    snap = Snapshot([3, 7])
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    train, val = loaders()
    t = trainer(
        tmp_path,
        [snap, ESSCallback(every_n_steps=4, indices=INDICES)],
        tb,
        val_check_interval=4,
        num_sanity_val_steps=1,
    )
    t.fit(TinyLM(), train, val)

    ea = read_events(tb.log_dir)
    scalars = set(ea.Tags()["scalars"])
    for layer in LAYERS + ("model",):
        for stat in STATS:
            tag = f"ess/entropy/{stat}/{layer}"
            assert tag in scalars, tag
            assert [e.step for e in ea.Scalars(tag)] == [3, 7]
            assert all(math.isfinite(e.value) and e.value >= 0 for e in ea.Scalars(tag))
        util = [e.value for e in ea.Scalars(f"ess/entropy/utilization/{layer}")]
        assert all(0 <= u <= 1 + 1e-6 for u in util)
    assert "train_loss" in scalars  # Lightning's own metrics share the file
    for step in (3, 7):
        ref = reference_avg(*snap.snaps[step])
        for layer in LAYERS:
            got = {e.step: e.value for e in ea.Scalars(f"ess/entropy/avg/{layer}")}[step]
            assert got == pytest.approx(ref[layer], rel=1e-4), (step, layer)
        model = {e.step: e.value for e in ea.Scalars("ess/entropy/avg/model")}[step]
        assert model == pytest.approx(np.mean([ref[n] for n in LAYERS]), rel=1e-4)
    for layer in LAYERS:
        assert [e.step for e in ea.Histograms(f"ess_heads/entropy/{layer}")] == [3, 7]
    assert {"esswatch/config/text_summary", "custom_scalars__config__"} <= set(ea.Tags()["tensors"])
    if "ess_profile/entropy" in ea.Tags()["images"]:  # only when matplotlib is installed
        assert [e.step for e in ea.Images("ess_profile/entropy")] == [3]  # images=10: every 10th sample


def test_csv_logger_rows_match_the_results(tmp_path):
    """CSVLogger: metrics.csv has the ESS scalars exactly at the sampled steps, with the values the
    watch produced, next to Lightning's own train_loss."""
    results = []
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    train, _ = loaders()
    t = trainer(tmp_path, [ESSCallback(every_n_steps=3, sinks=[results.append], images=False)], csv_logger, max_steps=8)
    t.fit(TinyLM(), train)

    rows = read_csv(os.path.join(csv_logger.log_dir, "metrics.csv"))
    by_step = ess_rows(rows)
    assert sorted(by_step) == [2, 5] == [r["step"] for r in results]
    for res in results:
        row = by_step[res["step"]]
        for tag, value in res["scalars"].items():
            assert float(row[tag]) == pytest.approx(value, rel=1e-12, abs=1e-12), tag
    assert sum(1 for r in rows if r.get("train_loss")) == 8


@pytest.mark.parametrize("background", [False, True])
def test_resume_from_checkpoint_continues_the_schedule(tmp_path, background):
    """A checkpoint at step 4 holds the callback's state; the resumed fit measures steps 7 and 11
    (not 3 again) and its sample count continues from the checkpoint. With background=True the sample of
    step 3 is still on the worker when that checkpoint is saved: it is emitted first and counted (regression:
    the checkpoint held samples == 0, and the state at the end of a fit one sample short)."""
    ckpt_dir = tmp_path / "ckpt"
    first = []
    train, _ = loaders()
    t1 = trainer(
        tmp_path,
        [
            ESSCallback(every_n_steps=4, sinks=[first.append], images=False, background=background),
            ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=4, save_top_k=-1),
        ],
        CSVLogger(str(tmp_path), name="run1"),
        max_steps=7,
        enable_checkpointing=True,
    )
    t1.fit(TinyLM(), train)
    assert [r["step"] for r in first] == [3]
    ckpt = ckpt_dir / "epoch=0-step=4.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]["ESSCallback"]["watch"]
    assert state["schedule"]["step"] == 4 and state["samples"] == 1

    second = []
    cb = ESSCallback(every_n_steps=4, sinks=[second.append], images=False, background=background)
    csv_logger = CSVLogger(str(tmp_path), name="run2")
    t2 = trainer(tmp_path, [cb], csv_logger, max_steps=14)
    t2.fit(TinyLM(seed=3), train, ckpt_path=str(ckpt))
    assert [r["step"] for r in second] == [7, 11]
    assert sorted(ess_rows(read_csv(os.path.join(csv_logger.log_dir, "metrics.csv")))) == [7, 11]
    assert cb.state_dict()["watch"]["samples"] == 3
    assert cb.state_dict()["watch"]["schedule"]["step"] == 14


def test_no_logger_and_no_logdir_is_a_clear_error(tmp_path):
    train, _ = loaders(16)
    t = trainer(tmp_path, [ESSCallback(every_n_steps=2)], False, max_steps=2)
    with pytest.raises(MisconfigurationException, match="no logger.*logdir"):
        t.fit(TinyLM(), train)

    logdir = tmp_path / "own"
    t = trainer(tmp_path, [ESSCallback(every_n_steps=2, logdir=str(logdir), images=False)], False, max_steps=4)
    t.fit(TinyLM(), train)
    assert [e.step for e in read_events(logdir).Scalars("ess/entropy/avg/model")] == [1, 3]


def test_bf16_mixed_precision_with_the_regularizer(tmp_path):
    results = []
    train, _ = loaders(32)
    logger = CSVLogger(str(tmp_path))
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=2, regularizer=0.1, sinks=[results.append], images=False)],
        logger,
        max_steps=5,
        precision="bf16-mixed",
    )
    t.fit(TinyLM(), train)
    assert [r["step"] for r in results] == [1, 3]
    pen = [float(r[PENALTY_TAG]) for r in read_csv(os.path.join(logger.log_dir, "metrics.csv")) if r.get(PENALTY_TAG)]
    assert len(pen) == 2 and all(math.isfinite(v) and v > 0 for v in pen)  # on the measured steps
    for r in results:
        for layer in LAYERS:
            e = r["layers"][layer]["entropy"]
            assert math.isfinite(e["avg"]) and 0 < e["utilization"] <= 1 + 1e-6


def test_ddp_two_cpu_processes(tmp_path):
    """strategy="ddp_spawn", 2 CPU processes (gloo), reduce=True, with the regularizer: each sampled
    step is written once, by rank zero, no collective deadlocks, no DDP backward error."""
    csv_logger = CSVLogger(str(tmp_path), name="ddp", version=0)  # the spawned rank 0 writes version_0
    train, _ = loaders(48)
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=2, reduce=True, regularizer=0.1, images=False), DestroyProcessGroup()],
        csv_logger,
        max_steps=5,
        strategy="ddp_spawn",
        devices=2,
    )
    t.fit(TinyLM(), train)
    rows = read_csv(os.path.join(csv_logger.log_dir, "metrics.csv"))
    steps = [int(r["step"]) for r in rows if r.get("ess/entropy/avg/model")]
    assert steps == [1, 3]
    assert [int(r["step"]) for r in rows if r.get(PENALTY_TAG)] == [1, 3]
    for r in rows:
        if r.get("ess/entropy/avg/model"):
            assert all(math.isfinite(float(r[f"ess/entropy/{s}/{n}"])) for s in STATS for n in LAYERS)


def test_callback_validates_its_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        ESSCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="writer"):
        ESSCallback(writer=object())


# -- the regularizer ------------------------------------------------------------------------------
WEIGHT = 0.5


class Grads(L.Callback):
    """Test-only: the parameter gradients just before the first optimizer step."""

    def __init__(self) -> None:
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}


def task_loss(model, x):
    logits = model(x)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_regularizer_gradient_is_that_of_loss_plus_penalty(tmp_path, accumulate):
    """The gradient of Lightning's first optimizer step equals that of a plain loop computing
    ``(task loss + watch.penalty()) / accumulate`` per micro-batch with a plain ESSWatch, and
    differs from the unregularized gradient."""
    train, _ = loaders(16)
    grads = Grads()
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=100, regularizer=WEIGHT, images=False), grads],
        CSVLogger(str(tmp_path)),
        max_steps=1,
        accumulate_grad_batches=accumulate,
    )
    t.fit(TinyLM(), train)

    model = make_seq_model()
    batches = [b for _, b in zip(range(accumulate), train)]
    with esswatch.ESSWatch(model, regularizer=WEIGHT, every_n_steps=100) as watch:
        for x in batches:
            loss = task_loss(model, x)
            pen = watch.penalty()
            assert isinstance(pen, torch.Tensor) and float(pen) > 0
            ((loss + pen) / accumulate).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    plain = make_seq_model()
    sum(task_loss(plain, x) / accumulate for x in batches).backward()
    for n, g in grads.grads.items():
        torch.testing.assert_close(g, ref[n], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(p.grad, ref[n]) for n, p in plain.named_parameters())


def test_regularizer_is_logged_and_changes_training(tmp_path):
    """The penalty (total and per layer) reaches the logger on the measured steps, finite and
    positive; the task loss Lightning logs is the same at step 0 and then departs from the
    unregularized run with the same seed."""
    train, _ = loaders(40)
    runs = {}
    for weight in (None, WEIGHT):
        logger = CSVLogger(str(tmp_path), name=f"w{weight}")
        t = trainer(tmp_path, [ESSCallback(every_n_steps=4, regularizer=weight, images=False)], logger, max_steps=6)
        t.fit(TinyLM(), train)
        runs[weight] = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    loss = {
        w: {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")} for w, rows in runs.items()
    }
    pen = {int(r["step"]): float(r[PENALTY_TAG]) for r in runs[WEIGHT] if r.get(PENALTY_TAG)}
    assert sorted(pen) == [3]
    assert all(math.isfinite(v) and v > 0 for v in pen.values())
    for step in (3,):
        row = ess_rows(runs[WEIGHT])[step]
        assert all(math.isfinite(float(row[f"ess/penalty/{n}"])) for n in LAYERS)
    assert not any(r.get(PENALTY_TAG) for r in runs[None])
    assert loss[None][0] == pytest.approx(loss[WEIGHT][0], rel=1e-6)
    assert all(loss[None][s] != pytest.approx(loss[WEIGHT][s], rel=1e-6) for s in range(2, 6))
    assert sorted(ess_rows(runs[WEIGHT])) == [3]


def test_regularizer_with_manual_optimization_is_a_clear_error(tmp_path):
    class Manual(TinyLM):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    train, _ = loaders(8)
    t = trainer(tmp_path, [ESSCallback(regularizer=WEIGHT)], CSVLogger(str(tmp_path)), max_steps=1)
    with pytest.raises(MisconfigurationException, match="manual_backward"):
        t.fit(Manual(), train)


def test_fp16_grad_scaler_scales_the_penalty_like_the_loss(tmp_path):
    """fp16 autocast with a GradScaler (init scale 1024): the unscaled gradient Lightning steps with
    matches the float32 gradient of loss + penalty, much closer than the float32 gradient without the
    penalty is (an unscaled penalty would be 1024 times too small)."""
    from lightning.pytorch.plugins import MixedPrecision

    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip(f"torch {torch.__version__} has no CPU GradScaler (torch.amp.GradScaler: torch 2.3)")
    train, _ = loaders(8)
    grads = Grads()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=100, regularizer=WEIGHT, images=False), grads],
        CSVLogger(str(tmp_path)),
        max_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    t.fit(TinyLM(), train)

    x = next(iter(train))
    ref_model, plain = make_seq_model(), make_seq_model()
    with esswatch.ESSWatch(ref_model, regularizer=WEIGHT, every_n_steps=100) as watch:
        loss = task_loss(ref_model, x)
        (loss + watch.penalty()).backward()
    task_loss(plain, x).backward()
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    got = flat(grads.grads[n] for n, _ in ref_model.named_parameters())
    ref = flat(p.grad for p in ref_model.parameters())
    unreg = flat(p.grad for p in plain.parameters())
    assert (got - ref).norm() < 0.1 * (ref - unreg).norm()


# -- the x axis and the profile images ------------------------------------------------------------
def test_ess_steps_are_steps_of_the_logged_loss(tmp_path):
    """Regression: ESS was logged at global steps 0, 5, 10 while Lightning's train_loss landed at
    4, 9, 14. Read back from a real fit's TensorBoard and CSV files: every ESS step is a step of
    train_loss, in both loggers, with log_every_n_steps dividing every_n_steps."""
    train, _ = loaders(64)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=5, images=False, histograms=False)],
        [tb, csv_logger],
        max_steps=15,
        log_every_n_steps=5,
    )
    t.fit(TinyLM(), train)
    ea = read_events(tb.log_dir)
    loss = [e.step for e in ea.Scalars("train_loss")]
    ess = [e.step for e in ea.Scalars("ess/entropy/avg/model")]
    assert loss == [4, 9, 14] and ess == [4, 9, 14]
    rows = read_csv(os.path.join(csv_logger.log_dir, "metrics.csv"))
    csv_loss = {int(r["step"]) for r in rows if r.get("train_loss")}
    assert sorted(ess_rows(rows)) == [4, 9, 14] and set(ess_rows(rows)) <= csv_loss


class TwoOptimizers(TinyLM):
    """Manual optimization, GAN-style: two optimizers, each stepped once per batch (global_step += 2)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.snaps = {}

    def training_step(self, x, batch_idx):
        self.snaps[batch_idx] = (copy.deepcopy(self.model.state_dict()), x.clone())
        o1, o2 = self.optimizers()
        o1.zero_grad()
        o2.zero_grad()
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        self.manual_backward(loss)
        o1.step()
        o2.step()
        self.log("train_loss", loss, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        p = list(self.parameters())
        return torch.optim.SGD(p[: len(p) // 2], lr=0.1), torch.optim.SGD(p[len(p) // 2 :], lr=0.1)


def test_manual_optimization_with_two_optimizers_logs_at_the_loss_steps(tmp_path):
    """Regression: under manual optimization trainer.global_step counts optimizer.step() calls (0, 2, 4, ...
    with two optimizers), so the sampled steps 3, 7, ... never came and nothing was logged. ESS is now on the
    loggers' batch axis, the steps of train_loss, with the values of the sampled batches (NumPy SVD)."""
    train, _ = loaders(64)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=4, indices=INDICES, images=False)],
        tb,
        max_steps=-1,
        max_epochs=1,
        log_every_n_steps=4,
    )
    t.fit(module := TwoOptimizers(), train)
    assert t.global_step == 32
    ea = read_events(tb.log_dir)
    assert [e.step for e in ea.Scalars("train_loss")] == [3, 7, 11, 15]
    for layer in LAYERS:
        logged = {e.step: e.value for e in ea.Scalars(f"ess/entropy/avg/{layer}")}
        assert sorted(logged) == [3, 7, 11, 15]
        for step, value in logged.items():
            assert value == pytest.approx(reference_avg(*module.snaps[step])[layer], rel=1e-4), (layer, step)


def test_a_period_that_is_not_a_multiple_of_the_logging_interval_warns(tmp_path):
    train, _ = loaders(16)
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=3, images=False)],
        CSVLogger(str(tmp_path)),
        max_steps=2,
        log_every_n_steps=2,
    )
    with pytest.warns(UserWarning, match="not a multiple of the Trainer's log_every_n_steps=2"):
        t.fit(TinyLM(), train)


@pytest.mark.parametrize(
    "images,expected", [(None, [0, 20]), (True, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]), (5, [0, 10, 20]), (False, [])]
)
def test_profile_images_follow_esswatch_images_semantics(tmp_path, images, expected):
    """Regression: Lightning wrote a profile image at every sample although ESSWatch's default is
    every 10th. Both, on the same schedule (every_n_steps=2, 11 samples), give images at the same
    sample numbers (k = 0, 10: the 1st and 11th sample): Lightning at global steps 2k + 1, ESSWatch at 2k."""
    pytest.importorskip("matplotlib")
    kw = {} if images is None else {"images": images}
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    train, _ = loaders(88)
    t = trainer(
        tmp_path,
        [ESSCallback(every_n_steps=2, histograms=False, indices=[3], **kw)],
        tb,
        max_steps=22,
        log_every_n_steps=2,
    )
    t.fit(TinyLM(), train)
    ea = read_events(tb.log_dir)
    got = [e.step for e in ea.Images("ess_profile/entropy")] if ea.Tags()["images"] else []
    assert got == [s + 1 for s in expected]

    model = make_seq_model()
    with esswatch.ESSWatch(
        model, logdir=str(tmp_path / "plain"), every_n_steps=2, histograms=False, indices=[3], **kw
    ) as watch:
        for x in (b for _, b in zip(range(22), train)):
            model(x)
            watch.step()
    ea = read_events(tmp_path / "plain")
    plain = [e.step for e in ea.Images("ess_profile/entropy")] if ea.Tags()["images"] else []
    assert plain == expected


def test_background_measurement_reaches_the_logger_with_the_sampled_steps(tmp_path):
    """ESSCallback(background=True): each result reaches the TensorBoardLogger with the step it
    was sampled at (values = NumPy reference of that step's batch), the last one at fit end; a
    sample skipped because the worker was busy is counted in ess/skipped instead. Samples land
    where Lightning logs the loss: global steps 3 and 7 of a 10-step fit with every_n_steps=4."""
    snap = Snapshot([3, 7])
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    train, _ = loaders()
    cb = ESSCallback(every_n_steps=4, indices=INDICES, background=True)
    trainer(tmp_path, [snap, cb], tb, limit_val_batches=0).fit(TinyLM(), train)
    ea = read_events(tb.log_dir)
    logged = [e.step for e in ea.Scalars("ess/entropy/avg/model")]
    skipped = [e.value for e in ea.Scalars("ess/skipped")]
    assert logged[0] == 3 and set(logged) <= {3, 7} and len(logged) + int(skipped[-1]) == 2
    for step in logged:
        ref = reference_avg(*snap.snaps[step])
        for layer in LAYERS:
            got = {e.step: e.value for e in ea.Scalars(f"ess/entropy/avg/{layer}")}[step]
            assert got == pytest.approx(ref[layer], rel=1e-4), (step, layer)


class HoldWorker(L.Callback):
    """Test-only: holds the background worker of ``cb`` (its first job waits) until training ends,
    so every later sample is skipped."""

    def __init__(self, cb) -> None:
        self.cb, self.gate = cb, threading.Event()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        worker = self.cb.watch._offload.worker
        if not getattr(worker._fn, "held", False):
            run_job = worker._fn
            worker._fn = lambda job: run_job(job) if self.gate.wait(timeout=60) else None
            worker._fn.held = True

    def on_train_end(self, trainer, pl_module):
        self.gate.set()


def test_background_skipped_samples_still_log_the_penalty(tmp_path):
    """ESSCallback(background=True, regularizer=...) with the worker busy from step 0 to the end:
    the CSV logger has the penalty (total and per layer) at every step, equal to the blocking
    run's, in step order; the ESS values only at step 0; ess/skipped counts steps 1-3."""
    train, _ = loaders(40)
    runs = {}
    for background in (False, True):
        logger = CSVLogger(str(tmp_path), name=f"bg{background}")
        cb = ESSCallback(every_n_steps=1, regularizer=WEIGHT, images=False, background=background)
        cbs = [HoldWorker(cb), cb] if background else [cb]
        trainer(tmp_path, cbs, logger, max_steps=4).fit(TinyLM(), train)
        runs[background] = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    tags = [PENALTY_TAG] + [f"ess/penalty/{n}" for n in LAYERS]
    pen = {
        b: {int(r["step"]): [float(r[t]) for t in tags] for r in rows if r.get(PENALTY_TAG)} for b, rows in runs.items()
    }
    assert sorted(pen[False]) == sorted(pen[True]) == [0, 1, 2, 3]
    for step in pen[False]:
        assert pen[True][step] == pytest.approx(pen[False][step], rel=1e-6), step
    # in the file's order the steps increase: the penalties of steps 1-3 waited for step 0's result
    assert [int(r["step"]) for r in runs[True] if r.get(PENALTY_TAG)] == [0, 1, 2, 3]
    measured = ess_rows(runs[True])
    assert sorted(measured) == [0] and float(measured[0]["ess/skipped"]) == 3.0
    # ess/skipped: samples skipped before each result was emitted (all three, at fit end)
    skipped = [(int(r["step"]), float(r["ess/skipped"])) for r in runs[True] if r.get("ess/skipped")]
    assert skipped == [(0, 3.0), (1, 3.0), (2, 3.0), (3, 3.0)]


def test_a_callback_reused_for_another_module_starts_afresh(tmp_path, monkeypatch):
    """Regression: the state a fit leaves (for a later fit to continue) was loaded by the fit of any module, so a
    callback reused for a fresh model carried the old run's counters (ess/failures started at the old total) and
    never warned about the new model's failing layers (they had been reported for the old one). A later fit of the
    same module still continues; another module's fit starts afresh. Every layer fails here (a memory limit of
    1 kB): ess/failures grows by 2 per sample."""
    import warnings

    monkeypatch.setenv("ESSWATCH_MAX_BYTES", "1000")
    train, _ = loaders()
    results = []
    cb = ESSCallback(every_n_steps=2, sinks=[results.append], images=False)
    first = TinyLM()

    def fit(module, name):
        results.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, [cb], CSVLogger(str(tmp_path), name=name), max_steps=4).fit(module, train)
        warned = [w for w in caught if issubclass(w.category, ESSWarning)]
        return [r["scalars"]["ess/failures"] for r in results], len(warned)

    assert fit(first, "a") == ([2.0, 4.0], 2)
    assert fit(TinyLM(seed=3), "b") == ([2.0, 4.0], 2)  # a fresh model: its own counters and warnings
    assert fit(first, "c") == ([2.0, 4.0], 2)  # the last fit was another module's: afresh as well
    cb2 = ESSCallback(every_n_steps=2, sinks=[results.append], images=False)
    cb, module = cb2, TinyLM()
    assert fit(module, "d") == ([2.0, 4.0], 2)
    assert fit(module, "e") == ([6.0, 8.0], 0)  # the same module again: continued, nothing reported twice
