"""One TSS source: a layer's TSS known only to its probe (``esswatch_tss``) becomes the operator's
``state_size``, so ``Operator.tss``, the logged ``state_size`` and the regularizer agree."""

from __future__ import annotations

import numpy as np
import torch
from reference import entropy_ess_ref
from torch import nn

import esswatch
from esswatch.operators import Dense
from esswatch.watch.regularizer import Regularizer, penalty_terms, spread_indices

L, TSS = 10, 3


class Mixer(nn.Module):
    esswatch_tss = TSS

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.handed = []

    def forward(self, x):
        return self.lin(x)

    def esswatch_operator(self, args, kwargs, output):
        g = torch.Generator().manual_seed(0)
        t = torch.tril(torch.randn(L, L, generator=g, dtype=torch.float64))
        op = Dense(t)
        self.handed.append(op)
        return op


def test_probe_tss_becomes_the_operators_state_size():
    mixer = Mixer()
    x = torch.randn(1, L, 4)
    with esswatch.capture(mixer) as cap:
        mixer(x)
    (op,) = cap.operators.values()
    idx = torch.arange(1, L)
    expect = np.minimum(TSS, np.minimum(idx.numpy(), L - idx.numpy()))
    np.testing.assert_array_equal(op.tss(idx).numpy(), expect)
    assert mixer.handed[0].state_size is None  # the module's own operator is left as it was
    # the regularizer normalizes by the same TSS_i as the logs
    cfg = Regularizer(1.0, mode="target", target=0.0)
    _, terms = penalty_terms(cap.operators, cfg)
    sel = spread_indices(L, cfg.indices)
    ess = entropy_ess_ref(op.dense().numpy(), sel.tolist())
    u = ess / np.minimum(TSS, np.minimum(sel.numpy(), L - sel.numpy()))
    np.testing.assert_allclose(float(next(iter(terms.values()))), float((u**2).mean()), rtol=1e-6)
    with esswatch.ESSWatch(mixer, every_n_steps=1, train_forwards_only=False) as watch:
        mixer(x)
        (lay,) = watch.step()["layers"].values()
    assert lay["state_size"] == TSS
