"""The ``esswatch`` command: demo writes real event files, report prints their values,
profile's CSV matches an independent SVD of the captured operators."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from esswatch.cli import main
from esswatch.demo.progress import Progress
from esswatch.demo.run import DEMO_DEFAULTS

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

DEMO_STEPS, DEMO_EVERY = 7, 3
LAYERS = ["blocks.0.mixer", "blocks.1.mixer"]


def _scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: acc.Scalars(t) for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(
            [
                "demo",
                "--steps",
                str(DEMO_STEPS),
                "--every",
                str(DEMO_EVERY),
                "--width",
                "32",
                "--logdir",
                str(root / "demo"),
                "--run-name",
                "r",
                "--quiet",
                "--device",
                "cpu",
                "--threads",
                str(torch.get_num_threads()),
            ]
        )  # keep this process's thread count
    assert rc == 0
    return root, root / "demo" / "r", out.getvalue()


def test_demo_writes_ess_event_files(demo_run):
    root, run_dir, printed = demo_run
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    assert f"tensorboard --logdir {root / 'demo'}" in printed
    assert str(run_dir.resolve()) in printed
    sc = _scalars(run_dir)
    expected_steps = list(range(0, DEMO_STEPS, DEMO_EVERY))  # 0, 3, 6
    for layer in LAYERS + ["model"]:
        for stat in ("avg", "max", "total", "utilization"):
            ev = sc[f"ess/entropy/{stat}/{layer}"]
            assert [e.step for e in ev] == expected_steps
            assert all(math.isfinite(e.value) for e in ev)
    L = DEMO_DEFAULTS["seq_len"]
    for layer in LAYERS:
        for a, m, u in zip(
            sc[f"ess/entropy/avg/{layer}"], sc[f"ess/entropy/max/{layer}"], sc[f"ess/entropy/utilization/{layer}"]
        ):
            assert 0 < a.value <= m.value <= L // 2
            assert 0 < u.value <= 1
    # model-wide total = sum of the layer totals
    for j in range(len(expected_steps)):
        tot = sum(sc[f"ess/entropy/total/{layer}"][j].value for layer in LAYERS)
        assert sc["ess/entropy/total/model"][j].value == pytest.approx(tot, rel=1e-5)
    assert [e.step for e in sc["mqar/accuracy"]][-1] == DEMO_STEPS - 1
    assert all(0 <= e.value <= 1 for e in sc["mqar/accuracy"])


def test_report_prints_the_event_files_latest_values(demo_run, capsys):
    root, run_dir, _ = demo_run
    sc = _scalars(run_dir)
    assert main(["report", str(root), "--json", "--last", "2"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in runs] == ["demo/r"]  # found one level down
    table = runs[0]["metrics"]["entropy"]
    assert list(table) == LAYERS + ["model"]
    for layer, row in table.items():
        for stat in ("avg", "max", "total", "utilization"):
            assert row[stat] == sc[f"ess/entropy/{stat}/{layer}"][-1].value
        assert row["step"] == DEMO_STEPS - 1
        ev = sc[f"ess/entropy/avg/{layer}"]
        assert row["trend_avg"] == pytest.approx(ev[-1].value - ev[-2].value)

    assert main(["report", str(run_dir)]) == 0
    text = capsys.readouterr().out
    for layer in LAYERS + ["model"]:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(layer + " "))
        cells = line.split()
        assert cells[1] == str(DEMO_STEPS - 1)
        assert cells[2] == f"{sc[f'ess/entropy/avg/{layer}'][-1].value:.3f}"
        assert cells[4] == f"{sc[f'ess/entropy/total/{layer}'][-1].value:.3f}"
        assert cells[5] == f"{sc[f'ess/entropy/utilization/{layer}'][-1].value:.3f}"
    assert "mqar/accuracy" in text


def test_report_on_one_event_file_reads_that_file(demo_run, capsys):
    """TensorBoard takes an event file's path as well as a folder's; so does the report (it said "no such
    directory" before). The values are the file's last ones."""
    _, run_dir, _ = demo_run
    sc = _scalars(run_dir)
    (event,) = [p for p in run_dir.iterdir() if p.name.startswith("events.out.tfevents")]
    assert main(["report", str(event), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    for layer, row in run["metrics"]["entropy"].items():
        assert row["avg"] == sc[f"ess/entropy/avg/{layer}"][-1].value and row["step"] == DEMO_STEPS - 1


def test_version_and_a_bad_window_are_one_line(capsys):
    from esswatch import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"esswatch {__version__}"
    with pytest.raises(SystemExit) as e:
        main(["report", ".", "--last", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--last" in err[0] and "allowed: an integer >= 2" in err[0]


def test_report_on_a_directory_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err


# -- profile ---------------------------------------------------------------------------------
WORDS = ["<unk>", "<s>", "</s>", ".", "the", "cat", "sat", "on", "mat", "dog", "ran", "a", "red", "ball"]


def _entropy_ess(s: np.ndarray) -> float:
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _reference(model_dir, ids, indices):
    """{layer: {i: ESS}} from np.linalg.svd of each captured operator's dense()[i:, :i], mean over heads."""
    from transformers import AutoModelForCausalLM

    import esswatch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad(), esswatch.capture(model) as cap:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    out = {}
    for name, op in cap.operators.items():
        T = op.dense().double().numpy().reshape(-1, len(ids), len(ids))
        out[name] = {
            i: float(np.mean([_entropy_ess(np.linalg.svd(T[h, i:, :i], compute_uv=False)) for h in range(T.shape[0])]))
            for i in indices
        }
    return out


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("llama")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(d)
    cfg = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_mamba(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("mamba")
    cfg = transformers.MambaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        transformers.MambaForCausalLM(cfg).save_pretrained(d)
    return d


def test_profile_llama_text_matches_svd_and_marks_delimiters(tiny_llama, tmp_path, capsys):
    text = "the cat sat on the mat . </s> the dog ran . </s> a red ball"
    out = tmp_path / "llama_profile"
    assert main(["profile", "--model", str(tiny_llama), "--text", text, "--delimiter", ".", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = _read_csv(out.with_suffix(".csv"))
    words = text.split()
    ids = [WORDS.index(w) for w in words]
    assert [int(r["token_id"]) for r in rows] == ids[:-1]  # one row per index 1..L-1
    assert [r["token"] for r in rows] == words[:-1]
    assert [int(r["position"]) for r in rows] == list(range(len(ids) - 1))
    # "." from --delimiter, "</s>" as the tokenizer's end-of-sequence token
    assert [r["delimiter"] == "1" for r in rows] == [w in (".", "</s>") for w in words[:-1]]
    layers = [c[4:-1] for c in rows[0] if c.startswith("ess[")]
    assert layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    ref = _reference(tiny_llama, ids, [1, 7, 12])
    for layer in layers:
        for i, v in ref[layer].items():
            assert float(rows[i - 1][f"ess[{layer}]"]) == pytest.approx(v, rel=1e-4)
    for r in rows:
        assert float(r["ess_mean"]) == pytest.approx(np.mean([float(r[f"ess[{n}]"]) for n in layers]), rel=1e-4)
    pytest.importorskip("matplotlib")
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_mamba_token_ids(tiny_mamba, tmp_path):
    ids = [4, 5, 6, 7, 4, 8, 3, 2, 4, 9, 10, 3, 2, 11, 12, 13]
    out = tmp_path / "mamba"
    assert (
        main(
            [
                "profile",
                "--model",
                str(tiny_mamba),
                "--tokens",
                *map(str, ids),
                "--delimiter-id",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _read_csv(out.with_suffix(".csv"))
    assert [int(r["token_id"]) for r in rows] == ids[:-1]
    assert [r["delimiter"] == "1" for r in rows] == [t in (2, 3) for t in ids[:-1]]  # 2 = config eos
    ref = _reference(tiny_mamba, ids, [2, 8, 14])
    assert sorted(ref) == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    for layer, vals in ref.items():
        for i, v in vals.items():
            assert float(rows[i - 1][f"ess[{layer}]"]) == pytest.approx(v, rel=1e-4)


def test_profile_text_needs_a_tokenizer(tiny_mamba, tmp_path, capsys):
    assert main(["profile", "--model", str(tiny_mamba), "--text", "the cat", "--out", str(tmp_path / "x")]) == 2
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("esswatch")]  # (and the weights' bar)
    assert len(ours) == 1 and "no tokenizer" in ours[0]


def test_progress_line_without_a_terminal():
    buf = io.StringIO()
    with Progress(20, "training", stream=buf) as bar:
        for _ in range(20):
            bar.update(1, loss=1.5)
    lines = buf.getvalue().splitlines()
    assert 2 <= len(lines) <= 11
    assert re.search(r"\[#{28}\] 20/20 .* loss 1\.5$", lines[-1])


def test_report_reads_a_lightning_tensorboard_logger_run(tmp_path, capsys):
    L = pytest.importorskip("lightning")
    from esswatch.integrations.lightning import ESSCallback
    from lightning.pytorch.loggers import TensorBoardLogger

    from esswatch.layers import SequenceModel

    class TinyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = SequenceModel(11, d_model=16, n_layers=2, mixer="gla", n_heads=2)

        def training_step(self, x, batch_idx):
            logits = self.model(x)
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), x[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader([torch.randint(0, 11, (12,), generator=g) for _ in range(24)], batch_size=4)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="lightning_logs")
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        callbacks=[ESSCallback(every_n_steps=2, images=False, histograms=False)],
    )
    trainer.fit(TinyLM(), data)
    assert main(["report", str(tmp_path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in runs] == ["lightning_logs/version_0"]
    sc = _scalars(tmp_path / "lightning_logs" / "version_0")
    table = runs[0]["metrics"]["entropy"]
    assert list(table) == ["model.blocks.0.mixer", "model.blocks.1.mixer", "model"]
    for layer, row in table.items():
        assert row["step"] == 3  # sampled at global steps 1, 3 (where Lightning logs the loss)
        assert row["utilization"] == sc[f"ess/entropy/utilization/{layer}"][-1].value
        assert row["avg"] == sc[f"ess/entropy/avg/{layer}"][-1].value


def test_console_script_runs_report(demo_run):
    """The installed ``esswatch`` entry point (pyproject ``[project.scripts]``), as a real process."""
    import shutil
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "esswatch"
    exe = str(exe) if exe.exists() else shutil.which("esswatch")
    if exe is None:
        pytest.skip("the esswatch console script is not installed")
    root, run_dir, _ = demo_run
    proc = subprocess.run([exe, "report", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    avg = _scalars(run_dir)["ess/entropy/avg/model"][-1].value
    assert re.search(rf"^\s+model\s+{DEMO_STEPS - 1}\s+{avg:.3f}\s", proc.stdout, re.M)
