"""One rule for models with layers esswatch cannot capture (issue 12, item 7).

Nothing capturable: construction (``esswatch.capture``, ``ESSWatch``, the Trainer's and
Lightning's callbacks at setup) raises ``UnsupportedModelError`` naming each layer type
and why. Some capturable: one ``CaptureWarning`` at construction lists the others, and
training runs without further capture warnings. Tiny random-initialised Hugging Face
models built from configs (nothing downloaded).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import esswatch
from esswatch.probes import CaptureWarning, UnsupportedModelError
from esswatch.watch import ESSWarning

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 50
REGISTRY = "without transformers' attention-function registry"
BIDIRECTIONAL = "bidirectional attention (is_causal = False)"


def bloom():
    cfg = transformers.BloomConfig(
        hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    return transformers.BloomForCausalLM(cfg)


def gpt_neo():
    cfg = transformers.GPTNeoConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]],
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPTNeoForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB
    )
    return transformers.BertForMaskedLM(cfg)


CASES = {
    # attention without the registry in every supported transformers release (GPT-J and Falcon
    # call it from transformers 5.24: tests/test_capture_hf.py::test_gptj_and_falcon_through_the_registry)
    "bloom": (bloom, "BloomAttention", ("transformer.h.0.self_attention", "transformer.h.1.self_attention"), REGISTRY),
    "gpt_neo": (
        gpt_neo,
        "GPTNeoSelfAttention",
        ("transformer.h.0.attn.attention", "transformer.h.1.attn.attention"),
        REGISTRY,
    ),
    "bert": (
        bert,
        "BertSelfAttention",
        ("bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"),
        BIDIRECTIONAL,
    ),
}


def _tiny_decoder(name):
    """A tiny 2-layer ``{name}ForCausalLM``: OLMo-hybrid (a gated delta rule layer, ``OlmoHybridGatedDeltaNet``:
    no esswatch probe, then attention) or Kimi Linear (delta attention that bypasses the registry, with a gate
    module of its own that owns an ``A_log``)."""
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    return getattr(transformers, f"{name}ForCausalLM")(cfg)


def _check_message(msg, type_name, names, reason):
    assert f"{type_name} (transformers.models." in msg and "2 layers" in msg, msg
    assert all(n in msg for n in names), msg
    assert reason in msg, msg
    assert "register_probe" in msg and "esswatch_operator" in msg and "'Custom layers'" in msg, msg


def _no_hooks(model):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kind", sorted(CASES))
def test_no_capturable_layer_fails_at_construction_naming_types_and_reasons(kind):
    make, type_name, names, reason = CASES[kind]
    torch.manual_seed(0)
    model = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedModelError) as e:
            esswatch.capture(model)
        _check_message(str(e.value), type_name, names, reason)
        with pytest.raises(UnsupportedModelError) as e:
            esswatch.ESSWatch(model, every_n_steps=1)
        _check_message(str(e.value), type_name, names, reason)
    # no per-layer warnings and no false "no watched layer ran" warning: the error says it all
    assert not [w for w in caught if issubclass(w.category, (CaptureWarning, ESSWarning))], [
        str(w.message) for w in caught
    ]
    assert isinstance(e.value, ValueError) and _no_hooks(model)
    from esswatch.integrations.transformers import attention_registry

    assert not attention_registry.is_installed()
    model(torch.randint(0, VOCAB, (1, 8)))  # the model still runs


def test_explicit_unsupported_layer_names_the_reason():
    model = bert()
    with pytest.raises(
        UnsupportedModelError,
        match=r"'bert.encoder.layer.0.attention.self' is a BertSelfAttention, "
        r"which esswatch cannot capture: bidirectional",
    ):
        esswatch.capture(model, layers="bert.encoder.layer.0.attention.self")


def test_model_with_an_unprobed_mixer_names_it():
    """No provider recognises an LSTM; the error still names it as the candidate without a probe."""
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.LSTM(8, 8, batch_first=True))
    with pytest.raises(
        UnsupportedModelError,
        match=r"LSTM \(torch.nn.modules.rnn\), 1 layer \(1\): no esswatch probe "
        r"is registered for this module type",
    ):
        esswatch.capture(model)
    with pytest.raises(
        UnsupportedModelError,
        match=r"no supported sequence-mixing layer in Sequential \(and no "
        r"module that looks like a sequence mixer\)",
    ):
        esswatch.capture(nn.Sequential(nn.Linear(3, 3)))


def test_trainer_callback_fails_at_setup(tmp_path):
    pytest.importorskip("accelerate")
    from esswatch.integrations.transformers import ESSCallback
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(1)
    ds = [{"input_ids": x, "labels": x.clone()} for x in torch.randint(0, VOCAB, (8, 12), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    model = bloom()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ESSCallback(every_n_steps=1)])
    with pytest.raises(UnsupportedModelError) as e:
        trainer.train()
    _check_message(str(e.value), *CASES["bloom"][1:])
    assert trainer.state.global_step == 0  # failed before the first step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lightning_callback_fails_at_setup(tmp_path):
    L = pytest.importorskip("lightning")
    from esswatch.integrations.lightning import ESSCallback

    class LSTMLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(VOCAB, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, VOCAB)

        def training_step(self, x, batch_idx):
            return self.head(self.rnn(self.emb(x))[0]).logsumexp(-1).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    t = L.Trainer(
        callbacks=[ESSCallback(every_n_steps=1, logdir=str(tmp_path / "ess"))],
        logger=False,
        max_steps=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    loader = torch.utils.data.DataLoader(list(torch.randint(0, VOCAB, (8, 12))), batch_size=4)
    with pytest.raises(
        UnsupportedModelError,
        match=r"LSTM \(torch.nn.modules.rnn\), 1 layer \(rnn\): no esswatch "
        r"probe",
    ):
        t.fit(LSTMLM(), loader)
    assert t.global_step == 0


class CausalMHA(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, **kw)

    def forward(self, x):
        n = x.shape[1]
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        return x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def test_some_unsupported_layers_warn_once_and_the_rest_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(CausalMHA(), CausalMHA(add_bias_kv=True), CausalMHA())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = esswatch.ESSWatch(model, every_n_steps=1)
        results = []
        for _ in range(3):
            model(torch.randn(2, 8, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            results.append(watch.step())
        watch.close()
    ours = [str(w.message) for w in caught if issubclass(w.category, (CaptureWarning, ESSWarning))]
    assert len(ours) == 1, ours
    assert "1 sequence-mixing layer of Sequential cannot be captured" in ours[0] and "(1.attn): add_bias_kv" in ours[0]
    assert "the other 2 will be" in ours[0]
    assert all(sorted(r["layers"]) == ["0.attn", "2.attn"] for r in results)
    assert watch.capture.unsupported["1.attn"][0] is nn.MultiheadAttention


def test_a_recurrent_mixer_without_a_probe_is_named_not_silently_left_out():
    """OLMo-hybrid's gated delta rule layer owns an ``A_log`` but is no ``...Mixer``: before, the capture
    measured the attention layer and said nothing about it. Now one warning names it and why; the
    attention layer is measured."""
    if not hasattr(transformers, "OlmoHybridConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no OLMo-hybrid")
    torch.manual_seed(0)
    model = _tiny_decoder("OlmoHybrid").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), esswatch.capture(model) as cap:
            model(torch.randint(1, VOCAB, (2, 8)))
        ops = cap.operators
    msgs = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(msgs) == 1, msgs
    assert "OlmoHybridGatedDeltaNet (transformers.models." in msgs[0] and "model.layers.0.linear_attn" in msgs[0]
    assert "recurrent (state-space or linear-attention) mixer esswatch has no probe for" in msgs[0]
    assert list(ops) == ["model.layers.1.self_attn"]
    assert list(cap.unsupported) == ["model.layers.0.linear_attn"]


def test_a_gate_module_inside_an_unsupported_layer_is_not_listed_twice():
    """Kimi Linear's ``forget_gate`` (it owns an ``A_log``) sits inside its delta attention, which bypasses the
    registry: the error names the attention layers only."""
    if not hasattr(transformers, "KimiLinearConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Kimi Linear (added in 5.16)")
    torch.manual_seed(0)
    model = _tiny_decoder("KimiLinear")
    with pytest.raises(UnsupportedModelError) as e:
        esswatch.capture(model)
    msg = str(e.value)
    _check_message(msg, "KimiLinearDeltaAttention", ("model.layers.0.self_attn", "model.layers.1.self_attn"), REGISTRY)
    assert "forget_gate" not in msg and "KimiLinearForgetGate" not in msg, msg
