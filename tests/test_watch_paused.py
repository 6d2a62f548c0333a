"""ESSWatch.paused(): forwards inside it are never recorded; recording resumes as armed after it.
And the regularizer looks at the positions the watch logs (one index rule)."""

from __future__ import annotations

import torch

import esswatch
from esswatch.layers import SequenceModel
from esswatch.watch.measure import select_indices
from esswatch.watch.regularizer import spread_indices


def _model():
    torch.manual_seed(0)
    return SequenceModel(16, d_model=16, n_layers=1, mixer="gla", n_heads=2)


def _per_index(result):
    return {n: lay["entropy"]["per_index"] for n, lay in result["layers"].items()}


def test_forwards_inside_paused_are_not_recorded():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, 16, (2, 12), generator=g) for _ in range(2))
    model = _model()
    with esswatch.ESSWatch(model, every_n_steps=1) as ref:  # sees only batch b
        model(b)
        expect = _per_index(ref.step())
    with esswatch.ESSWatch(model, every_n_steps=1) as other:  # without the pause, a would win
        model(a)
        model(b)
        assert _per_index(other.step()) != expect
    with esswatch.ESSWatch(model, every_n_steps=1) as watch:
        with watch.paused():
            with watch.paused():  # nests
                model(a)
            model(a)
            assert not watch.capture.armed
        assert watch.capture.armed
        model(b)
        assert _per_index(watch.step()) == expect


def test_paused_step_with_nothing_recorded_measures_nothing():
    model = _model()
    x = torch.randint(0, 16, (2, 12))
    with esswatch.ESSWatch(model, every_n_steps=1) as watch:
        with watch.paused():
            model(x)
        assert not any(p.has_record for p in watch.capture.probes.values())


def test_regularizer_positions_are_the_logged_positions():
    for L in range(2, 40):
        for n in range(1, 12):
            assert spread_indices(L, n).tolist() == select_indices(n, L)
    assert spread_indices(1, 4).numel() == 0
