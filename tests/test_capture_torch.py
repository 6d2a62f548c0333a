"""Capture of PyTorch's built-in attention (nn.MultiheadAttention, nn.Transformer*Layer) and the
capture machinery around it (hooks, lifetime, options, errors, custom layers).

Faithfulness is checked against what torch itself returns: the per-head attention
probabilities (``need_weights=True, average_attn_weights=False``) and the layer's output
rebuilt from the captured operator and the module's own value / output projections.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import entropy_ess_ref
from torch import nn

import esswatch
from esswatch.operators import GatedRecurrence, SoftmaxAttention
from esswatch.probes import (
    CaptureError,
    CaptureWarning,
    Probe,
    UnsupportedModelError,
    capture,
    probe_for,
    register_probe,
    supported_types,
    unregister_probe,
)
from esswatch.probes.torch_probes import MultiheadAttentionProbe

E, H, B, L = 8, 2, 3, 6
DT = torch.float64


def causal_bool(n):  # nn.MultiheadAttention convention: True = blocked
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def causal_float(n, dtype=DT, device=None):
    return nn.Transformer.generate_square_subsequent_mask(n, device=device, dtype=dtype)


def batch_first(t, mha):
    return t if (mha.batch_first or t.dim() == 2) else t.transpose(0, 1)


def rebuild_mha_output(mha, T, value_bf):
    """out_proj(concat_h(T_h @ v_h)) with v from the module's own in_proj (batch-first)."""
    Ev = mha.embed_dim
    w_v = mha.in_proj_weight[2 * Ev :] if mha._qkv_same_embed_dim else mha.v_proj_weight
    b_v = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * Ev :]
    Bq, Lq, _ = value_bf.shape
    v = F.linear(value_bf, w_v, b_v).view(Bq, Lq, mha.num_heads, mha.head_dim).transpose(1, 2)
    y = (T @ v).transpose(1, 2).reshape(Bq, Lq, Ev)
    return mha.out_proj(y)


def run_mha(mha, x, **kw):
    """Call with x as query, key and value; returns (output, per-head weights) batch-first."""
    xin = batch_first(x, mha)
    out, w = mha(xin, xin, xin, need_weights=True, average_attn_weights=False, **kw)
    return batch_first(out, mha).detach(), w.detach()


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention: faithfulness
# ---------------------------------------------------------------------------------------------


def _masks(case):
    g = torch.Generator().manual_seed(1)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -2:] = True  # row 1 is right-padded by 2
    if case == "bool":
        return dict(attn_mask=causal_bool(L)), None
    if case == "float":
        return dict(attn_mask=causal_float(L)), None
    if case == "is_causal":
        return dict(attn_mask=causal_float(L), is_causal=True), None
    if case == "finite_neg":  # -1e9 instead of -inf above the diagonal
        return dict(attn_mask=torch.zeros(L, L, dtype=DT).masked_fill(causal_bool(L), -1e9)), None
    if case == "per_head_bias":  # (B*H, L, L): causal + a soft bias per head
        m = torch.randn(B * H, L, L, generator=g, dtype=DT).masked_fill(causal_bool(L), float("-inf"))
        return dict(attn_mask=m), None
    if case == "sliding":  # causal window of 3 as a bool mask
        r = torch.arange(L)
        return dict(attn_mask=(r[:, None] - r[None, :] >= 3) | causal_bool(L)), None
    if case == "kpm_bool":
        return dict(attn_mask=causal_bool(L), key_padding_mask=kpm), ~kpm
    if case == "kpm_float":
        return dict(
            attn_mask=causal_float(L), key_padding_mask=torch.zeros(B, L, dtype=DT).masked_fill(kpm, float("-inf"))
        ), ~kpm
    raise AssertionError(case)


@pytest.mark.parametrize("bf", [True, False])
@pytest.mark.parametrize(
    "case", ["bool", "float", "is_causal", "finite_neg", "per_head_bias", "sliding", "kpm_bool", "kpm_float"]
)
def test_mha_operator_reproduces_weights_and_output(bf, case):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=bf, dtype=DT)
    x = torch.randn(B, L, E, dtype=DT)
    kw, valid = _masks(case)
    with capture(mha) as cap:
        out, w = run_mha(mha, x, **kw)
    op = cap.operators[""]
    assert isinstance(op, SoftmaxAttention)
    assert tuple(op.batch_shape) == (B, H) and op.value_dim == E // H and op.seq_len == L
    T = op.dense()
    rows = torch.ones(B, L, dtype=torch.bool) if valid is None else valid
    # probabilities: equal to torch's own on every valid query row
    diff = (T - w).abs() * rows[:, None, :, None]
    assert int(rows.sum()) >= B * L - 2
    assert float(diff.max()) < 1e-12
    # strictly causal structure
    assert float(T.triu(1).abs().max()) == 0.0
    # the output rebuilt from the operator and the module's value/out projections
    y = rebuild_mha_output(mha, T, x).detach()
    assert torch.allclose(y[rows], out[rows], atol=1e-12, rtol=0)
    if valid is not None:  # padded query positions: zero rows of the operator
        assert float(T.permute(0, 2, 1, 3)[~valid].abs().max()) == 0.0


@pytest.mark.parametrize("case", ["kpm_bool", "kpm_float"])
def test_mha_padded_batch_warns_once_as_the_hf_probes_do(case):
    """The README's promise for padded batches (per-index ESS mixes token positions: warned) held for the
    Hugging Face probes only; an nn.MultiheadAttention key_padding_mask now warns too, once per layer, and a
    padding mask that pads nothing does not."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=DT)
    x = torch.randn(B, L, E, dtype=DT)
    kw, _ = _masks(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with capture(mha) as cap:
                run_mha(mha, x, **kw)
            cap.operators
    padded = [w for w in caught if issubclass(w.category, CaptureWarning) and "padded batch" in str(w.message)]
    assert len(padded) == 2  # once per capture session's probe, naming the layer
    assert "MultiheadAttention" in str(padded[0].message)
    unpadded = dict(kw, key_padding_mask=torch.zeros(B, L, dtype=torch.bool))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capture(mha) as cap:
            run_mha(mha, x, **unpadded)
        cap.operators
        cap.operators
    assert not [w for w in caught if "padded batch" in str(w.message)]


def test_mha_float32_and_unbatched_input():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(L, E)  # unbatched (L, E)
    with capture(mha) as cap:
        out, w = mha(x, x, x, attn_mask=causal_bool(L), need_weights=True, average_attn_weights=False)
    op = cap.operators[""]
    assert tuple(op.batch_shape) == (1, H)
    assert torch.allclose(op.dense()[0], w, atol=1e-6)
    assert torch.allclose(rebuild_mha_output(mha, op.dense(), x[None])[0], out, atol=1e-5)


def test_mha_without_bias_and_need_weights_false():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=False, batch_first=True, dtype=DT)
    x = torch.randn(B, L, E, dtype=DT)
    with capture(mha) as cap:
        out = mha(x, x, x, attn_mask=causal_float(L), is_causal=True, need_weights=False)[0]
    y = rebuild_mha_output(mha, cap.operators[""].dense(), x)
    assert torch.allclose(y, out, atol=1e-12)


def test_mha_entropy_ess_matches_numpy_svd():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=DT)
    x = torch.randn(2, 10, E, dtype=DT)
    with capture(mha) as cap:
        _, w = run_mha(mha, x, attn_mask=causal_bool(10))
    idx = [3, 7]
    got = esswatch.entropy_ess(cap.operators[""], idx).numpy()
    assert np.allclose(got, entropy_ess_ref(w.numpy(), idx), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer / Encoder / DecoderLayer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("bf", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_encoder_layer_self_attention(norm_first, bf, mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=bf, norm_first=norm_first)
    layer.train(mode == "train")
    x = torch.randn(B, L, E)
    xin = batch_first(x, layer.self_attn)
    mask = causal_float(L, torch.float32)
    with torch.set_grad_enabled(mode == "train"):
        ref = layer(xin, src_mask=mask, is_causal=True)
        with capture(layer) as cap:
            assert len(layer._forward_pre_hooks) == 1  # the fast-path-proof pre-hook on the layer
            got = layer(xin, src_mask=mask, is_causal=True)
    assert list(cap.operators) == ["self_attn"]
    if mode == "train":
        assert torch.equal(ref, got)
    else:  # torch leaves the fused fast path while a hook is attached: rounding-level difference only
        assert torch.allclose(ref, got, atol=1e-5)
    attn_in = layer.norm1(x) if norm_first else x
    with torch.no_grad():
        _, w = run_mha(layer.self_attn, attn_in, attn_mask=mask)
    assert torch.allclose(cap.operators["self_attn"].dense(), w, atol=1e-6)


class ScaledEncoderLayer(nn.TransformerEncoderLayer):
    """A subclass that feeds its attention something else: the layer pre-hook must not be used."""

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        return super()._sa_block(2.0 * x, attn_mask, key_padding_mask, is_causal=is_causal)


def test_encoder_layer_subclass_uses_the_attention_hook():
    torch.manual_seed(0)
    layer = ScaledEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    x = torch.randn(B, L, E, dtype=DT)
    with capture(layer) as cap:
        assert not layer._forward_pre_hooks
        layer(x, src_mask=causal_float(L), is_causal=True)
    _, w = run_mha(layer.self_attn, 2.0 * x, attn_mask=causal_float(L))
    assert torch.allclose(cap.operators["self_attn"].dense(), w, atol=1e-12)


def test_encoder_layer_capture_keeps_rng_stream_with_dropout():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.3, batch_first=True).train()
    x = torch.randn(B, L, E)
    torch.manual_seed(5)
    ref = layer(x, src_mask=causal_float(L, torch.float32), is_causal=True)
    after_ref = torch.rand(3)
    torch.manual_seed(5)
    with capture(layer):
        got = layer(x, src_mask=causal_float(L, torch.float32), is_causal=True)
    assert torch.equal(ref, got) and torch.equal(after_ref, torch.rand(3))


def test_transformer_encoder_stack_with_padding():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True),
        num_layers=2,
        enable_nested_tensor=False,
    ).double()
    x = torch.randn(B, L, E, dtype=DT)
    kpm = torch.zeros(B, L, dtype=DT)
    kpm[2, -3:] = float("-inf")
    mask = causal_float(L)
    with capture(enc) as cap:
        enc(x, mask=mask, src_key_padding_mask=kpm, is_causal=True)
    assert sorted(cap.operators) == ["layers.0.self_attn", "layers.1.self_attn"]
    h1 = enc.layers[0](x, src_mask=mask, src_key_padding_mask=kpm, is_causal=True)
    _, w = run_mha(enc.layers[1].self_attn, h1, attn_mask=mask, key_padding_mask=kpm)
    T = cap.operators["layers.1.self_attn"].dense()
    valid = kpm == 0
    assert torch.allclose(T.permute(0, 2, 1, 3)[valid], w.permute(0, 2, 1, 3)[valid], atol=1e-12)


def test_decoder_layer_self_attention_captured_cross_attention_warned():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=DT)
    x, mem = torch.randn(B, L, E, dtype=DT), torch.randn(B, 4, E, dtype=DT)
    with pytest.warns(CaptureWarning, match=r"multihead_attn .*cross-attention"):
        with capture(dec) as cap:
            dec(x, mem, tgt_mask=causal_float(L), tgt_is_causal=True)
    assert list(cap.operators) == ["self_attn"]
    _, w = run_mha(dec.self_attn, x, attn_mask=causal_float(L))
    assert torch.allclose(cap.operators["self_attn"].dense(), w, atol=1e-12)


def test_bidirectional_encoder_warns_and_is_left_out():
    enc = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, batch_first=True)
    with pytest.warns(CaptureWarning, match=r"self_attn \(MultiheadAttention\).*bidirectional"):
        with capture(enc) as cap:
            enc(torch.randn(B, L, E))
    assert cap.operators == {}


def test_cross_attention_on_plain_mha_warns():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    q, kv = torch.randn(B, L, E), torch.randn(B, L, E)
    with pytest.warns(CaptureWarning, match="cross-attention"):
        with capture(mha) as cap:
            mha(q, kv, kv, attn_mask=causal_bool(L))
    assert cap.operators == {}


@pytest.mark.parametrize(
    "mask",
    [
        torch.zeros(L, L, dtype=torch.bool),  # nothing blocked
        torch.zeros(L, L),  # float, nothing blocked
        causal_bool(L).T.contiguous(),
    ],
)  # anti-causal
def test_non_causal_mask_raises_naming_layer(mask):
    model = nn.Sequential(nn.MultiheadAttention(E, H, batch_first=True))
    x = torch.randn(B, L, E)
    with capture(model) as cap:
        model[0](x, x, x, attn_mask=mask)
    with pytest.raises(CaptureError, match=r"^0 \(MultiheadAttention\).*non-causal"):
        cap.operators


def test_add_bias_kv_is_not_capturable():
    mha = nn.MultiheadAttention(E, H, add_bias_kv=True, batch_first=True)
    with pytest.raises(UnsupportedModelError, match=r"MultiheadAttention .*1 layer \(<model>\): add_bias_kv"):
        capture(mha)
    assert not mha._forward_hooks
    model = nn.Sequential(nn.MultiheadAttention(E, H, batch_first=True), mha)  # with a capturable layer: warned
    with pytest.warns(CaptureWarning, match=r"(?s)1 sequence-mixing layer of Sequential .*\(1\): add_bias_kv"):
        with capture(model) as cap:
            assert not mha._forward_hooks and model[0]._forward_hooks
    assert list(cap.probes) == ["0"] and list(cap.unsupported) == ["1"]


class RotaryMHA(nn.MultiheadAttention):
    def forward(self, query, key, value, **kw):
        return super().forward(query.flip(-1), key.flip(-1), value, **kw)


def test_mha_subclass_with_own_forward_is_not_capturable():
    mha = RotaryMHA(E, H, batch_first=True)
    with pytest.raises(UnsupportedModelError, match="RotaryMHA overrides MultiheadAttention.forward"):
        capture(mha)
    assert not mha._forward_hooks


# ---------------------------------------------------------------------------------------------
# outputs unchanged, hooks, lifetime, memory
# ---------------------------------------------------------------------------------------------


class TinyCausalTransformer(nn.Module):
    def __init__(self, n_layers=2):
        super().__init__()
        self.embed = nn.Embedding(17, E)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(E, H, 16, dropout=0.1, batch_first=True) for _ in range(n_layers)
        )
        self.head = nn.Linear(E, 17)

    def forward(self, tokens):
        x = self.embed(tokens)
        mask = causal_float(tokens.shape[1], x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(x)


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_does_not_change_logits_or_grads():
    torch.manual_seed(0)
    model = TinyCausalTransformer()
    tok = torch.randint(0, 17, (B, L))
    torch.manual_seed(1)
    loss0 = model(tok).logsumexp(-1).mean()
    loss0.backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    with capture(model) as cap:
        loss1 = model(tok).logsumexp(-1).mean()
    loss1.backward()
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, p.grad) for a, p in zip(g0, model.parameters()))
    assert len(cap.operators) == 2


def test_hooks_removed_on_exit_and_on_exception():
    model = TinyCausalTransformer()
    tok = torch.randint(0, 17, (B, L))
    assert all_hooks(model) == 0
    with capture(model):
        assert all_hooks(model) == 4  # a forward hook on each MHA + a pre-hook on each layer
        model(tok)
    assert all_hooks(model) == 0
    with pytest.raises(ZeroDivisionError):
        with capture(model):
            model(tok)
            1 / 0
    assert all_hooks(model) == 0
    with capture(model) as cap:  # usable again after the exception
        model(tok)
    assert len(cap.operators) == 2


def test_entering_twice_raises_and_cleans_up():
    model = TinyCausalTransformer()
    with capture(model):
        with pytest.raises(RuntimeError, match="already attached"):
            with capture(model):
                pass
        assert all_hooks(model) == 4
    assert all_hooks(model) == 0


def test_captured_tensors_are_freed_with_cap():
    model = TinyCausalTransformer()
    with capture(model) as cap:
        model(torch.randint(0, 17, (B, L)))
    op = cap.operators["layers.0.self_attn"]
    refs = [weakref.ref(op.q), weakref.ref(op.k)]
    del op, cap
    gc.collect()
    assert all(r() is None for r in refs)


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some torch module proxies warns
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_repeated_enter_exit_does_not_grow_memory():
    model = TinyCausalTransformer()
    tok = torch.randint(0, 17, (B, L))

    def step():
        with capture(model) as cap:
            model(tok).sum().backward()
        esswatch.entropy_ess(cap.operators["layers.1.self_attn"], [2])
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    base = _live_tensors()
    for _ in range(40):
        step()
    assert _live_tensors() <= base
    assert all_hooks(model) == 0


# ---------------------------------------------------------------------------------------------
# options: batch_rows, heads, keep_graph
# ---------------------------------------------------------------------------------------------


def test_batch_rows_and_heads_keep_the_configured_slices():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 4, batch_first=False, dtype=DT)
    x = torch.randn(4, L, E, dtype=DT)
    kpm = torch.zeros(4, L, dtype=DT)
    kpm[0, -1] = float("-inf")
    m = torch.randn(4 * 4, L, L, dtype=DT).masked_fill(causal_bool(L), float("-inf"))
    with capture(mha) as full:
        run_mha(mha, x, attn_mask=m, key_padding_mask=kpm)
    with capture(mha, batch_rows=2, heads=3) as part:
        run_mha(mha, x, attn_mask=m, key_padding_mask=kpm)
    op = part.operators[""]
    assert tuple(op.batch_shape) == (2, 3)
    assert torch.allclose(op.dense(), full.operators[""].dense()[:2, :3], atol=1e-12, rtol=0)


def test_detached_by_default_attached_with_keep_graph():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, L, E)
    with capture(mha) as cap:
        mha(x, x, x, attn_mask=causal_bool(L))
    op = cap.operators[""]
    assert not op.q.requires_grad and op.q.grad_fn is None
    with capture(mha, keep_graph=True) as cap:
        mha(x, x, x, attn_mask=causal_bool(L))
    op = cap.operators[""]
    assert op.q.requires_grad and op.k.grad_fn is not None
    esswatch.entropy_ess(op, [2, 3]).sum().backward()
    g = mha.in_proj_weight.grad
    assert g is not None and float(g[: 2 * E].abs().sum()) > 0 and float(g[2 * E :].abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------
# bad input, short sequences
# ---------------------------------------------------------------------------------------------


def test_explicit_unsupported_module_raises_naming_it():
    model = TinyCausalTransformer()
    with pytest.raises(ValueError, match=r"'layers.0.linear1' is a Linear, which esswatch cannot capture"):
        capture(model, layers="layers.0.linear1")
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        capture(model, layers=["nope"])
    with pytest.raises(ValueError, match="an empty list selects nothing"):  # was a watch of nothing
        capture(model, layers=[])


def test_model_without_supported_layer_lists_supported_types():
    with pytest.raises(ValueError) as e:
        capture(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    msg = str(e.value)
    assert "torch.nn.modules.activation.MultiheadAttention" in msg
    assert "register_probe" in msg and "esswatch_operator" in msg
    assert "torch.nn.modules.activation.MultiheadAttention" in supported_types()
    assert probe_for(nn.MultiheadAttention(E, H)) is MultiheadAttentionProbe


def test_length_one_and_two():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=DT)
    x1 = torch.randn(B, 1, E, dtype=DT)
    with capture(mha) as cap:
        _, w = run_mha(mha, x1, attn_mask=causal_bool(1))
    op = cap.operators[""]
    assert op.seq_len == 1 and torch.allclose(op.dense(), w)  # the 1x1 operator is exactly 1
    with pytest.raises(ValueError, match="at least 2, got L=1"):
        esswatch.entropy_ess(op)
    x2 = torch.randn(B, 2, E, dtype=DT)
    with capture(mha) as cap:
        _, w = run_mha(mha, x2, attn_mask=causal_bool(2))
    got = esswatch.entropy_ess(cap.operators[""], [1])
    assert np.allclose(got.numpy(), entropy_ess_ref(w.numpy(), [1]), atol=1e-12)
    assert np.allclose(got.numpy(), 1.0)  # H_1 is 1x1: rank one


# ---------------------------------------------------------------------------------------------
# custom layers: the README example
# ---------------------------------------------------------------------------------------------


class DecayMixer(nn.Module):
    """y_t = sum_{c <= t} exp(-rate (t - c)) * x_c per channel: an LTI recurrence (README example)."""

    def __init__(self, channels):
        super().__init__()
        self.log_rate = nn.Parameter(torch.linspace(-3, 0, channels))

    def forward(self, x):  # (batch, L, channels)
        a = torch.exp(-torch.exp(self.log_rate))
        h, ys = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = a * h + x[:, t]
            ys.append(h)
        return torch.stack(ys, 1)


class DecayMixerProbe(Probe):
    layer_type = "DecayMixer"

    def attach(self):
        def hook(module, args, output):
            if not self.wants_record():  # the hot path: one flag check
                return
            x = args[0]
            Bx, Lx, C = x.shape
            log_a = -torch.exp(module.log_rate)  # (C,)
            ones = x.new_ones(Bx, C, Lx, 1)
            self.record(
                log_decay=self.keep(log_a[None, :, None, None].expand(Bx, C, Lx, 1), head_dim=1),
                ones=self.keep(ones, head_dim=1),
            )

        return [self.module.register_forward_hook(hook)]

    def build(self, record):
        return GatedRecurrence(record["ones"], record["ones"], record["log_decay"])

    def tss(self):
        return 1


class DecayMixerWithMethod(nn.Module):
    """The same layer, captured through the ``esswatch_operator`` method instead of a registered probe."""

    esswatch_tss = 1

    def __init__(self, channels):
        super().__init__()
        self.log_rate = nn.Parameter(torch.linspace(-3, 0, channels))

    forward = DecayMixer.forward

    def esswatch_operator(self, args, kwargs, output):
        x = args[0]
        Bx, Lx, C = x.shape
        log_a = (-torch.exp(self.log_rate)).detach()
        ones = x.new_ones(Bx, C, Lx, 1)
        return GatedRecurrence(ones, ones, log_a[None, :, None, None].expand(Bx, C, Lx, 1))


def _check_decay_operator(op, mixer, x, y):
    T = op.dense()  # (B, C, L, L)
    assert torch.allclose((T @ x.transpose(1, 2)[..., None])[..., 0].transpose(1, 2), y, atol=1e-5)
    assert np.allclose(esswatch.entropy_ess(op, [2, 4]).numpy(), entropy_ess_ref(T.numpy(), [2, 4]), atol=1e-5)
    assert np.allclose(esswatch.entropy_ess(op, [2, 4]).numpy(), 1.0, atol=1e-5)  # rank one


def test_custom_layer_register_probe():
    register_probe(DecayMixer, DecayMixerProbe)
    try:
        model = nn.Sequential(nn.Linear(3, 3), DecayMixer(3))
        x = torch.randn(2, 7, 3)
        with capture(model) as cap:
            y = model(x)
        assert cap.tss == {"1": 1} and type(cap.probes["1"]) is DecayMixerProbe
        _check_decay_operator(cap.operators["1"], model[1], model[0](x).detach(), y.detach())
    finally:
        unregister_probe(DecayMixer)


def test_custom_layer_esswatch_operator_method():
    model = nn.Sequential(nn.Linear(3, 3), DecayMixerWithMethod(3))
    x = torch.randn(2, 7, 3)
    with capture(model) as cap:
        y = model(x)
    assert cap.tss == {"1": 1} and type(cap.probes["1"]).__name__ == "ProtocolProbe"
    _check_decay_operator(cap.operators["1"], model[1], model[0](x).detach(), y.detach())


def test_custom_layer_esswatch_operator_method_keeps_batch_rows_and_heads():
    """Regression: an operator from the method route kept every batch row and channel, where registered
    probes keep ``batch_rows`` and ``heads``; it is now cut the same way (the kept entries unchanged)."""
    model = nn.Sequential(nn.Linear(3, 3), DecayMixerWithMethod(3))
    x = torch.randn(4, 7, 3)
    with capture(model) as cap:
        model(x)
    full = cap.operators["1"].dense()
    with capture(model, batch_rows=2, heads=2) as cap:
        model(x)
    op = cap.operators["1"]
    assert tuple(op.batch_shape) == (2, 2)
    assert torch.equal(op.dense(), full[:2, :2])


# ---------------------------------------------------------------------------------------------
# CUDA: the hooks never synchronize with the host
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hooks_do_not_sync_on_cuda():
    torch.manual_seed(0)
    model = TinyCausalTransformer().cuda()
    tok = torch.randint(0, 17, (B, L), device="cuda")
    prev = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            ref = model(tok)
        except RuntimeError:
            pytest.skip("the model's own forward synchronizes on this torch version")
        with capture(model, batch_rows=2) as cap:
            got = model(tok)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert torch.equal(ref, got)
    T = cap.operators["layers.0.self_attn"].dense()
    assert T.is_cuda and tuple(T.shape) == (2, H, L, L)


class _FaultyDecayProbe(DecayMixerProbe):
    """Test-only: a user probe with a bug in one place, chosen by ``fault``."""

    fault = "hook"

    def attach(self):
        if self.fault == "attach_raises":
            raise KeyError("bad attach")
        if self.fault == "attach_none":
            return None
        if self.fault != "hook":
            return super().attach()

        def hook(module, args, output):
            if self.wants_record():
                raise IndexError("user bug in hook")

        return [self.module.register_forward_hook(hook)]

    def tss(self):
        return {"tss_zero": 0, "tss_bool": True, "tss_str": "8"}.get(self.fault, 1)


@pytest.mark.parametrize("fault", ["hook", "attach_raises", "attach_none", "tss_zero", "tss_bool", "tss_str"])
def test_a_faulty_user_probe_is_named_and_never_stops_training(fault):
    """Regressions found by a review of the extension API: a registered probe's hook that raised went through the
    model's forward (training stopped, the layer unnamed); attach() returning None gave "'NoneType' object is not
    iterable"; tss() of 0, True or '8' was accepted (utilization inf, or silently converted). Now: a raising hook
    leaves the model's output unchanged and is a failure of that layer (warned naming it, counted; strict raises);
    attach()
    faults are a CaptureError naming the layer and the probe; a bad tss() is a ValueError naming the layer (inside
    the watch, the usual failure warning). The other layer (the esswatch_operator route) is still measured."""
    _FaultyDecayProbe.fault = fault
    register_probe(DecayMixer, _FaultyDecayProbe)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), DecayMixer(4), DecayMixerWithMethod(4))
        x = torch.randn(2, 7, 3)
        with torch.no_grad():
            want = model(x)
        if fault.startswith("attach"):
            with pytest.raises(CaptureError, match=r"1: _FaultyDecayProbe\.attach\(\)"):
                esswatch.ESSWatch(model, every_n_steps=1)
            unregister_probe(DecayMixer)
            with capture(model) as cap:  # nothing was left attached: a capture can attach now
                model(x)
            assert set(cap.operators) == {"2"}
            return
        watch = esswatch.ESSWatch(model, every_n_steps=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(x)
            out.sum().backward()
            result = watch.step()
        watch.close()
        torch.testing.assert_close(out.detach(), want)
        messages = [str(w.message) for w in caught]
        assert set(result["layers"]) == {"2"}
        if fault == "hook":
            assert any("skipped layer '1'" in m and "hook raised IndexError: user bug in hook" in m for m in messages)
            assert watch.failures == 1
            strict = esswatch.ESSWatch(model, every_n_steps=1, strict=True)  # review: strict=True raises for it
            model(x).sum().backward()
            with pytest.raises(esswatch.ESSMeasurementError, match="1: _FaultyDecayProbe's hook raised IndexError"):
                strict.step()
            strict.close()
        else:
            assert any("skipped layer '1'" in m and "theoretical state size" in m for m in messages), messages
            assert watch.failures == 1
    finally:
        unregister_probe(DecayMixer)
