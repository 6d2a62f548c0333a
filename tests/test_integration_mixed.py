"""One logdir, every kind of run: a real Hugging Face ``Trainer`` run, a real Lightning run,
a plain ``ESSWatch`` loop, and a run whose ESS tags carry the Trainer's ``train/`` prefix
(what ``Trainer.log`` makes of them, e.g. runs of earlier esswatch versions).

``esswatch report --json`` must list the per-layer ESS of every run (checked against
TensorBoard's ``EventAccumulator``), and the custom-scalars layout in the event files must
chart the ESS tags of every run: read and merged by TensorBoard's own custom-scalars plugin
(``layout_impl``) over a ``plugin_event_multiplexer``, its regular expressions applied by the
plugin's own ``scalars_impl``, compared with the tags selected by plain string tests.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from esswatch.integrations.lightning import ESSCallback as LightningESS  # noqa: E402
from esswatch.integrations.transformers import ESSCallback as TrainerESS  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tensorboard import context as tb_context  # noqa: E402
from tensorboard.backend.event_processing import data_provider  # noqa: E402
from tensorboard.backend.event_processing import plugin_event_multiplexer as pem  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins import base_plugin  # noqa: E402
from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin  # noqa: E402
from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import esswatch  # noqa: E402
from esswatch.cli import main  # noqa: E402
from esswatch.layers import SequenceModel  # noqa: E402

STATS = ("avg", "max", "total", "utilization")
VOCAB = 32
HF_LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
PL_LAYERS = ["model.blocks.0.mixer", "model.blocks.1.mixer"]
PLAIN_LAYERS = ["blocks.0.mixer", "blocks.1.mixer"]


def hf_run(out):
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
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": x, "labels": x.clone()} for x in (torch.randint(0, VOCAB, (16,), generator=g) for _ in range(16))
    ]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-2,
        seed=0,
    )
    Trainer(
        model=transformers.LlamaForCausalLM(cfg),
        args=args,
        train_dataset=data,
        callbacks=[TrainerESS(every_n_steps=2, images=False)],
    ).train()


class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = SequenceModel(VOCAB, d_model=16, n_layers=2, mixer="gla", n_heads=2)

    def training_step(self, x, batch_idx):
        loss = nn.functional.cross_entropy(self.model(x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lightning_run(logdir):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader([torch.randint(0, VOCAB, (12,), generator=g) for _ in range(16)], batch_size=4)
    L.Trainer(
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(logdir), name="lightning"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=2,
        callbacks=[LightningESS(every_n_steps=2, images=False)],
    ).fit(TinyLM(), data)


def plain_run(logdir):
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=16, n_layers=2, mixer="attention", n_heads=2)
    with esswatch.ESSWatch(model, logdir=str(logdir), every_n_steps=2, images=False) as watch:
        for _ in range(4):
            model(torch.randint(0, VOCAB, (2, 10)))
            watch.step()


def prefixed_run(logdir, source):
    """The ESS scalars of ``source`` (another run) rewritten as the Trainer's report_to writes them."""
    ea = EventAccumulator(str(source), size_guidance={"scalars": 0})
    ea.Reload()
    w = SummaryWriter(str(logdir))
    for tag in ea.Tags()["scalars"]:
        if tag.startswith("ess/"):
            for e in ea.Scalars(tag):
                w.add_scalar("train/" + tag, e.value, e.step)
    w.close()


def scalars_of(run_dir):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    hf_run(root / "hf")
    lightning_run(root)
    plain_run(root / "plain")
    prefixed_run(root / "legacy", root / "plain")
    return root


def run_dirs(root):
    return sorted(
        os.path.relpath(d, root)
        for d, _, files in os.walk(root)
        if any(f.startswith("events.out.tfevents") for f in files)
    )


def test_report_lists_the_per_layer_ess_of_every_run(logdir, capsys):
    dirs = run_dirs(logdir)
    (hf_dir,) = [d for d in dirs if d.startswith("hf")]
    expected = {
        hf_dir: ("", HF_LAYERS),
        "legacy": ("train/", PLAIN_LAYERS),
        "lightning/version_0": ("", PL_LAYERS),
        "plain": ("", PLAIN_LAYERS),
    }
    assert sorted(dirs) == sorted(expected)
    assert main(["report", str(logdir), "--json"]) == 0
    runs = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(runs) == sorted(expected)
    for run, (prefix, layers) in expected.items():
        r = runs[run]
        assert r["prefix"] == prefix and r["corrupt"] == []
        table = r["metrics"]["entropy"]
        assert list(table) == layers + ["model"]
        ea = scalars_of(logdir / run)
        for layer in layers + ["model"]:
            for stat in STATS:
                events = ea.Scalars(f"{prefix}ess/entropy/{stat}/{layer}")
                assert table[layer][stat] == events[-1].value
                assert table[layer]["step"] == events[-1].step
    assert runs[hf_dir]["metrics"]["entropy"]["model"]["step"] == 4  # the Trainer's numbering
    assert runs["lightning/version_0"]["metrics"]["entropy"]["model"]["step"] == 3  # Lightning's


def _plugin(root):
    mux = pem.EventMultiplexer()
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    ctx = base_plugin.TBContext(
        data_provider=data_provider.MultiplexerDataProvider(mux, str(root)),
        logdir=str(root),
        multiplexer=mux,
        plugin_name_to_instance={},
    )
    ctx.plugin_name_to_instance["scalars"] = ScalarsPlugin(ctx)
    return CustomScalarsPlugin(ctx), mux, ctx.data_provider


def test_the_custom_scalars_layout_charts_the_ess_tags_of_every_run(logdir):
    plugin, mux, provider = _plugin(logdir)
    runs = sorted(mux.Runs())
    assert len(runs) == 4
    with_layout = [r for r in runs if "custom_scalars__config__" in mux.Runs()[r].get("tensors", [])]
    assert sorted(with_layout) == sorted(r for r in runs if r != "legacy")  # every esswatch-written run
    ctx = tb_context.RequestContext()
    layout = plugin.layout_impl(ctx, "")
    layout = json.loads(layout) if isinstance(layout, str) else layout
    (category,) = layout["category"]  # the runs' layouts merged into one
    charts = {c["title"]: c["multiline"]["tag"] for c in category["chart"]}
    assert sorted(charts) == sorted([f"entropy-ESS {s}, all layers" for s in STATS] + ["failures"])
    all_tags = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
    for run in runs:
        tags = set(all_tags[run])
        assert tags == set(scalars_of(logdir / run).Tags()["scalars"])  # the same run through both readers
        for title, (regex,) in charts.items():
            key = "failures" if title == "failures" else f"entropy/{title.split()[1].rstrip(',')}/"
            want = {t for t in tags if t.startswith(f"ess/{key}") or f"/ess/{key}" in t}
            got = set(plugin.scalars_impl(ctx, run, regex, "")["tag_to_events"])
            assert want and got == want, (run, title)
