"""``esswatch report`` on event files written by TensorBoard's own writer: tag prefixes
(Trainer-style ``train/ess/...``), strict JSON, the ``--last`` window, corrupt files.
Expected values come from the values written, read back by ``EventAccumulator``."""

from __future__ import annotations

import json
import math
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from esswatch.cli import main
from esswatch.watch.tags import STATS, parse_tag

LAYERS = ("blocks.0.mixer", "blocks.1.mixer")


def write_run(path, prefix="", steps=(0, 5, 10), nan_at=None, extra=None):
    """A run with ESS scalars of two layers and the model (value = step + layer index + stat index / 10)."""
    w = SummaryWriter(str(path))
    for s in steps:
        for j, layer in enumerate(LAYERS + ("model",)):
            for i, stat in enumerate(STATS):
                v = s + j + i / 10
                if nan_at == (s, layer, stat):
                    v = float("nan")
                w.add_scalar(f"{prefix}ess/entropy/{stat}/{layer}", v, s)
        w.add_scalar(f"{prefix}ess/failures", 0.0, s)
        w.add_scalar(f"{prefix}loss", 1.0 / (s + 1), s)
        for tag, v in (extra or {}).items():
            w.add_scalar(tag, v, s)
    w.close()
    return path


def strict_loads(text):
    def bad(c):
        raise ValueError(f"non-strict JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def report_json(capsys, *args):
    code = main(["report", *map(str, args), "--json"])
    return code, strict_loads(capsys.readouterr().out)


def test_parse_tag_is_the_inverse_of_the_tag_builders():
    from esswatch.watch.tags import FAILURES_TAG, SECONDS_TAG, scalar_tags

    result = {
        "metrics": ["entropy"],
        "failures": 2,
        "seconds": 0.5,
        "layers": {"a.b": {"entropy": {s: 1.0 for s in STATS}}, "": {"entropy": {s: 2.0 for s in STATS}}},
        "model": {"entropy": {s: 3.0 for s in STATS}},
    }
    for prefix in ("", "train/", "x/y/"):
        parsed = {t: parse_tag(prefix + t) for t in scalar_tags(result)}
        assert all(p is not None and p.prefix == prefix for p in parsed.values())
        stats = {(p.metric, p.stat, p.layer) for p in parsed.values() if p.kind == "stat"}
        assert stats == {("entropy", s, n) for s in STATS for n in ("a.b", "root", "model")}
        assert parsed[FAILURES_TAG].kind == "failures" and parsed[SECONDS_TAG].kind == "seconds"
    assert parse_tag("ess/penalty/total").kind == "penalty"
    for other in ("train/loss", "ess_heads/entropy/a", "esswatch/config", "ess/entropy/median/a", "xess/failures"):
        assert parse_tag(other) is None


def test_trainer_style_prefixed_tags_are_reported(tmp_path, capsys):
    """Regression: a run with train/ess/... tags (the Trainer's report_to TensorBoard) used to
    give "no ESS scalars" and empty metrics."""
    write_run(tmp_path / "hf", prefix="train/")
    write_run(tmp_path / "plain")
    code, runs = report_json(capsys, tmp_path)
    assert code == 0
    assert [(r["run"], r["prefix"]) for r in runs] == [("hf", "train/"), ("plain", "")]
    for r in runs:
        table = r["metrics"]["entropy"]
        assert list(table) == list(LAYERS) + ["model"]
        for j, layer in enumerate(LAYERS + ("model",)):
            assert table[layer]["step"] == 10
            for i, stat in enumerate(STATS):
                assert table[layer][stat] == pytest.approx(10 + j + i / 10)
        assert r["failures"] == 0
    assert "train/loss" in runs[0]["other"]
    assert main(["report", str(tmp_path / "hf")]) == 0
    text = capsys.readouterr().out
    assert "tags under train/" in text and "not an ESSWatch run" not in text


def test_a_run_with_two_prefixes_gives_one_report_per_prefix(tmp_path, capsys):
    path = write_run(tmp_path / "r", prefix="train/")
    write_run(path, steps=(20,))
    code, runs = report_json(capsys, tmp_path)
    assert [(r["prefix"], r["metrics"]["entropy"]["model"]["step"]) for r in runs] == [("", 20), ("train/", 10)]


def test_json_is_strict_nan_becomes_null(tmp_path, capsys):
    """Regression: --json wrote bare NaN (rejected by strict parsers)."""
    write_run(tmp_path / "r", nan_at=(10, LAYERS[0], "avg"))
    code, runs = report_json(capsys, tmp_path, "--last", "2")
    assert code == 0
    row = runs[0]["metrics"]["entropy"][LAYERS[0]]
    assert row["avg"] is None and row["trend_avg"] is None  # NaN - x is NaN too
    assert row["max"] == pytest.approx(10.1)
    assert main(["report", str(tmp_path)]) == 0  # the table shows "-"
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(LAYERS[0]))
    assert line.split()[2] == "nan"


@pytest.mark.parametrize("bad", ["0", "-3", "1", "two", "2.5"])
def test_last_must_be_an_integer_of_at_least_two(tmp_path, capsys, bad):
    """Regression: --last 0 / -3 ended in a traceback."""
    write_run(tmp_path / "r")
    try:
        code = main(["report", str(tmp_path), "--last", bad])
    except SystemExit as e:  # argparse's own type check ("two", "2.5")
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "--last" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln.lower() or "must be" in ln]) == 1


def test_last_two_is_accepted(tmp_path, capsys):
    write_run(tmp_path / "r")
    code, runs = report_json(capsys, tmp_path, "--last", "2")
    assert code == 0 and runs[0]["metrics"]["entropy"]["model"]["trend_avg"] == pytest.approx(5.0)


def _event_file(run):
    (f,) = [f for f in os.listdir(run) if f.startswith("events.out.tfevents")]
    return os.path.join(run, f)


def test_a_corrupt_event_file_is_named_and_what_was_read_is_reported(tmp_path, capsys):
    """Regression: a damaged record made the report silently drop the rest (or say "not an
    ESSWatch run?"). Flip one byte in the record of a step-10 value: the report names the file
    and reports the values read before it (step 5)."""
    run = write_run(tmp_path / "r")
    path = _event_file(run)
    data = bytearray(open(path, "rb").read())
    needle = b"ess/entropy/avg/blocks.0.mixer"
    pos = [i for i in range(len(data)) if data.startswith(needle, i)][2]  # the third write: step 10
    data[pos + len(needle) + 3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    ea = EventAccumulator(str(run))
    ea.Reload()
    read_back = [e.step for e in ea.Scalars("ess/entropy/avg/model")]
    assert read_back == [0, 5]  # TensorBoard itself stops there, silently

    code, runs = report_json(capsys, tmp_path)
    assert code == 0
    (c,) = runs[0]["corrupt"]
    assert c["file"] == os.path.relpath(path, tmp_path) and "checksum" in c["error"]
    assert runs[0]["metrics"]["entropy"]["model"]["step"] == 5
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"corrupt event file: {os.path.relpath(path, tmp_path)}" in text


def test_a_garbage_event_file_is_reported_as_corrupt(tmp_path, capsys):
    run = tmp_path / "junk"
    run.mkdir()
    (run / "events.out.tfevents.1.host").write_bytes(os.urandom(200))
    code, runs = report_json(capsys, tmp_path)
    assert code == 1 and runs[0]["metrics"] == {}
    assert runs[0]["corrupt"][0]["file"] == "junk/events.out.tfevents.1.host"
    main(["report", str(tmp_path)])
    out = capsys.readouterr().out
    assert "corrupt event file: junk/events.out.tfevents.1.host" in out


def test_a_cut_off_event_file_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "r")
    path = _event_file(run)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-7])
    code, runs = report_json(capsys, tmp_path)
    assert code == 0 and "incomplete last record" in runs[0]["corrupt"][0]["error"]
    assert math.isfinite(runs[0]["metrics"]["entropy"]["model"]["avg"])


def test_damage_in_the_first_of_two_event_files(tmp_path, capsys):
    """A run resumed into a second event file: damage in the first one is named, and the later
    file's values are still reported."""
    import logging

    run = tmp_path / "r"
    write_run(run, steps=(0, 5, 10))
    (first,) = [run / f for f in os.listdir(run)]
    write_run(run, steps=(15, 20))
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    tb_logger = logging.getLogger("tensorboard")
    before = (tb_logger.level, tb_logger.propagate, list(tb_logger.handlers))
    code, runs = report_json(capsys, tmp_path)
    assert (tb_logger.level, tb_logger.propagate, list(tb_logger.handlers)) == before  # logging left as found
    assert code == 0
    assert [c["file"] for c in runs[0]["corrupt"]] == [os.path.relpath(first, tmp_path)]
    assert runs[0]["metrics"]["entropy"]["model"]["step"] == 20
