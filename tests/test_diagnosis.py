"""Saturation / collapse diagnosis (esswatch.tools.diagnosis) and its lines in ``esswatch report``,
read back from real TensorBoard event files."""

from __future__ import annotations

import json
import math

import pytest

from esswatch.cli import main
from esswatch.tools.diagnosis import COLLAPSED_BELOW, SATURATED_AT, diagnose

SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter


@pytest.mark.parametrize(
    "u, label",
    [
        (1.0, "saturated"),
        (SATURATED_AT, "saturated"),
        (0.93, "saturated"),
        (SATURATED_AT - 1e-6, "intermediate"),
        (COLLAPSED_BELOW, "intermediate"),
        (COLLAPSED_BELOW - 1e-6, "collapsed"),
        (0.0, "collapsed"),
        (None, "unknown"),
        (float("nan"), "unknown"),
        (float("inf"), "unknown"),
    ],
)
def test_diagnose_labels_at_the_thresholds(u, label):
    got, advice = diagnose(u)
    assert got == label
    assert advice
    if label == "saturated":
        assert "more state" in advice
    if label == "collapsed":
        assert "training" in advice and "regularizer" in advice


def test_diagnose_custom_thresholds_and_bad_ones():
    assert diagnose(0.3, saturated_at=0.3)[0] == "saturated"
    assert diagnose(0.3, collapsed_below=0.4, saturated_at=0.6)[0] == "collapsed"
    with pytest.raises(ValueError, match="collapsed_below"):
        diagnose(0.3, saturated_at=0.2, collapsed_below=0.4)


UTIL = {"blocks.0.mixer": 0.81, "blocks.1.mixer": 0.07, "model": 0.33}


@pytest.fixture()
def run_dir(tmp_path):
    d = tmp_path / "logs" / "r"
    w = SummaryWriter(str(d))
    for step, scale in ((0, 0.5), (10, 1.0)):  # the report uses the latest point
        for layer, u in UTIL.items():
            w.add_scalar(f"ess/entropy/utilization/{layer}", u * scale, step)
            w.add_scalar(f"ess/entropy/avg/{layer}", 3.0, step)
    w.close()
    return tmp_path / "logs"


def test_report_prints_the_diagnosis_per_layer(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, ln in enumerate(lines) if "diagnosis from entropy-ESS utilization" in ln)
    diag = {ln.split()[0]: ln for ln in lines[start + 1 : start + 1 + len(UTIL)]}
    assert list(diag) == list(UTIL)  # layers in order, model last
    for layer, u in UTIL.items():
        label, advice = diagnose(u)
        assert f"util {u:.3f}" in diag[layer]
        assert f"{label}: {advice}" in diag[layer]
    assert [diagnose(u)[0] for u in UTIL.values()] == ["saturated", "collapsed", "intermediate"]


def test_report_json_has_the_diagnosis(run_dir, capsys):
    assert main(["report", str(run_dir), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert set(run["diagnosis"]) == set(UTIL)
    for layer, u in UTIL.items():
        d = run["diagnosis"][layer]
        assert math.isclose(d["utilization"], u, rel_tol=1e-6)  # float32 in the event file
        assert (d["label"], d["advice"]) == diagnose(d["utilization"])
