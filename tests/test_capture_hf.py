"""Capture of Hugging Face transformers models (tiny random configs, nothing downloaded).

References are the models' own tensors: the attention probabilities transformers
returns with ``output_attentions=True`` under eager attention, the attention module's
output rebuilt from its own value projection, the Mamba mixers' outputs rebuilt from
their own ``x_proj`` / ``in_proj`` / ``norm`` inputs, and the logits without capture.
"""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from esswatch.integrations.transformers import attention_registry  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

import esswatch  # noqa: E402
from esswatch.operators import GatedRecurrence, SoftmaxAttention  # noqa: E402
from esswatch.probes import CaptureWarning  # noqa: E402

L = 8
VOCAB = 100
TOL = dict(atol=2e-6, rtol=1e-5)


# -- tiny models and how to read their value path ---------------------------------------------------
def _proj_value(attn, proj_out):
    """Llama / Mistral / Qwen2: v from v_proj's output, (batch, kv_heads, L, head_dim)."""
    b, n, _ = proj_out.shape
    return proj_out.view(b, n, -1, attn.head_dim).transpose(1, 2)


def _gpt2_value(attn, proj_out):
    b, n, _ = proj_out.shape
    v = proj_out.split(attn.split_size, dim=2)[2]
    return v.view(b, n, -1, attn.head_dim).transpose(1, 2)


def _neox_value(attn, proj_out):
    b, n, _ = proj_out.shape
    qkv = proj_out.view(b, n, -1, 3 * attn.head_size).transpose(1, 2)
    return qkv.chunk(3, dim=-1)[2]


def _make(kind: str):
    """(model, attention module names, value projection attr, value reader, output projection attr)."""
    T = transformers
    if kind == "llama":
        cfg = T.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
        )
        model, attn = T.LlamaForCausalLM, "model.layers.{}.self_attn"
        spec = ("v_proj", _proj_value, "o_proj")
    elif kind == "mistral":
        cfg = T.MistralConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
            sliding_window=3,
        )
        model, attn = T.MistralForCausalLM, "model.layers.{}.self_attn"
        spec = ("v_proj", _proj_value, "o_proj")
    elif kind == "qwen2":  # layer 0 full attention, layer 1 sliding window 3
        cfg = T.Qwen2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=VOCAB,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=1,
        )
        model, attn = T.Qwen2ForCausalLM, "model.layers.{}.self_attn"
        spec = ("v_proj", _proj_value, "o_proj")
    elif kind == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
        model, attn = T.GPT2LMHeadModel, "transformer.h.{}.attn"
        spec = ("c_attn", _gpt2_value, "c_proj")
    elif kind == "gpt_neox":
        cfg = T.GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        )
        model, attn = T.GPTNeoXForCausalLM, "gpt_neox.layers.{}.attention"
        spec = ("query_key_value", _neox_value, "dense")
    else:  # pragma: no cover
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = model(cfg).eval()
    return m, [attn.format(i) for i in range(2)], spec


MODELS = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"]
EXPECTED_WINDOW = {"mistral": [3, 3], "qwen2": [None, 3]}


def _ids(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, L), generator=g)


def _left_padding():
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, :3] = 0
    return mask


def _registry_state():
    return dict(AttentionInterface.__dict__), dict(AttentionInterface._global_mapping)


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    return (request.param, *_make(request.param))


# -- attention: probabilities, kernels, faithfulness ----------------------------------------------------
def _capture(model, ids, mask=None, **kw):
    """Capture one forward pass; returns (capture, model output, esswatch warnings incl. those of building)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with esswatch.capture(model) as cap:
            out = model(ids, attention_mask=mask, **kw)
        cap.operators
    return cap, out, [str(x.message) for x in w if issubclass(x.category, CaptureWarning)]


def test_eager_dense_equals_output_attentions_and_sdpa(tiny):
    kind, model, names, _ = tiny
    ids = _ids()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        cap, out, _ = _capture(model, ids, output_attentions=True)
        assert list(cap.operators) == names
        for i, name in enumerate(names):
            op = cap.operators[name]
            assert isinstance(op, SoftmaxAttention) and op.batch_shape == (2, 4) and op.seq_len == L
            assert op.window == EXPECTED_WINDOW.get(kind, [None, None])[i]
            assert cap.tss[name] == op.window
            torch.testing.assert_close(op.dense(), out.attentions[i].float(), **TOL)
        eager_dense = [cap.operators[n].dense() for n in names]
        eager_logits = out.logits
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        try:
            cap, out, _ = _capture(model, ids)
            for name, ref in zip(names, eager_dense):
                torch.testing.assert_close(cap.operators[name].dense(), ref, **TOL)
            torch.testing.assert_close(out.logits, eager_logits, atol=1e-5, rtol=1e-5)
        finally:
            model.set_attn_implementation("eager")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padding_handled_and_warned(tiny, impl):
    kind, model, names, _ = tiny
    ids, mask = _ids(), _left_padding()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(ids, attention_mask=mask, output_attentions=True).attentions
        model.set_attn_implementation(impl)
        try:
            cap, _, msgs = _capture(model, ids, mask)
        finally:
            model.set_attn_implementation("eager")
    for i, name in enumerate(names):
        t = cap.operators[name].dense()
        torch.testing.assert_close(t[0, :, 3:, 3:], ref[i][0, :, 3:, 3:].float(), **TOL)  # real tokens
        torch.testing.assert_close(t[1], ref[i][1].float(), **TOL)  # unpadded row
        assert torch.all(t[0, :, :3, :] == 0) and torch.all(t[0, :, :, :3] == 0)  # pads: zero
        assert any(name in m and "padded batch" in m for m in msgs), msgs


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_position_ids_are_warned_with_either_kernel(tiny, impl):
    """Packed rows (position_ids that restart inside a row, as DataCollatorWithFlattening makes them, no mask):
    the operator is still the kernel's own attention, and a warning names the packing with either kernel
    (regression: only when the kernel got no mask, so eager, which gets a causal mask, was silent)."""
    kind, model, names, _ = tiny
    ids = _ids(batch=1)
    pos = torch.cat([torch.arange(L // 2), torch.arange(L - L // 2)])[None]
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(ids, position_ids=pos, output_attentions=True).attentions
        model.set_attn_implementation(impl)
        try:
            cap, _, msgs = _capture(model, ids, position_ids=pos)
        finally:
            model.set_attn_implementation("eager")
    for i, name in enumerate(names):
        torch.testing.assert_close(cap.operators[name].dense(), ref[i].float(), **TOL)
        assert any(name in m and "position_ids restart inside a row" in m for m in msgs), msgs


def _flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A user kernel registered in transformers' registry that gets flash-style (batch, keys) padding masks."""
    from transformers.integrations.sdpa_attention import repeat_kv

    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    n = query.shape[-2]
    ok = torch.ones(n, n, dtype=torch.bool).tril()
    if attention_mask is not None:
        ok = ok & attention_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=ok, scale=scaling)
    return out.nan_to_num().transpose(1, 2).contiguous(), None


def test_user_registered_kernel_with_flash_style_padding_mask():
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    model, names, _ = _make("llama")
    ids, mask = _ids(), _left_padding()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_attentions=True)
    AttentionInterface.register("esswatch_padding_kernel", _flash_like_attention)
    AttentionMaskInterface.register("esswatch_padding_kernel", flash_attention_mask)
    try:
        model.set_attn_implementation("esswatch_padding_kernel")
        with torch.no_grad():
            cap, out, msgs = _capture(model, ids, mask)
    finally:
        model.set_attn_implementation("eager")
        AttentionInterface._global_mapping.pop("esswatch_padding_kernel")
        AttentionMaskInterface._global_mapping.pop("esswatch_padding_kernel")
    torch.testing.assert_close(out.logits[:, 3:], ref.logits[:, 3:], atol=1e-5, rtol=1e-5)  # the kernel ran
    for i, name in enumerate(names):
        assert cap.probes[name]._record["mask"].dim() == 2  # it got the 2-D padding mask
        t = cap.operators[name].dense()
        torch.testing.assert_close(t[0, :, 3:, 3:], ref.attentions[i][0, :, 3:, 3:], **TOL)
        torch.testing.assert_close(t[1], ref.attentions[i][1], **TOL)
        assert torch.all(t[0, :, :3] == 0) and torch.all(t[0, :, :, :3] == 0)
    assert any("padded batch" in m for m in msgs)


def test_operator_times_values_reproduces_attention_output(tiny):
    kind, model, names, (vproj, read_value, oproj) = tiny
    ids = _ids()
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        seen = {}
        hooks = []
        for name in names:
            attn = model.get_submodule(name)
            hooks.append(
                getattr(attn, vproj).register_forward_hook(
                    lambda m, a, o, name=name: seen.__setitem__((name, "proj"), o)
                )
            )
            hooks.append(attn.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__((name, "out"), o[0])))
        try:
            with torch.no_grad():
                cap, _, _ = _capture(model, ids)
        finally:
            for h in hooks:
                h.remove()
            model.set_attn_implementation("eager")
        for name in names:
            attn = model.get_submodule(name)
            v = read_value(attn, seen[(name, "proj")])  # (b, kv_heads, L, hd)
            op = cap.operators[name]
            v = v.repeat_interleave(op.batch_shape[1] // v.shape[1], dim=1)
            y = (op.dense() @ v).transpose(1, 2).reshape(2, L, -1)
            with torch.no_grad():
                y = getattr(attn, oproj)(y)
            torch.testing.assert_close(y, seen[(name, "out")], atol=1e-5, rtol=1e-4)
            assert op.value_dim == v.shape[-1]


def test_capture_keeps_logits_and_rng_in_training_mode(tiny):
    kind, model, names, _ = tiny
    ids = _ids()
    model.train()
    try:
        torch.manual_seed(5)
        ref = model(ids).logits
        after_ref = torch.rand(3)
        torch.manual_seed(5)
        cap, out, _ = _capture(model, ids)
        assert torch.equal(out.logits, ref)
        assert torch.equal(torch.rand(3), after_ref)
        assert set(cap.operators) == set(names)
        assert not cap.operators[names[0]].q.requires_grad
    finally:
        model.eval()


def test_gemma2_softcapped_sliding_attention():
    T = transformers
    cfg = T.Gemma2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=VOCAB,
        sliding_window=3,
        attn_logit_softcapping=5.0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = T.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        cap, out, _ = _capture(model, _ids(), output_attentions=True)
    names = [f"model.layers.{i}.self_attn" for i in range(2)]
    assert list(cap.operators) == names and [cap.tss[n] for n in names] == [3, None]
    for i, name in enumerate(names):
        torch.testing.assert_close(cap.operators[name].dense(), out.attentions[i].float(), **TOL)
    assert cap.operators[names[0]].dense()[..., 5, :3].abs().max() == 0  # outside the window


@pytest.mark.parametrize("n", [1, 2])
def test_short_sequences(n):
    model, names, _ = _make("llama")
    mamba = _mamba("mamba2")
    ids = _ids()[:, :n]
    with torch.no_grad():
        cap, out, _ = _capture(model, ids, output_attentions=True)
        mcap, _, _ = _capture(mamba, ids)
    for i, name in enumerate(names):
        assert cap.operators[name].seq_len == n
        torch.testing.assert_close(cap.operators[name].dense(), out.attentions[i], **TOL)
    op = mcap.operators["backbone.layers.0.mixer"]
    assert op.seq_len == n and torch.isfinite(op.dense()).all()
    if n == 2:  # a single index: H_1 is 1 x 1, its ESS is 1 unless T[1, 0] == 0
        ess = esswatch.entropy_ess(op, [1])
        assert ess.shape == (2, 4, 1) and torch.allclose(ess, torch.ones_like(ess))


def test_keep_graph_lets_gradients_reach_the_parameters():
    model, names, _ = _make("llama")
    with esswatch.capture(model, keep_graph=True) as cap:
        model(_ids())
    cap.operators[names[0]].dense().square().sum().backward()
    layer = model.get_submodule(names[0])
    assert layer.q_proj.weight.grad.abs().sum() > 0 and layer.k_proj.weight.grad.abs().sum() > 0
    assert layer.v_proj.weight.grad is None

    mamba = _mamba("mamba2")
    with esswatch.capture(mamba, keep_graph=True) as cap:
        mamba(_ids())
    op = cap.operators["backbone.layers.0.mixer"]
    assert op.q.requires_grad
    op.dense().square().sum().backward()
    mixer = mamba.get_submodule("backbone.layers.0.mixer")
    assert mixer.A_log.grad.abs().sum() > 0 and mixer.in_proj.weight.grad.abs().sum() > 0


def test_heads_and_rows_are_sliced_consistently():
    model, names, _ = _make("llama")  # 4 query heads, 2 kv heads
    ids = _ids(batch=3)
    with torch.no_grad(), esswatch.capture(model) as full:
        model(ids)
    with torch.no_grad(), esswatch.capture(model, batch_rows=2, heads=3) as part:
        model(ids)
    for name in names:
        a, b = full.operators[name].dense(), part.operators[name].dense()
        assert b.shape == (2, 3, L, L)
        torch.testing.assert_close(b, a[:2, :3])


# -- registry hygiene, freeing, warnings ------------------------------------------------------------------
def test_registry_restored_after_exit_exception_and_nesting():
    before = _registry_state()
    m1, names1, _ = _make("llama")
    m2, _, _ = _make("gpt2")
    ids = _ids()
    with esswatch.capture(m1):
        assert AttentionInterface.__dict__["get_interface"] is not before[0]["get_interface"]
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward  # wrapped
        with esswatch.capture(m2):
            m2(ids)
        assert "__getitem__" in AttentionInterface.__dict__  # still one capture open
        m1(ids)
    assert _registry_state() == before
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    with pytest.raises(ZeroDivisionError):
        with esswatch.capture(m1):
            m1(ids)
            1 / 0
    assert _registry_state() == before
    cap = esswatch.capture(m1).attach()
    cap.armed = True
    m1(ids)
    cap.detach()
    cap.detach()  # safe to repeat
    assert _registry_state() == before
    assert not cap.operators
    for _ in range(20):  # repeated steps leave nothing behind
        with torch.no_grad(), esswatch.capture(m1) as cap:
            m1(ids)
    assert not attention_registry._listeners and not attention_registry._wrappers
    assert not attention_registry.is_installed() and _registry_state() == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in m1.modules())


def test_captured_tensors_and_model_are_freed():
    model, names, _ = _make("qwen2")
    with torch.no_grad(), esswatch.capture(model) as cap:
        model(_ids())
    op = cap.operators[names[0]]
    refs = [weakref.ref(op.q), weakref.ref(op.k), weakref.ref(cap)]
    model_ref = weakref.ref(model)
    del cap, op
    gc.collect()
    assert all(r() is None for r in refs)
    del model
    gc.collect()
    assert model_ref() is None


def test_bypassed_registry_and_kv_cache_are_warned():
    T = transformers
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, reorder_and_upcast_attn=True)
    cfg._attn_implementation = "eager"
    model = T.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        cap, _, msgs = _capture(model, _ids())
    assert not cap.operators
    assert any("transformer.h.0.attn" in m and "did not call" in m for m in msgs), msgs

    # a model whose only attention bypasses the registry: construction fails naming it (tests/test_unsupported.py)
    cfg = T.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    with pytest.raises(
        esswatch.probes.UnsupportedModelError,
        match=r"BloomAttention .*transformer\.h\.0\.self_attention.*without transformers'",
    ):
        esswatch.capture(T.BloomForCausalLM(cfg))

    model, names, _ = _make("llama")
    ids = _ids()
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
        cap, _, msgs = _capture(model, ids[:, :1], past_key_values=past, use_cache=True)
    assert not cap.operators
    assert any(names[0] in m and "key length" in m for m in msgs), msgs


def _captures_eager_probabilities(model, ids, names):
    """Capture ``model(ids)``: no warning, bit-identical logits, operators for exactly ``names`` (the attention
    layers in order), each equal to the eager attention probabilities the model returns. Returns the capture."""
    with torch.no_grad():
        ref = model(ids, output_attentions=True)
        cap, out, msgs = _capture(model, ids)
    assert not msgs, msgs
    assert torch.equal(out.logits, ref.logits)
    assert list(cap.operators) == names
    for i, name in enumerate(names):
        op = cap.operators[name]
        assert isinstance(op, SoftmaxAttention)
        torch.testing.assert_close(op.dense(), ref.attentions[i].float(), **TOL)
    return cap


def _more_decoders():
    """Decoder-only models beyond ``MODELS`` (tiny configs): ``(config, model class, attention names,
    expected sliding windows)``."""
    T = transformers
    c = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    gpt = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    attn = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    return {
        "qwen3": (T.Qwen3Config(**c, num_key_value_heads=2, head_dim=8), T.Qwen3ForCausalLM, attn, None),
        "phi3": (T.Phi3Config(**c, pad_token_id=0), T.Phi3ForCausalLM, attn, None),
        "phi": (T.PhiConfig(**c), T.PhiForCausalLM, attn, None),
        "gemma": (T.GemmaConfig(**c, head_dim=8, num_key_value_heads=1), T.GemmaForCausalLM, attn, None),
        "gemma3": (  # layer types alternate sliding (window 4) and full attention
            T.Gemma3TextConfig(**c, head_dim=8, num_key_value_heads=2, sliding_window=4),
            T.Gemma3ForCausalLM,
            attn,
            "sliding",
        ),
        "olmo2": (T.Olmo2Config(**c), T.Olmo2ForCausalLM, attn, None),
        "cohere": (T.CohereConfig(**c), T.CohereForCausalLM, attn, None),
        "granite": (T.GraniteConfig(**c), T.GraniteForCausalLM, attn, None),
        "starcoder2": (
            T.Starcoder2Config(**c, num_key_value_heads=2, sliding_window=5),
            T.Starcoder2ForCausalLM,
            attn,
            "sliding",
        ),
        "gpt_bigcode": (  # multi-query attention
            T.GPTBigCodeConfig(**gpt, multi_query=True),
            T.GPTBigCodeForCausalLM,
            ["transformer.h.0.attn", "transformer.h.1.attn"],
            None,
        ),
        "opt": (
            T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64),
            T.OPTForCausalLM,
            ["model.decoder.layers.0.self_attn", "model.decoder.layers.1.self_attn"],
            None,
        ),
        "codegen": (
            T.CodeGenConfig(**gpt, rotary_dim=4),
            T.CodeGenForCausalLM,
            ["transformer.h.0.attn", "transformer.h.1.attn"],
            None,
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "qwen3",
        "phi3",
        "phi",
        "gemma",
        "gemma3",
        "olmo2",
        "cohere",
        "granite",
        "starcoder2",
        "gpt_bigcode",
        "opt",
        "codegen",
    ],
)
def test_more_decoders_capture_their_own_attention_probabilities(kind):
    """Twelve more decoder architectures (rotary variants, QK norms, multi-query and grouped-query heads,
    learned positions, sliding windows): the captured operators are the eager attention probabilities
    the model returns, with no warning, and the logits are bit-identical with the capture attached."""
    from esswatch.integrations.transformers.provider import calls_attention_registry

    cfg, model_cls, names, window = _more_decoders()[kind]
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    if not calls_attention_registry(type(model.get_submodule(names[0]))):  # CodeGen before transformers 5.24
        pytest.skip(f"transformers {transformers.__version__}: {kind} bypasses the registry (reported as unsupported)")
    cap = _captures_eager_probabilities(
        model, torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1)), names
    )
    windows = [cap.operators[n].window for n in names]
    if window == "sliding":  # at least one layer has a window, and it is what the probabilities show
        assert any(w is not None for w in windows), windows
        for name, w in zip(names, windows):
            if w is not None:
                t = cap.operators[name].dense()
                assert torch.all(torch.tril(t, diagonal=-w) == 0) and torch.all(t.diagonal(-(w - 1), -2, -1) > 0)
    else:
        assert windows == [None, None]


def test_recurrent_gemma_attention_is_captured_and_its_rg_lru_block_named():
    """RecurrentGemma: the local attention layer is captured (its probabilities as the model returns them);
    the RG-LRU recurrent block has no probe and no ``A_log``, and is named in one warning, not left out silently."""
    T = transformers
    cfg = T.RecurrentGemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        lru_width=32,
        intermediate_size=64,
        attention_window_size=8,
        block_types=["recurrent", "attention"],
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = T.RecurrentGemmaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, output_attentions=True)
        cap, out, msgs = _capture(model, ids)
    assert torch.equal(out.logits, ref.logits)
    assert list(cap.operators) == ["model.layers.1.temporal_block"]
    attentions = [a for a in ref.attentions if a is not None]
    torch.testing.assert_close(cap.operators["model.layers.1.temporal_block"].dense(), attentions[0].float(), **TOL)
    assert list(cap.unsupported) == ["model.layers.0.temporal_block"]
    assert len(msgs) == 1 and "RecurrentGemmaRecurrentBlock" in msgs[0] and "model.layers.0.temporal_block" in msgs[0]


@pytest.mark.parametrize("kind", ["gptj", "falcon"])
def test_gptj_and_falcon_through_the_registry(kind):
    """GPT-J and Falcon call the attention registry from transformers 5.24 (before, they are
    reported as unsupported, like Bloom above): then their captured operators are the eager
    attention probabilities the model returns, and the capture leaves the logits unchanged."""
    from esswatch.integrations.transformers.provider import calls_attention_registry

    T = transformers
    if kind == "gptj":
        cfg = T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, rotary_dim=4)
        model, attn = T.GPTJForCausalLM, "transformer.h.{}.attn"
    else:
        cfg = T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
        model, attn = T.FalconForCausalLM, "transformer.h.{}.self_attention"
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = model(cfg).eval()
    names = [attn.format(i) for i in range(2)]
    if not calls_attention_registry(type(m.get_submodule(names[0]))):
        pytest.skip(f"transformers {T.__version__}: {kind} bypasses the registry (tested as unsupported)")
    _captures_eager_probabilities(m, _ids(), names)


def test_cross_attention_is_not_selected():
    T = transformers
    cfg = T.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=64, add_cross_attention=True)
    model = T.GPT2LMHeadModel(cfg).eval()
    with pytest.warns(
        CaptureWarning,
        match=r"(?s)1 sequence-mixing layer of GPT2LMHeadModel cannot be captured"
        r".*transformer\.h\.0\.crossattention\): cross-attention",
    ):
        cap = esswatch.capture(model)
    assert list(cap.probes) == ["transformer.h.0.attn"]
    assert list(cap.unsupported) == ["transformer.h.0.crossattention"]


# -- Mamba / FalconMamba / Mamba2 ---------------------------------------------------------------------------
def _mamba(kind):
    T = transformers
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = T.MambaConfig(
            hidden_size=16,
            state_size=4,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            expand=2,
            conv_kernel=3,
            time_step_rank=4,
        )
        return T.MambaForCausalLM(cfg).eval()
    if kind == "falcon_mamba":
        cfg = T.FalconMambaConfig(
            hidden_size=16,
            state_size=4,
            num_hidden_layers=2,
            vocab_size=VOCAB,
            expand=2,
            conv_kernel=3,
            time_step_rank=4,
        )
        return T.FalconMambaForCausalLM(cfg).eval()
    if kind == "jamba":  # layer 0: JambaMambaMixer, layer 1: attention
        cfg = T.JambaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            num_experts=2,
            mamba_d_state=4,
            mamba_dt_rank=4,
            mamba_d_conv=3,
            mamba_expand=2,
        )
        cfg._attn_implementation = "eager"
        return T.JambaForCausalLM(cfg).eval()
    cfg = T.Mamba2Config(
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        expand=2,
        conv_kernel=3,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        chunk_size=4,
    )
    return T.Mamba2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "jamba"])
def test_mamba_operator_reproduces_mixer_output(kind):
    model = _mamba(kind)
    ids = _ids()
    seen, hooks = {}, []
    mixers = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("MambaMixer")}
    for name, mixer in mixers.items():
        hooks.append(mixer.x_proj.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "u"), a[0])))
        hooks.append(mixer.in_proj.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "xz"), o)))
        hooks.append(mixer.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "out"), o)))
    try:
        with torch.no_grad():
            ref = model(ids).logits
            cap, out, _ = _capture(model, ids)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out.logits, ref)
    assert set(mixers) <= set(cap.operators)
    for name, mixer in mixers.items():
        op = cap.operators[name]
        D = mixer.intermediate_size
        assert isinstance(op, GatedRecurrence) and op.batch_shape == (2, D) and op.state_size == 4
        assert cap.tss[name] == 4 and op.value_dim == 1
        u = seen[(name, "u")].transpose(1, 2)  # (b, D, L), the scan's input
        gate = seen[(name, "xz")].chunk(2, dim=-1)[1].transpose(1, 2)
        y = (op.dense() @ u[..., None])[..., 0] + mixer.D[None, :, None] * u
        y = y * F.silu(gate)
        with torch.no_grad():
            y = mixer.out_proj(y.transpose(1, 2))
        torch.testing.assert_close(y, seen[(name, "out")], atol=1e-5, rtol=1e-4)


def _mamba2_x(mixer, xbc_pre_conv):
    """The scan input x of a Mamba2 mixer from in_proj's output (depthwise causal conv + SiLU)."""
    w = mixer.conv1d.weight
    x = F.conv1d(xbc_pre_conv.transpose(1, 2), w, mixer.conv1d.bias, padding=w.shape[-1] - 1, groups=w.shape[0])[
        ..., :L
    ]
    x = F.silu(x).transpose(1, 2)[..., : mixer.intermediate_size]
    return x.reshape(x.shape[0], L, mixer.num_heads, mixer.head_dim).permute(0, 2, 1, 3)  # (b, h, L, p)


def test_mamba2_operator_reproduces_scan_and_mixer_output():
    model = _mamba("mamba2")
    ids = _ids()
    seen, hooks = {}, []
    mixers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Mamba2Mixer"}
    for name, mixer in mixers.items():
        hooks.append(mixer.in_proj.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "zxbcdt"), o)))
        hooks.append(mixer.norm.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "norm_in"), a)))
        hooks.append(mixer.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "out"), o)))
    try:
        with torch.no_grad():
            ref = model(ids).logits
            cap, out, _ = _capture(model, ids)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out.logits, ref)
    assert set(cap.operators) == set(mixers)
    for name, mixer in mixers.items():
        op = cap.operators[name]
        assert isinstance(op, GatedRecurrence) and op.batch_shape == (2, 4) and op.state_size == 4
        assert op.value_dim == 8 and cap.tss[name] == 4
        zxbcdt = seen[(name, "zxbcdt")]
        gate, xbc, _ = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
        x = _mamba2_x(mixer, xbc)
        y = op.dense() @ x + mixer.D[None, :, None, None] * x  # (b, h, L, p)
        y = y.permute(0, 2, 1, 3).reshape(2, L, -1)
        scan_out, norm_gate = seen[(name, "norm_in")]
        torch.testing.assert_close(y, scan_out, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            full = mixer.out_proj(mixer.norm(y, gate))
        torch.testing.assert_close(full, seen[(name, "out")], atol=1e-5, rtol=1e-4)

    with torch.no_grad(), esswatch.capture(model, heads=3, batch_rows=1) as part:
        model(ids)
    for name in mixers:
        torch.testing.assert_close(part.operators[name].dense(), cap.operators[name].dense()[:1, :3])


# -- hybrids whose Mamba2 mixers copy Mamba2Mixer: Bamba, Zamba2, Granite 4, Nemotron-H, Falcon-H1 --------
def _hybrid(kind):
    """A tiny hybrid model whose first layer is a Mamba2-style mixer (4 heads of dim 8, N = 4, 2 groups).

    ``initializer_range=0.5``: at the default 0.02 the mixers' ``T x`` is below float32 round-off
    of their ``D x`` term, and the output check would not see the operator at all."""
    if kind in DELTANETS:
        return _gated_deltanet(kind)
    T = transformers
    torch.manual_seed(0)
    common = dict(
        initializer_range=0.5,
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
    )
    mamba = dict(mamba_n_heads=4, mamba_d_head=8, mamba_d_state=4, mamba_n_groups=2, mamba_d_conv=3)
    if kind == "bamba":
        cfg = T.BambaConfig(**common, **mamba, mamba_expand=2, mamba_chunk_size=4, attn_layer_indices=[1])
        model = T.BambaForCausalLM
    elif kind == "zamba2":
        cfg = T.Zamba2Config(
            initializer_range=0.5,
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            mamba_d_state=4,
            mamba_headdim=8,
            n_mamba_heads=4,
            mamba_ngroups=2,
            mamba_d_conv=3,
            mamba_expand=2,
            chunk_size=4,
            layers_block_type=["mamba", "hybrid"],
            num_mem_blocks=1,
            use_mem_rope=False,
        )
        model = T.Zamba2ForCausalLM
    elif kind == "granitemoehybrid":
        cfg = T.GraniteMoeHybridConfig(
            **common,
            **mamba,
            mamba_expand=2,
            mamba_chunk_size=4,
            layer_types=["mamba", "attention"],
            num_local_experts=0,
        )
        model = T.GraniteMoeHybridForCausalLM
    elif kind == "nemotron_h":
        cfg = T.NemotronHConfig(
            **common,
            mamba_num_heads=4,
            mamba_head_dim=8,
            ssm_state_size=4,
            n_groups=2,
            conv_kernel=3,
            expand=2,
            chunk_size=4,
            layers_block_type=["mamba", "attention"],
        )
        model = T.NemotronHForCausalLM
    else:  # Falcon-H1: muP multipliers on the mixer's input and on in_proj's output
        cfg = T.FalconH1Config(
            **common,
            **mamba,
            mamba_d_ssm=32,
            mamba_chunk_size=4,
            ssm_in_multiplier=0.7,
            ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9],
        )
        model = T.FalconH1ForCausalLM
    cfg._attn_implementation = "eager"
    return model(cfg).eval()


HYBRIDS = ["bamba", "zamba2", "granitemoehybrid", "nemotron_h", "falcon_h1"]
DELTANETS = ["qwen3_next", "qwen3_5"]


def _gated_deltanet(kind):
    """A tiny Qwen3-Next or Qwen3.5: a Gated DeltaNet layer (2 key heads of dim 8 shared by 4 value heads of
    dim 8), then attention. ``A_log`` is set to ``log 0.2``: at its default initialization (``A`` up to 16) the
    decays are so fast that ``T`` is nearly diagonal."""
    T = transformers
    if kind == "qwen3_5" and not hasattr(T, "Qwen3_5TextConfig"):
        pytest.skip(f"transformers {T.__version__} has no Qwen3.5")
    common = dict(
        initializer_range=0.5,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"],
    )
    torch.manual_seed(0)
    if kind == "qwen3_next":
        moe = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16)
        cfg, model = T.Qwen3NextConfig(**common, **moe), T.Qwen3NextForCausalLM
    else:
        cfg, model = T.Qwen3_5TextConfig(**common), T.Qwen3_5ForCausalLM
    cfg._attn_implementation = "eager"
    m = model(cfg).eval()
    with torch.no_grad():
        m.model.layers[0].linear_attn.A_log.fill_(math.log(0.2))
    return m


@pytest.mark.parametrize("kind", DELTANETS)
def test_gated_deltanet_reproduces_the_layer_output(kind):
    """The captured ``DeltaRule`` operator applied to the layer's own values reproduces the delta rule's output
    (the input of the layer's gated norm), and, with the gated norm and ``out_proj``, the layer's output. At
    L = 8 the 8 value channels of a head determine ``T`` completely. Logits are bit-identical with the capture."""
    from esswatch.integrations.transformers.delta import gated_delta_inputs

    from esswatch.operators import DeltaRule

    model = _gated_deltanet(kind)
    layer = model.model.layers[0].linear_attn
    seen, hooks = {}, []
    hooks.append(layer.norm.register_forward_hook(lambda m, a, o: seen.__setitem__("core", a)))
    hooks.append(layer.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o)))
    hooks.append(
        layer.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__("in", a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
    )
    try:
        with torch.no_grad():
            ref = model(_ids()).logits
            cap, out, msgs = _capture(model, _ids())
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out.logits, ref) and not msgs, msgs
    op = cap.operators["model.layers.0.linear_attn"]
    assert isinstance(op, DeltaRule) and op.batch_shape == (2, 4) and op.state_size == 8 and op.value_dim == 8
    assert cap.tss["model.layers.0.linear_attn"] == 8
    with torch.no_grad():
        v = gated_delta_inputs(layer, seen["in"])[2].float()  # (b, h, L, dv): the conv's SiLU output
    assert torch.linalg.matrix_rank(v[0, 0]) == L  # the values span R^L: T is checked in full
    core, gate = seen["core"]
    got = (op.dense() @ v).transpose(1, 2).reshape(core.shape)
    torch.testing.assert_close(got, core, atol=1e-5, rtol=1e-4)
    assert (op.dense()[..., 2:, :2].abs() > 1e-4).any()  # not a nearly diagonal operator
    with torch.no_grad():
        full = layer.out_proj(layer.norm(got, gate).reshape(2, L, -1))
    torch.testing.assert_close(full, seen["out"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", HYBRIDS)
def test_hybrid_mamba2_mixers_reproduce_their_output(kind):
    """Each mixer's captured operator, applied as the mixer applies its scan (``T x + D x``, then the
    gated norm, or ``silu(gate)`` where Falcon-H1 has no norm), reproduces the input of the mixer's own
    ``out_proj`` and the mixer's output; the logits are bit-identical with the capture attached."""
    model = _hybrid(kind)
    ids = _ids()
    mixers = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "A_log", None), torch.Tensor)}
    assert mixers
    seen, hooks = {}, []
    for name, mixer in mixers.items():
        hooks.append(mixer.in_proj.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "zxbcdt"), o)))
        hooks.append(mixer.out_proj.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "gated"), a[0])))
        hooks.append(mixer.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__((n, "out"), o)))
    try:
        with torch.no_grad():
            ref = model(ids).logits
            cap, out, msgs = _capture(model, ids)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out.logits, ref)
    assert not cap.unsupported and not msgs, msgs
    for name, mixer in mixers.items():
        op = cap.operators[name]
        assert isinstance(op, GatedRecurrence) and op.batch_shape == (2, 4) and op.state_size == 4
        assert op.value_dim == 8 and cap.tss[name] == 4
        zxbcdt = seen[(name, "zxbcdt")]
        if kind == "falcon_h1":
            zxbcdt = zxbcdt * mixer.mup_vector
        gate, xbc, _ = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
        x = _mamba2_x(mixer, xbc)
        scan = op.dense() @ x
        y = (scan + mixer.D[None, :, None, None] * x).permute(0, 2, 1, 3).reshape(2, L, -1)
        with torch.no_grad():
            gated = mixer.norm(y, gate) if getattr(mixer, "mamba_rms_norm", True) else y * F.silu(gate)
            full = mixer.out_proj(gated)
        assert scan.abs().max() > 0.1 * y.abs().max()  # the operator's part is not lost in round-off
        torch.testing.assert_close(gated, seen[(name, "gated")], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(full, seen[(name, "out")], atol=1e-5, rtol=1e-4)


def test_watch_measures_a_hybrid_mixer_against_numpy():
    """``ESSWatch`` on a training step of Bamba (a Mamba2 mixer, then attention): both layers measured, no
    failure, and the mixer's logged per-index entropy-ESS equals NumPy SVDs of ``T`` rebuilt in float64
    from the mixer's own ``in_proj`` output (``reference.gated_recurrence_dense``)."""
    from reference import entropy_ess_ref, gated_recurrence_dense

    model = _hybrid("bamba").train()
    ids = _ids()
    mixer = model.model.layers[0].mamba
    seen = {}
    hook = mixer.in_proj.register_forward_hook(lambda m, a, o: seen.setdefault("zxbcdt", o.detach()))
    try:
        with esswatch.ESSWatch(model, every_n_steps=1, indices="all", histograms=False, images=False) as watch:
            model(ids, labels=ids).loss.backward()
            watch.step()
            got = watch.latest()
    finally:
        hook.remove()
    assert got["failures"] == 0 and set(got["layers"]) == {"model.layers.0.mamba", "model.layers.1.self_attn"}
    _, xbc, dt = seen["zxbcdt"].double().split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    w = mixer.conv1d.weight.detach().double()
    xbc = F.silu(F.conv1d(xbc.transpose(1, 2), w, mixer.conv1d.bias.detach().double(), padding=2, groups=w.shape[0]))
    _, B, C = xbc[..., :L].transpose(1, 2).split([mixer.intermediate_size, 8, 8], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias.detach().double()).clamp(*mixer.time_step_limit)  # (b, L, h)
    A = -torch.exp(mixer.A_log.detach().double())
    group = torch.arange(4) // 2  # heads 0, 1 read group 0; heads 2, 3 group 1
    q = C.view(2, L, 2, 4)[:, :, group].permute(0, 2, 1, 3)  # (b, h, L, N)
    k = dt.permute(0, 2, 1)[..., None] * B.view(2, L, 2, 4)[:, :, group].permute(0, 2, 1, 3)
    log_decay = (dt * A).permute(0, 2, 1)[..., None].expand_as(q)
    layer = got["layers"]["model.layers.0.mamba"]
    want = entropy_ess_ref(gated_recurrence_dense(q, k, log_decay), layer["indices"]).mean(axis=(0, 1))
    np.testing.assert_allclose(layer["entropy"]["per_index"], want, rtol=1e-5)


@pytest.mark.parametrize("kind", DELTANETS)
def test_watch_measures_a_gated_deltanet_from_its_gramians_against_numpy(kind, monkeypatch):
    """``ESSWatch`` on a training step of a Gated DeltaNet model at L = 64 (>= 6 head_k_dim: ``auto`` takes the
    Gramians; ``T`` is never built, ``delta_rule_dense`` is not called): the layer's logged per-index
    entropy-ESS equals NumPy SVDs of ``T`` rebuilt in float64 by running the recurrence literally
    (``reference.delta_rule_loop``) on the layer's own delta-rule inputs."""
    from esswatch.integrations.transformers.delta import gated_delta_inputs
    from reference import delta_rule_loop, entropy_ess_ref

    import esswatch.operators.delta as delta

    monkeypatch.setattr(delta, "delta_rule_dense", lambda *a, **kw: pytest.fail("T was materialized"))
    model = _gated_deltanet(kind).train()
    layer = model.model.layers[0].linear_attn
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))
    seen = {}

    def keep_input(m, a, kw):
        seen.setdefault("in", (a[0] if a else kw["hidden_states"]).detach())

    hook = layer.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with esswatch.ESSWatch(model, every_n_steps=1, histograms=False, images=False) as watch:
            model(ids, labels=ids).loss.backward()
            watch.step()
            got = watch.latest()
    finally:
        hook.remove()
    assert got["failures"] == 0 and "model.layers.0.linear_attn" in got["layers"]
    with torch.no_grad():
        q, k, _v, beta, g = gated_delta_inputs(layer, seen["in"])
    measured = got["layers"]["model.layers.0.linear_attn"]
    want = entropy_ess_ref(delta_rule_loop(q, k, beta, g), measured["indices"]).mean(axis=(0, 1))
    np.testing.assert_allclose(measured["entropy"]["per_index"], want, rtol=1e-5)


@pytest.mark.parametrize("kind", HYBRIDS + DELTANETS)
def test_hybrid_training_with_the_watch_is_bit_identical(kind):
    """Three AdamW steps of each hybrid with ``ESSWatch(every_n_steps=1)``, blocking and in the background:
    the parameters and the global RNG stream afterwards equal those of training without the watch, every
    mixer and attention layer is measured, and nothing fails. In the background each step first waits for
    the worker, so that no sample is skipped as busy (timing would otherwise decide whether step 2 is
    measured)."""

    def train(background):
        model = _hybrid(kind).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(3)
        torch.manual_seed(7)
        watch = None
        if background is not None:
            watch = esswatch.ESSWatch(model, every_n_steps=1, background=background, histograms=False, images=False)
        for _ in range(3):
            ids = torch.randint(0, VOCAB, (2, 32), generator=g)
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if watch is not None:
                if watch._offload is not None:  # the previous sample is done: none is skipped as busy
                    assert watch._offload.worker.wait_idle(timeout=60)
                watch.step()
        got = None
        if watch is not None:
            watch.close()
            got = (watch.failures, sorted(watch.latest()["layers"]), watch.latest()["step"])
        return [p.detach().clone() for p in model.parameters()], torch.rand(4), got

    plain, rng, _ = train(None)
    mixers = [n for n, m in _hybrid(kind).named_modules() if isinstance(getattr(m, "A_log", None), torch.Tensor)]
    for background in (False, True):
        params, rng_after, (failures, layers, step) = train(background)
        assert all(torch.equal(a, b) for a, b in zip(plain, params))
        assert torch.equal(rng, rng_after)
        assert failures == 0 and step == 2 and set(mixers) < set(layers)


def test_mamba_padding_is_warned():
    model = _mamba("mamba")
    with torch.no_grad():
        cap, _, msgs = _capture(model, _ids(), _left_padding())
    t = cap.operators["backbone.layers.0.mixer"].dense()
    assert torch.all(t[0, :, :3, :] == 0) and torch.all(t[0, :, :, :3] == 0)
    assert any("backbone.layers.0.mixer" in m and "padded batch" in m for m in msgs), msgs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sdpa_kernel_matches_eager_probabilities():
    model, names, _ = _make("mistral")
    model = model.cuda()
    ids, mask = _ids().cuda(), _left_padding().cuda()
    try:
        for attention_mask in (None, mask):
            with torch.no_grad():
                model.set_attn_implementation("eager")
                ref = model(ids, attention_mask=attention_mask, output_attentions=True)
                model.set_attn_implementation("sdpa")
                cap, out, _ = _capture(model, ids, attention_mask)
            rows = slice(3, None) if attention_mask is not None else slice(None)
            for i, name in enumerate(names):
                t = cap.operators[name].dense()
                assert t.is_cuda
                torch.testing.assert_close(
                    t[..., rows, rows], ref.attentions[i][..., rows, rows].float(), atol=1e-4, rtol=1e-4
                )
    finally:
        model.set_attn_implementation("eager")


def test_mamba_decoding_step_is_skipped_with_warning():
    model = _mamba("mamba")
    ids = _ids()
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache_params
        cap, _, msgs = _capture(model, ids[:, :1], cache_params=cache, use_cache=True)
    assert not cap.operators
    assert any("backbone.layers.0.mixer" in m and "cached state" in m for m in msgs), msgs


def test_watch_measures_a_left_padded_batch_at_length_1024(tmp_path):
    """A left-padded batch row's blocks are all zero at the indices inside its padding. Before
    ``esswatch/engine/scaling.py`` the default estimator raised there (float32, blocks large enough for
    the quadrature) and the watch skipped the layer. A one-layer Llama whose queries are scaled by 8
    (sharper, lower-ESS attention, as after training), L = 1024, row 0 left-padded by 700 tokens: the
    watch's per-index ESS must match NumPy SVDs of the model's own attention probabilities (eager,
    ``output_attentions``, padded rows and columns zero as captured), within ``rtol``."""
    from reference import entropy_ess_ref

    n = 1024
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(8.0)
    # tokens drawn with seed 4: the live row's blocks then go to the quadrature at indices inside row 0's
    # padding (with seeds 0-3 the previous code measured the layer without a failure)
    ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[0, :700] = 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with esswatch.ESSWatch(model, logdir=str(tmp_path), every_n_steps=1) as watch:
            out = model(ids, attention_mask=mask, output_attentions=True)
            watch.step()
            got = watch.latest()
    assert got["failures"] == 0, [str(x.message) for x in w]
    layer = got["layers"]["model.layers.0.self_attn"]
    idx = layer["indices"]
    t = out.attentions[0].detach().double().clone()
    t[0, :, :700, :] = 0
    t[0, :, :, :700] = 0
    ref = entropy_ess_ref(t.numpy(), idx)  # (2, 4, indices)
    assert (ref[0, :, [i <= 700 for i in idx]] == 0).all()  # inside the padding: ESS 0
    want = ref.mean(axis=(0, 1))
    for a, b in zip(layer["entropy"]["per_index"], want):
        assert abs(a - b) <= 0.02 * b + 1e-9
