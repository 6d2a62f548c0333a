"""``examples/mqar/study.py --quick``: the files it writes (schema, finite numbers), its statistics against
independent references, its diagnosis column, and that a run reproduces its row exactly."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from esswatch.tools.diagnosis import diagnose

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def _load_study():
    spec = importlib.util.spec_from_file_location("mqar_study", ROOT / "examples" / "mqar" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study = _load_study()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    logs = out / "logs"
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    assert study.main(["--quick", "--out", str(out), "--logdir", str(logs)]) == 0
    assert study.main(["--quick", "--regularizer", "--out", str(out), "--logdir", str(logs)]) == 0
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (n, det)  # restored
    return out, logs


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _ranks_ref(x):
    """Average ranks by counting (independent of the study's argsort-based ranks)."""
    x = list(x)
    return [sum(v < a for v in x) + (sum(v == a for v in x) + 1) / 2 for a in x]


def test_results_schema_and_finite_numbers(quick):
    out, _ = quick
    rows = _csv(out / "results.csv")
    sweep = study.SWEEPS["quick"]
    assert list(rows[0]) == study.FIELDS
    assert len(rows) == len(study.plan(sweep, study.MIXER_ORDER)) == 10
    assert {r["mixer"] for r in rows} == set(study.MIXER_ORDER)
    for r in rows:
        for k in study.FIELDS:
            if k not in study.STR_FIELDS:
                assert math.isfinite(float(r[k])), (k, r)
        assert 0 <= float(r["accuracy"]) <= 1
        assert float(r["ess"]) > 0 and float(r["tss"]) > 0 and float(r["utilization"]) > 0
        kv = int(r["num_kv"])
        assert float(r["ess_per_kv"]) == pytest.approx(float(r["ess"]) / kv, rel=1e-5)
        assert float(r["tss_per_kv"]) == pytest.approx(float(r["tss"]) / kv, rel=1e-5)
        # the diagnosis column is diagnose(utilization) for a failed run, "-" otherwise
        expected = diagnose(float(r["utilization"]))[0] if float(r["accuracy"]) < study.FAIL_BELOW else "-"
        assert r["diagnosis"] == expected
    assert (out / "plot.png").stat().st_size > 1000
    assert not list(out.glob("results.shard*.csv"))


def test_correlations_match_independent_references(quick):
    out, _ = quick
    rows = study.read_rows(out / "results.csv")
    acc = np.array([r["accuracy"] for r in rows])
    text = (out / "results.md").read_text()
    for key in ("ess_per_kv", "tss_per_kv"):
        v = np.array([r[key] for r in rows])
        assert study.pearson(acc, v) == pytest.approx(np.corrcoef(acc, v)[0, 1], abs=1e-12)
        rs = study.spearman(acc, v)
        assert rs == pytest.approx(np.corrcoef(_ranks_ref(acc), _ranks_ref(v))[0, 1], abs=1e-12)
        lo, hi, kept = study.bootstrap_ci(acc, v, study.spearman)
        assert lo <= hi and kept > 0.9 * study.BOOTSTRAP
    c = study.correlations(rows)
    e, t, d = c["ess_per_kv"], c["tss_per_kv"], c["difference"]
    ess, tss = [r["ess_per_kv"] for r in rows], [r["tss_per_kv"] for r in rows]
    assert d["spearman"] == pytest.approx(study.spearman(acc, ess) - study.spearman(acc, tss), abs=1e-12)
    assert d["pearson_lo"] <= d["pearson_hi"]
    line = next(ln for ln in text.splitlines() if ln.startswith("| all |"))
    assert line == (
        f"| all | {len(rows)} | {study._ci(e, 'pearson')} | {study._ci(t, 'pearson')} | "
        f"{study._ci(d, 'pearson')} | {study._ci(e, 'spearman')} | {study._ci(t, 'spearman')} | "
        f"{study._ci(d, 'spearman')} |"
    )
    assert "## Failed runs" in text and "## Runs" in text


def test_ties_get_average_ranks():
    assert list(study.ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]
    assert study.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(
        np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3.5, 3.5])[0, 1]
    )


def test_regularizer_file(quick):
    out, _ = quick
    rows = _csv(out / "regularizer.csv")
    rc = study.SWEEPS["quick"]["regularizer"]
    assert list(rows[0]) == study.REG_FIELDS
    assert sorted((int(r["seed"]), float(r["weight"])) for r in rows) == sorted(
        (s, w) for s in rc["seeds"] for w in (0.0, rc["weight"])
    )
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in study.REG_FIELDS)
    on = {int(r["seed"]): r for r in rows if float(r["weight"]) > 0}
    off = {int(r["seed"]): r for r in rows if float(r["weight"]) == 0}
    assert any(on[s]["accuracy"] != off[s]["accuracy"] or on[s]["ess"] != off[s]["ess"] for s in on)  # it acts
    text = (out / "regularizer.md").read_text()
    assert "Accuracy with minus without, per seed" in text and "seconds per step with / without" in text
    cost = _csv(out / "regularizer_cost.csv")
    assert sorted((int(c["repeat"]), float(c["weight"])) for c in cost) == sorted(
        (r, w) for r in range(5) for w in (0.0, rc["weight"])
    )
    assert all(0 < float(c["seconds_per_step"]) < 60 for c in cost)
    assert "Regularized / plain step time: median" in text


def test_a_run_reproduces_its_row(quick, tmp_path):
    out, _ = quick
    row = study.read_rows(out / "results.csv")[0]
    sweep = study.SWEEPS["quick"]
    mixer, c, seed = study.plan(sweep, study.MIXER_ORDER)[0]
    with torch.inference_mode(False):
        torch.use_deterministic_algorithms(True)
        try:
            again = study.run_one(study.train_config(mixer, c, seed, sweep), tmp_path, "cpu")
        finally:
            torch.use_deterministic_algorithms(False)
    for k in ("accuracy", "loss", "ess", "tss", "utilization"):
        assert float(f"{again[k]:.6g}") == row[k], k
