"""The command line under bad input (issue 11 item 10): one line on stderr naming the argument and
what is allowed, exit status 2, nothing created. Each case ended in a traceback, a silent default
or an empty run folder before the fix."""

from __future__ import annotations

import pytest
import torch

from esswatch.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        rc = main(argv)
        raise SystemExit(rc)
    err = capsys.readouterr().err
    return ei.value.code, err


def tree(p):
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


@pytest.mark.parametrize(
    "flags, what",
    [
        (["--steps", "-1"], "--steps"),
        (["--steps", "0"], "--steps"),
        (["--steps", "x"], "--steps"),
        (["--every", "-5"], "--every"),
        (["--every", "0"], "--every"),
        (["--threads", "-1"], "--threads"),
        (["--threads", "0"], "--threads"),
        (["--width", "30"], "--width"),
        (["--width", "0"], "--width"),
        (["--width", "-4"], "--width"),
        (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
        (["--device", "banana"], "--device"),
        (["--device", "meta"], "--device"),
        (["--seed", "-1"], "--seed"),
        (["--run-name", "a/b"], "--run-name"),
    ],
)
def test_demo_bad_flags_exit_2_with_one_line_and_create_nothing(flags, what, tmp_path, capsys):
    logdir = tmp_path / "runs"
    code, err = run(["demo", "--logdir", str(logdir), "--quiet", *flags], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and "allowed" in lines[0] and "Traceback" not in err
    assert not logdir.exists()


def test_demo_bad_logdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(["demo", "--logdir", str(blocker / "runs"), "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--logdir" in err and "not a directory" in err
    assert tree(tmp_path) == ["file"]


def test_run_demo_rejects_bad_every_before_creating_anything(tmp_path):
    from esswatch.demo.run import run_demo

    for bad in (-5, 0, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            run_demo(steps=3, every_n_steps=bad, logdir=str(tmp_path / "runs"), progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _profile(model, out, *extra):
    return ["profile", "--model", str(model), "--tokens", "1", "2", "3", "4", "--out", str(out), *extra]


def test_profile_garbage_config(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    code, err = run(_profile(d, tmp_path / "o" / "p"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--model" in err and "config" in err
    assert not (tmp_path / "o").exists()


def test_profile_config_without_weights(tiny_llama, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama / "config.json").read_text())
    code, err = run(_profile(d, tmp_path / "o" / "p"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no weights" in err
    assert not (tmp_path / "o").exists()


def test_profile_out_of_vocabulary_id(tiny_llama, tmp_path, capsys):
    code, err = run(
        ["profile", "--model", str(tiny_llama), "--tokens", "1", "99", "--out", str(tmp_path / "o" / "p")], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--tokens" in err and "0 .. 15" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, what", [(["--device", "banana"], "--device"), (["--max-length", "0"], "--max-length")])
def test_profile_bad_device_or_length(tiny_llama, tmp_path, capsys, extra, what):
    code, err = run(_profile(tiny_llama, tmp_path / "o" / "p", *extra), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and what in err
    assert not (tmp_path / "o").exists()


def test_profile_bad_out(tiny_llama, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(_profile(tiny_llama, blocker / "p"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err
    (tmp_path / "dir.csv").mkdir()
    code, err = run(_profile(tiny_llama, tmp_path / "dir"), capsys)
    assert code == 2 and "--out" in err and "is a directory" in err
    assert tree(tmp_path) == ["dir.csv", "file"]


def test_profile_corrupt_weights_one_line(tiny_llama, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"garbage")
    code, err = run(_profile(d, tmp_path / "o" / "p"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot profile" in err
    assert not (tmp_path / "o").exists()


def test_profile_still_works(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o" / "p"
    assert main(_profile(tiny_llama, out)) == 0
    assert out.with_suffix(".csv").is_file()
