"""``generate()`` under an armed capture: the prefill is captured exactly, decoding steps are
not, and the capture says so once (issue 12, item 8). Tiny random-initialised models."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import esswatch  # noqa: E402
from esswatch.probes import CaptureWarning  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB, L, NEW = 50, 7, 4
DECODE = "only the prefill (the first, full-sequence forward) is measured"


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def mamba():
    cfg = transformers.MambaConfig(
        hidden_size=16,
        state_size=4,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        expand=2,
        conv_kernel=3,
        time_step_rank=4,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(cfg).eval()


def _prompt():
    return torch.randint(1, VOCAB, (2, L), generator=torch.Generator().manual_seed(1))


def _generate(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, **kw)


def test_llama_generate_captures_the_prefill_and_warns_once_about_decoding():
    model, ids = llama(), _prompt()
    with torch.no_grad():
        ref_out = _generate(model, ids)
        probs = model(ids, output_attentions=True).attentions  # the model's own prefill probabilities
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with esswatch.capture(model) as cap:
                out = _generate(model, ids)
            ops = cap.operators
    assert torch.equal(out, ref_out) and out.shape[1] == L + NEW  # capture changes nothing
    msgs = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(msgs) == 1 and DECODE in msgs[0] and "generate()" in msgs[0], msgs
    assert "model.layers.0.self_attn" in msgs[0]
    assert sorted(ops) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for i in range(2):
        t = ops[f"model.layers.{i}.self_attn"].dense()
        assert t.shape == (2, 4, L, L)  # the prompt, not a decoding step
        torch.testing.assert_close(t, probs[i], atol=2e-6, rtol=1e-5)


def test_plain_forward_and_a_second_capture_warn_again_only_on_decoding():
    model, ids = llama(), _prompt()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with esswatch.capture(model):
            model(ids)  # one full forward: nothing to warn about
            model(ids)  # a second full forward (no cache): not a decoding step
        assert not [w for w in caught if issubclass(w.category, CaptureWarning)]
        with esswatch.capture(model):
            _generate(model, ids)
            _generate(model, ids)  # once per capture
    assert sum(issubclass(w.category, CaptureWarning) and DECODE in str(w.message) for w in caught) == 1


def test_mamba_generate_warns_once_about_decoding():
    model, ids = mamba(), _prompt()
    with torch.no_grad():
        ref_out = _generate(model, ids)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with esswatch.capture(model) as cap:
                out = _generate(model, ids)
            ops = cap.operators
    assert torch.equal(out, ref_out)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(msgs) == 1 and DECODE in msgs[0], msgs
    assert sorted(ops) == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert all(op.seq_len == L for op in ops.values())
