"""Attention dropout is not part of the captured operator: in a training-mode forward with
dropout active, esswatch captures the pre-dropout attention probabilities, i.e. exactly the
probabilities the same layer returns in eval mode for the same input (issue 12, item 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esswatch

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB, L = 50, 9


def test_hf_llama_attention_dropout_is_not_captured():
    transformers = pytest.importorskip("transformers")
    # one layer: its input (the embeddings) is the same in train and eval mode
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        attention_dropout=0.5,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, VOCAB, (2, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()
        ref = model(ids, output_attentions=True)
        model.train()
        torch.manual_seed(3)
        with esswatch.capture(model) as cap:
            out = model(ids, output_attentions=True)
    assert not torch.allclose(out.logits, ref.logits)  # dropout was active in the forward
    assert not torch.allclose(out.attentions[0], ref.attentions[0])  # the layer applied dropped-out weights
    torch.testing.assert_close(
        cap.operators["model.layers.0.self_attn"].dense(), ref.attentions[0], atol=2e-6, rtol=1e-5
    )  # captured: the pre-dropout probabilities


def test_multihead_attention_dropout_is_not_captured():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, L, 16, dtype=torch.float64)
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    with torch.no_grad():
        mha.eval()
        _, ref = mha(x, x, x, attn_mask=mask, average_attn_weights=False)
        mha.train()
        with esswatch.capture(mha) as cap:
            _, got = mha(x, x, x, attn_mask=mask, average_attn_weights=False)
    assert not torch.allclose(got, ref)
    torch.testing.assert_close(cap.operators[""].dense(), ref)
