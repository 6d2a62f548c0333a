"""Regression: with a probe batch AND the regularizer on, the sampled steps still measure the probe batch
(the train-forwards gate used to disarm the eval-mode probe forward on penalized steps: no measurement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import esswatch
from esswatch.layers import SequenceModel

pytestmark = pytest.mark.usefixtures("single_thread")


def _entropy_ess(s):
    s = s[s > 0]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_probe_measurement_with_the_regularizer_on(tmp_path):
    torch.manual_seed(0)
    model = SequenceModel(11, d_model=8, n_layers=1, mixer="gla", n_heads=2)
    probe = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    results = []
    with esswatch.ESSWatch(
        model,
        logdir=str(tmp_path),
        every_n_steps=2,
        probe_batch=probe,
        batch_rows=None,
        indices=[5],
        histograms=False,
        images=False,
        regularizer=0.1,
    ) as watch:
        for _ in range(3):
            x = torch.randint(0, 11, (4, 10))
            logits = model(x)[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x[:, 1:].reshape(-1)) + watch.penalty()
            loss.backward()
            opt.step()
            opt.zero_grad()
            results.append(watch.step())
    assert [r is not None for r in results] == [True, False, True]
    # the measured value is the probe batch's ESS at index 5 (NumPy SVD of the layer's operator), mean over heads
    with torch.no_grad(), esswatch.capture(model) as cap:
        model.eval()
        model(probe)
    T = cap.operators["blocks.0.mixer"].dense().double().numpy()  # (rows, heads, L, L)
    ref = np.mean(
        [
            _entropy_ess(np.linalg.svd(T[b, h, 5:, :5], compute_uv=False))
            for b in range(T.shape[0])
            for h in range(T.shape[1])
        ]
    )
    assert results[2]["layers"]["blocks.0.mixer"]["entropy"]["avg"] == pytest.approx(ref, rel=1e-4)
