"""The README's code examples, run as written, and their results checked against independent
references: NumPy SVDs of dense ``T`` built here in float64, and TensorBoard's own event reader
for the quickstart and the regularizer's loop. If an example in the README stops working or
stops meaning what it says, these fail."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import entropy_ess_ref, gated_recurrence_dense, softmax_attention_dense, tolerance_ess_ref
from torch import nn

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def readme_block(section: str) -> str:
    """The first ```python block after the heading ``section``."""
    start = README.index(f"\n{section}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"no python block after {section!r}"
    return match.group(1)


def run_statements(code: str, ns: dict, name: str) -> list:
    """Run ``code`` one top-level statement at a time; every value ``name`` takes, in order."""
    values = []
    for stmt in ast.parse(code).body:
        exec(compile(ast.Module([stmt], type_ignores=[]), "<README>", "exec"), ns)
        if name in ns and (not values or ns[name] is not values[-1]):
            values.append(ns[name])
    return values


def test_functional_api_example_matches_numpy():
    torch.manual_seed(0)
    ns: dict = {}
    att_ess, rand_ess, gla_ess = run_statements(readme_block("## The functional API"), ns, "ess")

    T_att = softmax_attention_dense(ns["q"], ns["k"])
    assert att_ess.shape == (2, 4, 3)  # the README's "-> (2, 4, 3)"
    np.testing.assert_allclose(att_ess.double().numpy(), entropy_ess_ref(T_att, [128, 256, 384]), rtol=1e-4)

    exact = entropy_ess_ref(T_att, [256])
    lower, upper = ns["lower"].double().numpy(), ns["upper"].double().numpy()
    assert rand_ess.shape == lower.shape == upper.shape == (2, 4, 1)
    assert np.all(lower <= exact * (1 + 1e-5)) and np.all(exact <= upper * (1 + 1e-5))
    # within its rtol, deterministically here: at L = 512 no block is large enough for the
    # probabilistic quadrature, so the bounds closed or the block was computed exactly
    np.testing.assert_allclose(rand_ess.double().numpy(), exact, rtol=0.02)
    np.testing.assert_array_equal(ns["rank"].numpy(), tolerance_ess_ref(T_att, [256], 1e-3, True))

    assert gla_ess.shape == (2, 4, 511)
    gla = ns["gla"]
    idx = [1, 64, 255, 256, 448, 511]
    ref = entropy_ess_ref(gated_recurrence_dense(gla.q, gla.k, gla.log_decay), idx)
    np.testing.assert_allclose(gla_ess.double().numpy()[..., [i - 1 for i in idx]], ref, rtol=1e-5)


class TinyLM(nn.Module):
    """A one-block causal transformer language model (what the quickstart's ``model`` stands for)."""

    def __init__(self, vocab: int = 32, d: int = 32, heads: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x)
        L = x.shape[1]
        mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        h = h + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return self.head(h)


class SnapshotLoader:
    """The quickstart's ``loader``: yields each batch and keeps a copy of the model's weights as
    they were when the batch went in (the weights its sampled forward used)."""

    def __init__(self, model: nn.Module, batches: torch.Tensor):
        self.model, self.batches, self.weights = model, batches, []

    def __iter__(self):
        for batch in self.batches:
            self.weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
            yield batch


def loop_namespace(steps: int) -> dict:
    torch.manual_seed(0)
    model = TinyLM()
    data = torch.randint(0, 32, (steps, 4, 24))
    return {
        "model": model,
        "loader": SnapshotLoader(model, data),
        "batch": data[0],
        "loss_fn": lambda logits: logits.logsumexp(-1).mean() - logits.mean(),
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
    }


def attention_T(weights: dict, x: torch.Tensor, heads: int = 2) -> np.ndarray:
    """TinyLM's attention matrix per (row, head) from its weights, in float64 NumPy."""
    w = {k: v.double().numpy() for k, v in weights.items()}
    h = w["emb.weight"][x.numpy()]  # (B, L, d)
    d = h.shape[-1]
    qkv = h @ w["attn.in_proj_weight"].T + w["attn.in_proj_bias"]
    q, k = qkv[..., :d], qkv[..., d : 2 * d]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
    return softmax_attention_dense(split(q), split(k))


def scalars(logdir: Path) -> dict:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_quickstart_example_logs_ess_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_block("## Quickstart: watch a training loop").replace("every_n_steps=100", "every_n_steps=2")
    ns = loop_namespace(steps=4)
    exec(code, ns)

    logged = scalars(tmp_path / "runs" / "exp")
    model_avg = logged["ess/entropy/avg/model"]
    assert [step for step, _ in model_avg] == [0, 2]  # a plain loop samples steps 0, n, 2n, ...
    # the last sample (step 2: the third batch, after two optimizer steps) against a NumPy SVD of
    # the attention matrix rebuilt from the weights that forward used
    layer = ns["watch"].latest()["layers"]["attn"]
    rows = layer["rows"] if isinstance(layer["rows"], int) else len(layer["rows"])
    T = attention_T(ns["loader"].weights[2], ns["loader"].batches[2][:rows])
    ref = entropy_ess_ref(T, layer["indices"])  # (rows, heads, indices)
    np.testing.assert_allclose(layer["entropy"]["per_index"], ref.mean((0, 1)), rtol=1e-4)
    assert logged["ess/entropy/avg/attn"][-1][1] == pytest.approx(ref.mean(), rel=1e-4)
    assert model_avg[-1][1] == pytest.approx(ref.mean(), rel=1e-4)  # one layer: the model is the layer


def test_regularizer_example_adds_the_documented_penalty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = loop_namespace(steps=1)
    model, batch = ns["model"], ns["batch"]
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain_model = copy.deepcopy(model)
    plain = ns["loss_fn"](plain_model(batch))
    plain.backward()

    exec("import esswatch\n" + readme_block("## The ESS regularizer (one flag)"), ns)
    ns["watch"].close()

    # README: penalty = weight * mean over layers of mean(relu(floor - u)^2) / floor^2, with
    # u = ESS_i / TSS_i, TSS_i = min(TSS, i, L - i) (unbounded for softmax attention), at the 8
    # positions round(j L / 9), on the kept batch rows (2) and every head
    L = batch.shape[1]
    indices = [round(j * L / 9) for j in range(1, 9)]
    ess = entropy_ess_ref(attention_T(w0, batch[:2]), indices)
    u = ess / np.array([min(i, L - i) for i in indices])
    expected = 1e-2 * np.mean(np.maximum(0.5 - u, 0.0) ** 2) / 0.25
    assert expected > 1e-5  # attention at initialisation is collapsed enough to be penalized
    assert ns["watch"].latest()["penalty"]["total"] == pytest.approx(expected, rel=1e-4)
    assert ns["loss"].item() - plain.item() == pytest.approx(expected, abs=2e-6)  # float32 losses near 3.5

    # the penalty's gradient reached the attention's input projection but not the output head
    lr = 0.1
    step = {name: (w0[name] - p.detach()) / lr for name, p in model.named_parameters()}
    grads = dict(plain_model.named_parameters())
    torch.testing.assert_close(step["head.weight"], grads["head.weight"].grad, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(step["attn.in_proj_weight"], grads["attn.in_proj_weight"].grad, atol=1e-6)


def test_custom_layer_example_runs_and_matches_numpy():
    """The "Custom layers" example as written (a module, its probe, a capture): the operator is the layer itself
    (T @ x equals its output), and entropy-ESS equals a NumPy SVD of that T."""
    from esswatch.probes import registry

    torch.manual_seed(0)
    ns: dict = {}
    try:
        (ess,) = run_statements(readme_block("### Custom layers"), ns, "ess")
        op = ns["cap"].operators["1"]
        model = ns["model"]
        x = torch.randn(2, 16, 8)
        with torch.no_grad():
            u = model[0](x)
            y = model[1](u)
            T = op.dense()  # (batch, channel, L, L)
        torch.testing.assert_close(torch.einsum("bcts,bsc->btc", T, u), y, rtol=1e-5, atol=1e-6)
        assert ess.shape == (2, 4, 3)
        np.testing.assert_allclose(ess.double().numpy(), entropy_ess_ref(T.double().numpy(), [4, 8, 12]), rtol=1e-5)
    finally:
        if "DecayMixer" in ns:
            registry.unregister_probe(ns["DecayMixer"])
