"""esswatch's reference mixers (esswatch.layers): their captured operators reproduce what the
layers compute, their ESS matches a NumPy SVD, and capture leaves the model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import entropy_ess_ref

import esswatch
from esswatch.layers import (
    MIXERS,
    CausalSelfAttention,
    GatedLinearAttention,
    LinearAttention,
    LongConvolution,
    MixerProbe,
    SelectiveSSM,
    SequenceModel,
    make_mixer,
)
from esswatch.operators import Convolution, GatedRecurrence, SoftmaxAttention
from esswatch.probes import capture, probe_for

D_MODEL, BATCH, L = 8, 2, 10

# name -> (constructor, operator class, theoretical state size)
CASES = {
    "attention": (lambda: CausalSelfAttention(D_MODEL, n_heads=2), SoftmaxAttention, None),
    "sliding": (lambda: CausalSelfAttention(D_MODEL, n_heads=2, window=3), SoftmaxAttention, 3),
    "linear_elu": (lambda: LinearAttention(D_MODEL, n_heads=2), GatedRecurrence, 4),
    "linear_identity": (lambda: LinearAttention(D_MODEL, n_heads=2, feature_map="identity"), GatedRecurrence, 4),
    "linear_conv": (lambda: LinearAttention(D_MODEL, n_heads=2, d_conv=3), GatedRecurrence, 4),
    "gla": (lambda: GatedLinearAttention(D_MODEL, n_heads=2, key_dim=3), GatedRecurrence, 3),
    "gla_conv": (lambda: GatedLinearAttention(D_MODEL, n_heads=2, key_dim=3, d_conv=4), GatedRecurrence, 3),
    "ssm": (lambda: SelectiveSSM(D_MODEL, d_state=4, d_conv=3), GatedRecurrence, 4),
    "ssm_noconv": (lambda: SelectiveSSM(D_MODEL, d_state=3, expand=2, d_conv=0), GatedRecurrence, 3),
    "long_conv": (lambda: LongConvolution(D_MODEL), Convolution, None),
    "long_conv_explicit_direct": (
        lambda: LongConvolution(D_MODEL, kernel="explicit", max_len=16, fft=False),
        Convolution,
        None,
    ),
}
RECURRENT = [n for n, c in CASES.items() if c[1] is GatedRecurrence]


def make(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return CASES[name][0]().to(dtype)


def rebuild_output(layer, T, f):
    """The layer's output from the captured operator ``T`` and its value path (``featurize``)."""
    if isinstance(layer, (CausalSelfAttention, LinearAttention, GatedLinearAttention)):
        y = T @ f["v"]  # per head: (B, H, L, L) @ (B, H, L, d_v)
        Bx, Hx, Lx, Dv = y.shape
        y = y.transpose(1, 2).reshape(Bx, Lx, Hx * Dv)
        if isinstance(layer, GatedLinearAttention):
            y = y * f["gate"]
        return layer.out(y)
    if isinstance(layer, SelectiveSSM):  # per channel, plus the D skip and the z gate
        y = (T @ f["u"][..., None])[..., 0] + layer.D[:, None] * f["u"]
        return layer.out(y.transpose(1, 2) * f["gate"])
    if isinstance(layer, LongConvolution):
        y = (T @ f["v"][..., None])[..., 0]
        return layer.out(y.transpose(1, 2) * f["gate"])
    raise AssertionError(type(layer))


@pytest.mark.parametrize("name", list(CASES))
def test_operator_reproduces_layer_output(name):
    layer = make(name)
    x = torch.randn(BATCH, L, D_MODEL, dtype=torch.float64)
    with capture(layer) as cap:
        y = layer(x)
    op = cap.operators[""]
    _, op_cls, tss = CASES[name]
    assert type(op) is op_cls and op.seq_len == L
    assert cap.tss == {"": tss}
    channels = (
        layer.d_inner if isinstance(layer, SelectiveSSM) else (D_MODEL if isinstance(layer, LongConvolution) else 2)
    )
    rows = 1 if isinstance(layer, LongConvolution) else BATCH  # an LTI kernel is the same for every row
    assert tuple(op.batch_shape) == (rows, channels)
    T = op.dense()
    assert float(T.triu(1).abs().max()) == 0.0
    with torch.no_grad():
        f = layer.featurize(x)
        assert torch.allclose(rebuild_output(layer, T, f), y, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["linear_conv", "gla_conv"])
def test_short_conv_is_causal(name):
    """Changing inputs at positions >= t leaves the outputs before t unchanged (the conv looks back only)."""
    layer = make(name)
    x = torch.randn(BATCH, L, D_MODEL, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(BATCH, L - 6, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = layer(x), layer(x2)
    assert torch.equal(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_operator_structure():
    x = torch.randn(BATCH, L, D_MODEL, dtype=torch.float64)
    layer = make("sliding")
    with capture(layer) as cap:
        layer(x)
    T = cap.operators[""].dense()
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    assert float(T[..., lag >= 3].abs().max()) == 0.0  # outside the window
    assert torch.allclose(T.sum(-1), torch.ones(()).double())  # softmax rows
    conv = make("long_conv")
    with capture(conv) as cap:
        conv(x)
    T = cap.operators[""].dense()
    h = conv.kernel_at(L)
    assert torch.allclose(T[0, :, 5, 2], h[:, 3]) and torch.allclose(T[0, :, 9, 6], h[:, 3])  # Toeplitz


@pytest.mark.parametrize("name", ["attention", "gla", "ssm", "long_conv"])
def test_float32_faithfulness(name):
    layer = make(name, dtype=torch.float32)
    x = torch.randn(BATCH, L, D_MODEL)
    with capture(layer) as cap:
        y = layer(x)
    with torch.no_grad():
        assert torch.allclose(rebuild_output(layer, cap.operators[""].dense(), layer.featurize(x)), y, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_entropy_ess_matches_numpy_svd(name):
    layer = make(name)
    with capture(layer) as cap:
        layer(torch.randn(BATCH, L, D_MODEL, dtype=torch.float64))
    op = cap.operators[""]
    idx = [2, 6]
    got = esswatch.entropy_ess(op, idx).numpy()
    assert np.allclose(got, entropy_ess_ref(op.dense().numpy(), idx), atol=1e-8)


@pytest.mark.parametrize("name", RECURRENT)
def test_gram_equals_exact(name):
    layer = make(name)
    with capture(layer) as cap:
        layer(torch.randn(BATCH, 12, D_MODEL, dtype=torch.float64))
    op = cap.operators[""]
    gram = esswatch.entropy_ess(op, estimator="gram")
    exact = esswatch.entropy_ess(op, estimator="exact")
    assert torch.allclose(gram, exact, atol=1e-6)
    assert float((exact - op.tss(torch.arange(1, 12))).max()) <= 1e-6  # ESS <= min(N, i, L - i)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_sequence_model_capture_is_invisible(mixer):
    torch.manual_seed(0)
    model = SequenceModel(13, d_model=D_MODEL, n_layers=2, mixer=mixer)
    tok = torch.randint(0, 13, (BATCH, L))
    logits0 = model(tok)
    logits0.sum().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rng = torch.get_rng_state()
    with capture(model) as cap:
        logits1 = model(tok)
    logits1.sum().backward()
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(logits0, logits1)
    assert all(torch.equal(a, p.grad) for a, p in zip(g0, model.parameters()))
    assert sorted(cap.operators) == ["blocks.0.mixer", "blocks.1.mixer"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["attention", "gla", "ssm", "long_conv"])
def test_batch_rows_heads_and_keep_graph(name):
    layer = make(name, dtype=torch.float32)
    x = torch.randn(3, L, D_MODEL)
    with capture(layer) as full:
        layer(x)
    with capture(layer, batch_rows=2, heads=1) as part:
        layer(x)
    op, ref = part.operators[""], full.operators[""].dense()
    rows = 1 if name == "long_conv" else 2
    assert tuple(op.batch_shape) == (rows, 1)
    assert torch.allclose(op.dense(), ref[:rows, :1], atol=1e-6)  # same rows, heads (BLAS may round differently)
    assert not any(t.requires_grad for t in op._tensors())
    with capture(layer, keep_graph=True) as cap:
        layer(x)
    op = cap.operators[""]
    assert op.requires_grad
    layer.zero_grad()
    esswatch.entropy_ess(op, [3, 5]).sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", ["attention", "gla", "ssm", "long_conv"])
def test_short_sequences(name):
    layer = make(name)
    x1 = torch.randn(BATCH, 1, D_MODEL, dtype=torch.float64)
    with capture(layer) as cap:
        y = layer(x1)
    op = cap.operators[""]
    assert op.seq_len == 1
    with torch.no_grad():
        assert torch.allclose(rebuild_output(layer, op.dense(), layer.featurize(x1)), y, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2, got L=1"):
        esswatch.entropy_ess(op)
    with capture(layer) as cap:
        layer(torch.randn(BATCH, 2, D_MODEL, dtype=torch.float64))
    op = cap.operators[""]
    T = op.dense().numpy()
    assert np.allclose(esswatch.entropy_ess(op, [1]).numpy(), entropy_ess_ref(T, [1]), atol=1e-10)
    # H_1 is the single entry T[1, 0]: ESS 1 where it is non-zero
    assert np.allclose(esswatch.entropy_ess(op, [1]).numpy()[..., 0], (np.abs(T[..., 1, 0]) > 0).astype(float))


def test_every_mixer_registers_its_probe():
    for cls in MIXERS.values():
        assert probe_for(make_mixer(next(k for k, v in MIXERS.items() if v is cls), D_MODEL)) is MixerProbe


def test_long_conv_fft_equals_direct():
    torch.manual_seed(0)
    a = LongConvolution(D_MODEL, fft=True).double()
    b = LongConvolution(D_MODEL, fft=False).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(BATCH, L, D_MODEL, dtype=torch.float64)
    assert torch.allclose(a(x), b(x), atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        CausalSelfAttention(10, n_heads=3)
    with pytest.raises(ValueError, match="window"):
        CausalSelfAttention(8, window=0)
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(8, feature_map="relu")
    with pytest.raises(ValueError, match="max_len"):
        LongConvolution(8, kernel="explicit")
    with pytest.raises(ValueError, match="exceeds max_len=4"):
        LongConvolution(8, kernel="explicit", max_len=4)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="unknown mixer 'rnn'"):
        SequenceModel(5, mixer="rnn")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mixer_hooks_do_not_sync_on_cuda(mixer):
    torch.manual_seed(0)
    model = SequenceModel(13, d_model=D_MODEL, n_layers=1, mixer=mixer).cuda()
    tok = torch.randint(0, 13, (BATCH, L), device="cuda")
    prev = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            ref = model(tok)
        except RuntimeError:
            pytest.skip("the model's own forward synchronizes on this torch version")
        with capture(model) as cap:
            got = model(tok)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert torch.equal(ref, got)
    assert cap.operators["blocks.0.mixer"].dense().is_cuda
