"""The Hugging Face adapter in real ``transformers.Trainer.train`` runs on CPU.

Tiny random-initialised Llama and Mamba models on a small in-memory dataset (nothing is
downloaded). Logs are read back from ``trainer.state.log_history`` and from the event
files of the Trainer's own TensorBoard integration (TensorBoard's EventAccumulator);
Llama's logged ESS is checked against a NumPy SVD of the attention probabilities the
model itself returns (eager attention, ``output_attentions=True``) for the very batch and
parameters of the sampled step, both recorded by test-owned hooks.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from esswatch.integrations._versions import SUPPORTED_TRANSFORMERS, UnsupportedVersionError, require  # noqa: E402
from esswatch.integrations.transformers import ESSCallback  # noqa: E402
from esswatch.integrations.transformers.checkpoint import STATE_KEY  # noqa: E402
from reference import entropy_ess_ref  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import esswatch  # noqa: E402
from esswatch import Regularizer  # noqa: E402
from esswatch.probes import UnsupportedModelError  # noqa: E402
from esswatch.watch import ESSWarning, ESSWatch  # noqa: E402
from esswatch.watch.regularizer import PENALTY_TAG  # noqa: E402

VOCAB, SEQ, BATCH = 64, 16, 4
STATS = ("avg", "max", "total", "utilization")
INDICES = [3, 8, 12]
LLAMA_LAYERS = ("model.layers.0.self_attn", "model.layers.1.self_attn")
MAMBA_LAYERS = ("backbone.layers.0.mixer", "backbone.layers.1.mixer")


def llama(attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg)


def mamba():
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=VOCAB, expand=2, conv_kernel=3, time_step_rank=4
    )
    return transformers.MambaForCausalLM(cfg)


def dataset(n: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (SEQ,), generator=g)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def train(tmp_path, model, callbacks, max_steps=6, logging_steps=2, report_to=("tensorboard",), **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=BATCH,
        logging_steps=logging_steps,
        report_to=list(report_to),
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
        **{"disable_tqdm": True, **{k: v for k, v in kw.items() if k != "compute_loss_func"}},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        callbacks=list(callbacks),
        compute_loss_func=kw.get("compute_loss_func"),
    )
    trainer.train()
    return trainer


def read_events(output_dir):
    (logdir,) = glob.glob(os.path.join(str(output_dir), "runs", "*"))
    ea = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return ea


def ess_history(trainer):
    return {e["step"]: e for e in trainer.state.log_history if "ess/entropy/avg/model" in e}


class Snapshot(TrainerCallback):
    """Test-only: the parameters at the start of chosen steps and the input_ids of their first
    forward (a forward pre-hook owned by the test)."""

    def __init__(self, model, steps) -> None:
        self.steps, self.params, self.inputs, self.current = set(steps), {}, {}, None
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.current is not None and self.current not in self.inputs and module.training:
            self.inputs[self.current] = kwargs["input_ids"].detach().clone()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        s = state.global_step + 1  # the step that ends with global_step == s (the Trainer's numbering)
        self.current = s if s in self.steps else None
        if self.current is not None:
            self.params[s] = copy.deepcopy(model.state_dict())


def reference_avg(params, input_ids, rows: int = 2):
    """Per layer: NumPy entropy-ESS of the attention probabilities the eager Llama returns."""
    model = llama("eager").eval()
    model.load_state_dict(params)
    with torch.no_grad():
        att = model(input_ids=input_ids[:rows], output_attentions=True).attentions
    return {name: float(entropy_ess_ref(a.double().numpy(), INDICES).mean()) for name, a in zip(LLAMA_LAYERS, att)}


# -- tests ----------------------------------------------------------------------------------------
def test_llama_scalars_reach_log_history_and_tensorboard(tmp_path):
    """Steps 2, 4, 6 (the Trainer's numbering, like its loss): every tag in log_history and in
    the event file of the Trainer's TensorBoard integration, equal to each other and to the NumPy
    reference of the step's batch; other steps carry no ESS."""
    model = llama()
    snap = Snapshot(model, [2, 4, 6])
    trainer = train(tmp_path, model, [snap, ESSCallback(every_n_steps=2, indices=INDICES)])
    snap.handle.remove()

    hist = ess_history(trainer)
    assert sorted(hist) == [2, 4, 6]
    assert sorted(e["step"] for e in trainer.state.log_history if "loss" in e) == [2, 4, 6]  # loss still logged
    ea = read_events(tmp_path)
    for layer in LLAMA_LAYERS + ("model",):
        for stat in STATS:
            tag = f"ess/entropy/{stat}/{layer}"
            events = ea.Scalars(tag)  # written through the Trainer's own writer, next to train/loss
            assert [e.step for e in events] == [2, 4, 6]
            for e in events:
                assert math.isfinite(e.value)
                assert e.value == pytest.approx(hist[e.step][tag], rel=1e-6)  # float32 in the event file
        assert all(0 <= hist[s][f"ess/entropy/utilization/{layer}"] <= 1 + 1e-6 for s in hist)
    for step in (2, 4, 6):
        ref = reference_avg(snap.params[step], snap.inputs[step])
        for layer in LLAMA_LAYERS:
            assert hist[step][f"ess/entropy/avg/{layer}"] == pytest.approx(ref[layer], rel=1e-4), (step, layer)


def test_mamba_scalars_reach_log_history_and_tensorboard(tmp_path):
    trainer = train(tmp_path, mamba(), [ESSCallback(every_n_steps=3)], max_steps=6, logging_steps=3)
    hist = ess_history(trainer)
    assert sorted(hist) == [3, 6]
    ea = read_events(tmp_path)
    for layer in MAMBA_LAYERS:
        for stat in STATS:
            tag = f"ess/entropy/{stat}/{layer}"
            events = ea.Scalars(tag)
            assert [e.step for e in events] == [3, 6]
            assert all(e.value == pytest.approx(hist[e.step][tag], rel=1e-6) for e in events)
        for s in hist:
            assert 0 < hist[s][f"ess/entropy/avg/{layer}"] <= 4 + 1e-6  # state_size = 4
            assert 0 < hist[s][f"ess/entropy/utilization/{layer}"] <= 1 + 1e-6


def test_own_writer_instead_of_the_trainer_writer(tmp_path):
    """writer=: everything (histograms, config) goes to that writer; log_history still gets the
    scalars, unless log_to_trainer=False."""
    logdir = tmp_path / "ess"
    writer = SummaryWriter(str(logdir))
    trainer = train(
        tmp_path / "out",
        llama(),
        [ESSCallback(every_n_steps=2, writer=writer, images=False)],
        max_steps=4,
        report_to=(),
    )
    writer.close()
    assert sorted(ess_history(trainer)) == [2, 4]
    quiet = train(
        tmp_path / "out2",
        llama(),
        [ESSCallback(every_n_steps=2, logdir=str(tmp_path / "ess2"), log_to_trainer=False, images=False)],
        max_steps=2,
        report_to=(),
    )
    assert ess_history(quiet) == {}
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("ess/entropy/avg/model")] == [2, 4]
    assert [e.step for e in ea.Histograms(f"ess_heads/entropy/{LLAMA_LAYERS[0]}")] == [2, 4]
    assert "esswatch/config/text_summary" in ea.Tags()["tensors"]


def test_callback_validates_its_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        ESSCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="not both"):
        ESSCallback(writer=object(), logdir="x")
    with pytest.raises(ValueError, match="log_to_trainer must be a bool"):
        ESSCallback(log_to_trainer="yes")
    with pytest.raises(ValueError, match="console must be a bool"):
        ESSCallback(console=1)


def test_version_check_names_the_installed_version_and_the_range():
    assert require("transformers", SUPPORTED_TRANSFORMERS, "transformers").__version__ == transformers.__version__
    with pytest.raises(UnsupportedVersionError, match=rf"transformers>=99.*{transformers.__version__}.*esswatch\["):
        require("transformers", ">=99", "transformers")
    with pytest.raises(UnsupportedVersionError, match="not installed"):
        require("esswatch_no_such_framework", ">=1", "transformers")


def test_the_supported_range_is_the_extras_range():
    """``pyproject.toml``'s extras install the range the adapters check, and CI tests its lower end."""
    from esswatch.integrations._versions import SUPPORTED_LIGHTNING

    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")  # (no tomllib: Python 3.10 is supported)
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    assert extras.count(f'"transformers{SUPPORTED_TRANSFORMERS}"') == 2  # the transformers and dev extras
    assert extras.count(f'"lightning{SUPPORTED_LIGHTNING}"') == 2
    assert "transformers>" not in extras.replace(f"transformers{SUPPORTED_TRANSFORMERS}", "")
    assert "lightning>" not in extras.replace(f"lightning{SUPPORTED_LIGHTNING}", "")
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    for name, spec in (("transformers", SUPPORTED_TRANSFORMERS), ("lightning", SUPPORTED_LIGHTNING)):
        floor = spec.split(",")[0].removeprefix(">=")
        assert f'"{name}=={floor}' in ci, (name, floor)  # the oldest supported release, tested by .ci/run


def test_an_out_of_range_transformers_reports_its_layers_as_not_capturable(monkeypatch):
    """With a transformers release outside the supported range (5.0-5.14 capture FalconMamba's mixer
    wrongly; 4.x lacks the registry's ``get_interface``), the Hugging Face layers are named as not
    capturable, with the installed version and the range, instead of being captured wrongly."""
    from esswatch.integrations.transformers import provider

    problem = provider.version_problem(transformers, ">=99", "transformers")
    assert f"transformers {transformers.__version__} is installed" in problem and "transformers>=99" in problem
    monkeypatch.setattr(provider, "_VERSION_PROBLEM", problem)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(UnsupportedModelError) as e:
        esswatch.ESSWatch(model, every_n_steps=1)
    msg = str(e.value)
    assert "model.layers.0.self_attn" in msg and "model.layers.1.self_attn" in msg and problem in msg, msg
    monkeypatch.setattr(provider, "_VERSION_PROBLEM", None)
    esswatch.ESSWatch(model, every_n_steps=1).close()  # in range: captured


# -- the regularizer ------------------------------------------------------------------------------
# floor=1: the collapse penalty acts on every head below full utilization, so it is positive here
REG = Regularizer(0.5, floor=1.0)


@pytest.mark.parametrize("kind,accumulate", [("llama", 2), ("mamba", 1)])
def test_regularizer_through_compute_loss_func(tmp_path, kind, accumulate):
    """The stock Trainer with compute_loss_func=ess.compute_loss_func(): at step 1 the loss the
    Trainer logs (what it backpropagated) is the unregularized run's loss plus the logged penalty
    (also with gradient accumulation: the mean penalty of the micro-batches); later the task
    losses depart; the penalty (total and per layer) reaches log_history and TensorBoard, finite
    and positive, next to the ESS scalars."""
    make, layers = (llama, LLAMA_LAYERS) if kind == "llama" else (mamba, MAMBA_LAYERS)
    logs = {}
    for reg in (None, REG):
        ess = ESSCallback(every_n_steps=1, regularizer=reg, images=False)
        extra = {"compute_loss_func": ess.compute_loss_func()} if reg else {}
        out = tmp_path / ("reg" if reg else "plain")
        trainer = train(
            out, make(), [ess], max_steps=4, logging_steps=1, gradient_accumulation_steps=accumulate, **extra
        )
        logs[reg] = trainer.state.log_history
        assert sorted(ess_history(trainer)) == [1, 2, 3, 4]
    loss = {r: {e["step"]: e["loss"] for e in h if "loss" in e} for r, h in logs.items()}
    pen = {e["step"]: e[PENALTY_TAG] for e in logs[REG] if PENALTY_TAG in e}
    assert sorted(pen) == [1, 2, 3, 4] and all(math.isfinite(v) and v > 0 for v in pen.values())
    assert all(math.isfinite(e[f"ess/penalty/{n}"]) for e in logs[REG] if PENALTY_TAG in e for n in layers)
    assert not any(PENALTY_TAG in e for e in logs[None])
    assert loss[REG][1] == pytest.approx(loss[None][1] + pen[1], rel=1e-5)
    assert loss[REG][4] - pen[4] != pytest.approx(loss[None][4], rel=1e-6)  # the task losses diverged
    ea = read_events(tmp_path / "reg")
    assert [e.step for e in ea.Scalars(PENALTY_TAG)] == [1, 2, 3, 4]


class HoldWorker(TrainerCallback):
    """Test-only: holds the background worker of ``ess`` (its first job waits) until train end,
    so every later sample is skipped. Registered before ``ess`` so it opens before ``ess`` closes."""

    def __init__(self, ess) -> None:
        self.ess, self.gate = ess, threading.Event()

    def on_step_begin(self, args, state, control, **kwargs):
        worker = self.ess.watch._offload.worker
        if not getattr(worker._fn, "held", False):
            run_job = worker._fn
            worker._fn = lambda job: run_job(job) if self.gate.wait(timeout=60) else None
            worker._fn.held = True

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop:  # ess drains its worker at the end of the last step
            self.gate.set()

    def on_train_end(self, args, state, control, **kwargs):
        self.gate.set()


def test_background_skipped_samples_still_log_the_penalty(tmp_path):
    """ESSCallback(background=True) with the regularizer and a worker busy from step 1 to the end:
    log_history has the penalty (total and per layer) at every step, equal to the blocking run's,
    in step order, the ESS values only at step 1 (at train end), and ess/skipped counting steps 2-4."""
    logs = {}
    for background in (False, True):
        ess = ESSCallback(every_n_steps=1, regularizer=REG, images=False, background=background)
        cbs = [HoldWorker(ess), ess] if background else [ess]
        trainer = train(
            tmp_path / str(background),
            llama(),
            cbs,
            max_steps=4,
            logging_steps=1,
            compute_loss_func=ess.compute_loss_func(),
        )
        logs[background] = trainer.state.log_history
    tags = [PENALTY_TAG] + [f"ess/penalty/{n}" for n in LLAMA_LAYERS]
    pen = {b: {e["step"]: [e[t] for t in tags] for e in h if PENALTY_TAG in e} for b, h in logs.items()}
    assert sorted(pen[False]) == sorted(pen[True]) == [1, 2, 3, 4]
    for step in pen[False]:
        assert pen[True][step] == pytest.approx(pen[False][step], rel=1e-6), step
    # in log_history's order the steps increase: the penalties of steps 2-4 waited for step 1's result
    assert [e["step"] for e in logs[True] if PENALTY_TAG in e] == [1, 2, 3, 4]
    ess_steps = {e["step"]: e for e in logs[True] if "ess/entropy/avg/model" in e}
    assert sorted(ess_steps) == [1] and ess_steps[1]["ess/skipped"] == 3.0
    # ess/skipped: samples skipped before each result was emitted (all three, at train end)
    skipped = [(e["step"], e["ess/skipped"]) for e in logs[True] if "ess/skipped" in e]
    assert skipped == [(1, 3.0), (2, 3.0), (3, 3.0), (4, 3.0)]


class ReleaseAt(HoldWorker):
    """Test-only: holds the worker until the end of step ``step``, then lets it finish before
    ``ess`` ends that step (registered before ``ess``)."""

    def __init__(self, ess, step) -> None:
        super().__init__(ess)
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.gate.set()
            assert self.ess.watch._offload.worker.wait_idle(timeout=60)


def test_background_result_and_a_skipped_penalty_in_one_step_are_both_logged(tmp_path):
    """One watch.step() can emit two results: at step 2 it collects step 1's sample, whose timing
    fixes a budget_seconds cut, so step 2's own capture (armed before the cut) is skipped and its
    penalty logged. Both reach log_history: ESS at steps 1 and 3, the penalty at 1, 2 and 3."""
    ess = ESSCallback(every_n_steps=1, regularizer=REG, images=False, background=True, budget_seconds=1e-6)
    with pytest.warns(ESSWarning, match="budget"):
        trainer = train(
            tmp_path,
            llama(),
            [ReleaseAt(ess, 2), ess],
            max_steps=3,
            logging_steps=1,
            compute_loss_func=ess.compute_loss_func(),
        )
    hist = trainer.state.log_history
    assert sorted(ess_history(trainer)) == [1, 3]
    assert sorted(e["step"] for e in hist if PENALTY_TAG in e) == [1, 2, 3]
    assert {e["step"]: e["ess/skipped"] for e in hist if "ess/skipped" in e} == {1: 0.0, 2: 1.0, 3: 1.0}


def test_regularizer_without_the_loss_hook_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func=ess.compute_loss_func"):
        train(tmp_path, llama(), [ESSCallback(every_n_steps=2, regularizer=0.5)], max_steps=1)


# -- the Trainer path: what TensorBoard gets, what the console shows, where the steps land -----------
def test_trainer_tensorboard_gets_histograms_images_layout_and_config(tmp_path):
    """Regression: on the Trainer path only scalars (as train/ess/...) reached TensorBoard. Now the
    Trainer's own event file has the per-head histograms, profile images (images=True: every
    sample), the custom-scalars layout and the configuration text, and no train/ess/ duplicates."""
    pytest.importorskip("matplotlib")
    train(tmp_path, llama(), [ESSCallback(every_n_steps=2, images=True)], max_steps=4)
    ea = read_events(tmp_path)
    tags = ea.Tags()
    for layer in LLAMA_LAYERS:
        assert [e.step for e in ea.Histograms(f"ess_heads/entropy/{layer}")] == [2, 4]
    assert [e.step for e in ea.Images("ess_profile/entropy")] == [2, 4]
    assert {"custom_scalars__config__", "esswatch/config/text_summary"} <= set(tags["tensors"])
    assert "train/loss" in tags["scalars"]
    assert not [t for t in tags["scalars"] if t.startswith("train/ess")]


def test_default_images_include_the_first_sample(tmp_path):
    """Regression: images=10 (the default) drew at (step // n) % 10 == 0; the Trainer's steps are 1-based, so
    its samples n, 2n, ... got their first image at the 10th. As in a plain loop, the first sample has one."""
    pytest.importorskip("matplotlib")
    train(tmp_path, llama(), [ESSCallback(every_n_steps=2)], max_steps=6)
    ea = read_events(tmp_path)
    assert [e.step for e in ea.Scalars("ess/entropy/avg/model")] == [2, 4, 6]
    assert [e.step for e in ea.Images("ess_profile/entropy")] == [2]


@pytest.mark.parametrize("tqdm", [False, True])
def test_console_stays_quiet_by_default(tmp_path, capfd, tqdm):
    """Regression: every ESS sample printed a dict of every tag on the console / progress bar.
    A real Trainer run (PrinterCallback without tqdm, ProgressCallback with it) prints its loss
    but no ESS tag by default; log_history and other callbacks' on_log (how W&B, MLflow, ... get
    metrics) still receive them; console=True prints them."""

    class OnLog(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append((state.global_step, dict(logs)))

    rec = OnLog()
    trainer = train(
        tmp_path / "quiet",
        llama(),
        [ESSCallback(every_n_steps=2, images=False), rec],
        max_steps=4,
        logging_steps=2,
        report_to=(),
        disable_tqdm=not tqdm,
    )
    out = capfd.readouterr()
    printed = out.out + out.err
    assert "'loss'" in printed and "ess/" not in printed
    assert sorted(ess_history(trainer)) == [2, 4]
    assert sorted(s for s, logs in rec.seen if "ess/entropy/avg/model" in logs) == [2, 4]
    assert sorted(s for s, logs in rec.seen if "loss" in logs) == [2, 4]  # the loss still logged too

    train(
        tmp_path / "loud",
        llama(),
        [ESSCallback(every_n_steps=2, images=False, console=True)],
        max_steps=4,
        logging_steps=2,
        report_to=(),
        disable_tqdm=not tqdm,
    )
    out = capfd.readouterr()
    assert "ess/entropy/avg/model" in out.out + out.err


def test_ess_steps_are_loss_steps_in_the_event_file(tmp_path):
    """ESS and the Trainer's loss share the x axis: every ESS step is a step of train/loss."""
    train(tmp_path, llama(), [ESSCallback(every_n_steps=4, images=False)], max_steps=9, logging_steps=2)
    ea = read_events(tmp_path)
    loss = {e.step for e in ea.Scalars("train/loss")}
    ess = [e.step for e in ea.Scalars("ess/entropy/avg/model")]
    assert ess == [4, 8] and set(ess) <= loss


def test_a_period_that_is_not_a_multiple_of_logging_steps_warns(tmp_path):
    with pytest.warns(UserWarning, match="not a multiple of logging_steps=2"):
        train(tmp_path, llama(), [ESSCallback(every_n_steps=3, images=False)], max_steps=1, logging_steps=2)


def test_per_epoch_logging_warns_unless_the_period_is_whole_epochs(tmp_path):
    """logging_strategy="epoch" puts the loss at the epochs' last steps only; a period that is not a whole
    number of epochs warned under the "steps" strategy only. With whole epochs, ESS lands on the loss steps."""
    per_epoch = len(dataset()) // BATCH
    opts = dict(max_steps=-1, num_train_epochs=2, logging_strategy="epoch")
    with pytest.warns(UserWarning, match=f"not a multiple of the steps per epoch.*={per_epoch}"):
        train(tmp_path / "a", llama(), [ESSCallback(every_n_steps=per_epoch - 1, images=False)], **opts)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not a multiple of")
        train(tmp_path / "b", llama(), [ESSCallback(every_n_steps=per_epoch, images=False)], **opts)
    ea = read_events(tmp_path / "b")
    loss = [e.step for e in ea.Scalars("train/loss")]
    assert loss == [per_epoch, 2 * per_epoch] and [e.step for e in ea.Scalars("ess/entropy/avg/model")] == loss


def test_background_results_reach_log_history_with_their_sampled_steps(tmp_path):
    """ESSCallback(background=True): every result lands in log_history and the event file with
    the step it was sampled at (values = NumPy reference), the last one at train end; samples
    skipped because the worker was busy are counted in ess/skipped instead."""
    model = llama()
    snap = Snapshot(model, [2, 4, 6])
    trainer = train(tmp_path, model, [snap, ESSCallback(every_n_steps=2, indices=INDICES, background=True)])
    snap.handle.remove()
    hist = ess_history(trainer)
    assert hist and set(hist) <= {2, 4, 6}
    last = hist[max(hist)]
    assert len(hist) + int(last["ess/skipped"]) == 3
    for step in hist:
        ref = reference_avg(snap.params[step], snap.inputs[step])
        for layer in LLAMA_LAYERS:
            assert hist[step][f"ess/entropy/avg/{layer}"] == pytest.approx(ref[layer], rel=1e-4), (step, layer)
    ea = read_events(tmp_path)
    assert [e.step for e in ea.Scalars("ess/entropy/avg/model")] == sorted(hist)
    # the last result too went through the Trainer's writer before TensorBoardCallback closed it (a write
    # after that would reopen the writer: a second event file, left open)
    (logdir,) = glob.glob(os.path.join(str(tmp_path), "runs", "*"))
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("background", [False, True])
def test_a_resumed_trainer_continues_the_watch_state(tmp_path, monkeypatch, background):
    """Regression: ESSCallback saved nothing in the Trainer's checkpoints, so train(resume_from_checkpoint=...)
    restarted its cumulative counters (ess/failures fell from 4 to 2 across the resume), warned again about
    layers it had reported, and re-decided a budget. The watch's state now goes into trainer_state.json (after
    an outstanding background sample) and comes back. Every layer fails here (a memory limit of 1 kB), so
    ess/failures grows by 2 per sample: read from the event files and log_history."""
    monkeypatch.setenv("ESSWATCH_MAX_BYTES", "1000")

    def run(max_steps, resume=None):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=BATCH,
            logging_steps=2,
            report_to=["tensorboard"],
            use_cpu=True,
            save_strategy="steps",
            save_steps=4,
            learning_rate=1e-2,
            seed=0,
            disable_tqdm=True,
        )
        callback = ESSCallback(every_n_steps=2, indices=INDICES, background=background)
        trainer = Trainer(model=llama(), args=args, train_dataset=dataset(), callbacks=[callback])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(resume_from_checkpoint=resume)
        return trainer, [w for w in caught if issubclass(w.category, ESSWarning)]

    _, warned = run(6)
    assert len(warned) == 2  # each layer once
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved[STATE_KEY]["failures"] == 4 and saved[STATE_KEY]["failed_layers"] == sorted(LLAMA_LAYERS)
    trainer, warned = run(10, str(tmp_path / "checkpoint-4"))
    assert warned == []  # reported before the checkpoint
    history = {e["step"]: e["ess/failures"] for e in trainer.state.log_history if "ess/failures" in e}
    assert history == {2: 2.0, 4: 4.0, 6: 6.0, 8: 8.0, 10: 10.0}
    written = {}
    for logdir in glob.glob(os.path.join(str(tmp_path), "runs", "*")):
        ea = EventAccumulator(logdir, size_guidance={"scalars": 0})
        ea.Reload()
        written.update({e.step: e.value for e in ea.Scalars("ess/failures")})
    assert written == {2: 2.0, 4: 4.0, 6: 6.0, 8: 8.0, 10: 10.0}  # the first run's step 6 is overwritten
    # a state that does not validate never stops training: a warning, and the watch starts afresh
    path = tmp_path / "checkpoint-8" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["stateful_callbacks"][STATE_KEY]["failures"] = -1
    path.write_text(json.dumps(state))
    trainer, warned = run(10, str(path.parent))
    assert any("was not restored" in str(w.message) and "failures" in str(w.message) for w in warned)
    assert [e["ess/failures"] for e in trainer.state.log_history if "ess/failures" in e and e["step"] == 10] == [2.0]


@pytest.mark.parametrize("background", [False, True])
def test_save_strategy_best_and_epoch_checkpoints_hold_the_watch_state(tmp_path, background):
    """The Trainer decides a "best" save after evaluating, after its callbacks' step hooks: the state is put into
    the TrainerState at every evaluation. An "epoch" save is decided at the epoch's end. Both checkpoints hold it,
    with the samples taken up to their step (regression, background: the last step closes the watch before the
    epoch's end, and the final checkpoint held the previous save's state)."""
    for strategy, extra, step in (
        ("best", dict(eval_strategy="steps", eval_steps=4, metric_for_best_model="loss", greater_is_better=False), 4),
        ("epoch", dict(num_train_epochs=2), 12),
    ):
        out = tmp_path / strategy
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=6 if strategy == "best" else -1,
            per_device_train_batch_size=BATCH,
            logging_steps=2,
            report_to=[],
            use_cpu=True,
            save_strategy=strategy,
            seed=0,
            disable_tqdm=True,
            **extra,
        )
        callback = ESSCallback(every_n_steps=2, indices=INDICES, sinks=[lambda r: None], background=background)
        data = dataset(24)  # 6 steps per epoch
        Trainer(model=llama(), args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[callback]).train()
        saved = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["stateful_callbacks"]
        assert saved[STATE_KEY]["samples"] == step // 2 and saved[STATE_KEY]["failures"] == 0, strategy


class GenerateOnLog(TrainerCallback):
    """Test-only: a sample-logging callback that calls generate() on the model, left in training mode, every time
    the Trainer logs (after a step ends: the next step is already armed)."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def on_log(self, args, state, control, **kwargs):
        prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(state.global_step))
        self.model.generate(prompt, max_new_tokens=3, do_sample=False)
        self.calls += 1


def test_generate_between_steps_is_not_measured_in_place_of_the_training_forward(tmp_path):
    """Regression: generate() on the model in training mode (a callback logging samples) ran the next sampled
    step's first forward, which was measured (L = 5 prompts) instead of the training batch, with a decoding
    warning. A forward with gradients takes precedence: every value equals the NumPy reference of the step's
    own training batch, and no decoding warning is raised."""
    model = llama()
    snap = Snapshot(model, [2, 4, 6])
    gen = GenerateOnLog(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tmp_path, model, [snap, gen, ESSCallback(every_n_steps=2, indices=INDICES)], logging_steps=1)
    snap.handle.remove()
    assert gen.calls >= 5
    assert not [w for w in caught if "decoding" in str(w.message) or "prefill" in str(w.message)]
    hist = ess_history(trainer)
    assert sorted(hist) == [2, 4, 6]
    for step in hist:
        ref = reference_avg(snap.params[step], snap.inputs[step])
        for layer in LLAMA_LAYERS:
            assert hist[step][f"ess/entropy/avg/{layer}"] == pytest.approx(ref[layer], rel=1e-4), (step, layer)


@pytest.mark.parametrize("kind", ["eager", "sdpa", "mamba"])
def test_rows_that_are_all_padding_are_left_out_of_the_measurement_and_the_penalty(kind):
    """Regression: a kept batch row that is all padding (an empty document) has a zero operator, so it was
    measured as ESS 0 at every index: it lowered the step's averages, and a batch of such rows logged ESS 0 that
    `esswatch report` read as collapse. Such rows are now left out (a batch of them is skipped silently, like
    L = 1): the result equals the watch's on the batch without them, and for attention the NumPy reference of the
    eager attention probabilities of the real rows; the penalty too."""
    model = mamba() if kind == "mamba" else llama(kind)
    names = MAMBA_LAYERS if kind == "mamba" else LLAMA_LAYERS
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=g)
    am = torch.ones(3, SEQ, dtype=torch.long)
    am[1] = 0  # all padding
    am[2, :5] = 0  # left padding

    def measure(rows, regularizer=None):
        watch = ESSWatch(model, every_n_steps=1, batch_rows=None, indices=INDICES, regularizer=regularizer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(ids[rows], attention_mask=am[rows])
            p = watch.penalty() if regularizer else None
            r = watch.step()
        watch.close()
        assert watch.failures == 0 and not [w for w in caught if issubclass(w.category, ESSWarning)]
        return r, p

    got, _ = measure([0, 1, 2])
    ref, _ = measure([0, 2])
    for name in names:
        assert got["layers"][name]["rows"] == 2
        assert got["layers"][name]["entropy"]["avg"] == pytest.approx(ref["layers"][name]["entropy"]["avg"], rel=1e-6)
    if kind == "eager":
        with torch.no_grad():
            att = model(ids[[0, 2]], attention_mask=am[[0, 2]], output_attentions=True).attentions
        for name, a in zip(names, att):
            a = a.double().clone()
            a[1, :, :5, :] = 0  # the padded positions of the left-padded row: zero rows and columns of the operator
            a[1, :, :, :5] = 0  # (eager's output_attentions spreads a fully masked query row uniformly instead)
            want = float(entropy_ess_ref(a.numpy(), INDICES).mean())
            assert got["layers"][name]["entropy"]["avg"] == pytest.approx(want, rel=1e-4)
    assert measure([1])[0] is None  # nothing to measure: skipped silently
    if kind != "mamba":
        (_, p_got), (_, p_ref) = measure([0, 1, 2], 1.0), measure([0, 2], 1.0)
        assert float(p_got) == pytest.approx(float(p_ref), rel=1e-6) and p_got.requires_grad
        assert measure([1], 1.0)[1] == 0.0
