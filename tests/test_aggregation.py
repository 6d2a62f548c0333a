"""Aggregation (:mod:`esswatch.watch.measure`, ``docs/ess.md`` section 3): ``measure_operator`` and
``aggregate_model`` against avg / max / total / utilization computed by hand from per-index
NumPy SVD entropies of ``T[b, h, i:, :i]``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import entropy_ess_ref, tolerance_ess_ref

from esswatch.operators import Dense, GatedRecurrence, SoftmaxAttention
from esswatch.watch.measure import MeasureConfig, aggregate_model, measure_operator

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _reference(T: np.ndarray, idx, tss_cap, value_dim, metric="entropy", tol=1e-3, relative=True):
    """The statistics of one layer by hand: ``E[b, h, i]`` from NumPy SVDs (the last batch dim is
    the head dim, all before it rows; no batch dim = one head of one row)."""
    if metric == "entropy":
        e = entropy_ess_ref(T, idx)
    else:
        e = tolerance_ess_ref(T, idx, tol, relative)
    e = e.reshape(-1, *e.shape[-2:]) if e.ndim >= 2 else e[None, None, :]
    if e.ndim == 2:
        e = e[None]
    L = T.shape[-1]
    tss = np.array([min(i, L - i) if tss_cap is None else min(i, L - i, tss_cap) for i in idx], dtype=float)
    rows, heads, n = e.shape
    per_index = [np.mean([e[b, h, j] for b in range(rows) for h in range(heads)]) for j in range(n)]
    return {
        "avg": float(np.mean(e)),
        "max": float(max(per_index)),
        "total": float(
            np.mean([value_dim * sum(e[b, h, j] for h in range(heads)) for b in range(rows) for j in range(n)])
        ),
        "utilization": float(
            np.mean([e[b, h, j] / tss[j] for b in range(rows) for h in range(heads) for j in range(n)])
        ),
        "per_index": per_index,
        "per_head": [np.mean([e[b, h, j] for b in range(rows) for j in range(n)]) for h in range(heads)],
    }, tss


def _check(stats, ref, rtol=1e-6):
    for key in ("avg", "max", "total", "utilization"):
        np.testing.assert_allclose(stats[key], ref[key], rtol=rtol, err_msg=key)
    np.testing.assert_allclose(stats["per_index"], ref["per_index"], rtol=rtol)
    np.testing.assert_allclose(stats["per_head"], ref["per_head"], rtol=rtol)


IDX = [1, 3, 6, 9, 11]


@pytest.mark.parametrize("case", ["softmax", "softmax_window", "gla"])
def test_measure_operator_matches_numpy_statistics(case):
    L = 12
    q, k = _rand(2, 3, L, 4, seed=1), _rand(2, 3, L, 4, seed=2)  # 2 rows, 3 heads
    if case == "softmax":
        op, cap = SoftmaxAttention(q, k, value_dim=5), None
    elif case == "softmax_window":
        op, cap = SoftmaxAttention(q, k, window=3, value_dim=5), 3
    else:
        ld = -torch.rand(2, 3, L, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
        op, cap = GatedRecurrence(q, k, ld, value_dim=5), 4
    cfg = MeasureConfig(indices=IDX, estimator="exact", metrics=("entropy", "tolerance"))
    out = measure_operator(op, cfg)
    T = op.dense().numpy()
    assert out["indices"] == IDX and out["rows"] == 2 and out["heads"] == 3
    assert out["seq_len"] == L and out["value_dim"] == 5 and out["state_size"] == cap
    for metric in ("entropy", "tolerance"):
        ref, tss = _reference(T, IDX, cap, 5, metric)
        _check(out[metric], ref)
        assert out["tss"] == tss.tolist()


def test_measure_operator_one_head_and_probe_tss():
    # no batch dims: one head of one row; the probe's tss applies when the operator has none
    L = 10
    T = torch.tril(_rand(L, L, seed=4))
    out = measure_operator(Dense(T), MeasureConfig(indices="all", estimator="exact"), tss=2)
    ref, tss = _reference(T.numpy(), list(range(1, L)), 2, 1)
    _check(out["entropy"], ref)
    assert out["rows"] == 1 and out["heads"] == 1 and out["state_size"] == 2
    assert out["tss"] == tss.tolist() and max(out["tss"]) == 2
    # the operator's own state size wins over the probe's
    out = measure_operator(Dense(T, state_size=3), MeasureConfig(indices="all", estimator="exact"), tss=2)
    assert out["state_size"] == 3 and max(out["tss"]) == 3


def test_aggregate_model_over_layers_by_hand():
    L = 12
    q, k = _rand(2, L, 4, seed=5), _rand(2, L, 4, seed=6)
    ops = {
        "attn": SoftmaxAttention(q, k, value_dim=2),
        "rec": GatedRecurrence(q, k, -torch.rand(2, L, 4, generator=torch.Generator().manual_seed(7), dtype=F64)),
        "win": SoftmaxAttention(q, k, window=4),
    }
    cfg = MeasureConfig(indices=IDX, estimator="exact", metrics=("entropy", "tolerance"))
    layers = {name: measure_operator(op, cfg) for name, op in ops.items()}
    del layers["win"]["tolerance"]  # a layer without one metric is left out of it
    refs = {
        name: {
            m: _reference(op.dense().numpy(), IDX, op.state_size, op.value_dim, m)[0] for m in ("entropy", "tolerance")
        }
        for name, op in ops.items()
    }
    model = aggregate_model(layers, ["entropy", "tolerance"])
    assert set(model) == {"entropy", "tolerance"}
    for m, names in (("entropy", ["attn", "rec", "win"]), ("tolerance", ["attn", "rec"])):
        vals = [refs[n][m] for n in names]
        np.testing.assert_allclose(model[m]["avg"], np.mean([v["avg"] for v in vals]), rtol=1e-6)
        np.testing.assert_allclose(model[m]["max"], max(v["max"] for v in vals), rtol=1e-6)
        np.testing.assert_allclose(model[m]["total"], sum(v["total"] for v in vals), rtol=1e-6)
        np.testing.assert_allclose(model[m]["utilization"], np.mean([v["utilization"] for v in vals]), rtol=1e-6)
        assert set(model[m]) == {"avg", "max", "total", "utilization"}
    assert aggregate_model({}, ["entropy"]) == {}
    assert aggregate_model({"win": layers["win"]}, ["tolerance"]) == {}
