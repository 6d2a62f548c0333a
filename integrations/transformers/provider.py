"""Capture of Hugging Face transformers layers: registers esswatch's transformers provider.

``esswatch.probes.probe_for`` imports this module as soon as ``transformers`` is
imported; importing it calls :func:`esswatch.probes.add_provider` with
:func:`provider`. Supported:

- attention modules whose ``forward`` calls transformers' attention-function registry
  (``ALL_ATTENTION_FUNCTIONS`` / ``AttentionInterface``): Llama, Mistral, Qwen2, GPT-2,
  GPT-NeoX and most decoder models of the supported transformers releases (``SUPPORTED_TRANSFORMERS``; outside
  them these layers get :class:`OutOfRangeProbe`: not capturable), with any kernel
  (eager, sdpa, flash, flex) -> :class:`~.attention.HFAttentionProbe`;
- ``MambaMixer`` (Mamba), ``FalconMambaMixer``, ``JambaMambaMixer`` -> :class:`~.mamba.MambaProbe`;
- ``Mamba2Mixer`` and the Mamba2 mixers of the hybrids Bamba, Zamba2, GraniteMoeHybrid
  (Granite 4), Nemotron-H and Falcon-H1 -> :class:`~.mamba.Mamba2Probe`;
- the Gated DeltaNet layers of Qwen3-Next and Qwen3.5 -> :class:`~.delta.GatedDeltaNetProbe`.

Recognised but not capturable (reported by name and reason when the capture is built:
an error if nothing else in the model can be captured, otherwise one warning): statically
bidirectional attention (``is_causal = False``, e.g. BERT encoders, ViT), cross-attention
(``is_cross_attention = True``), attention that bypasses the registry (Bloom, GPT-Neo; GPT-J and
Falcon before transformers 5.24), and recurrent mixers without a probe (OLMo-hybrid's gated delta
rule, RecurrentGemma's RG-LRU).
"""

from __future__ import annotations

import inspect
import re
import weakref
from typing import Optional, Type

import torch
import transformers

from esswatch.probes import Probe, UnsupportedProbe, add_provider

from .._versions import SUPPORTED_TRANSFORMERS, version_problem
from .attention import BidirectionalAttentionProbe, BypassingAttentionProbe, CrossAttentionProbe, HFAttentionProbe
from .delta import GatedDeltaNetProbe
from .mamba import Mamba2Probe, MambaProbe, UnsupportedMixerProbe

__all__ = [
    "provider",
    "HFAttentionProbe",
    "BypassingAttentionProbe",
    "BidirectionalAttentionProbe",
    "CrossAttentionProbe",
    "MambaProbe",
    "Mamba2Probe",
    "UnsupportedMixerProbe",
    "calls_attention_registry",
    "OutOfRangeProbe",
    "GatedDeltaNetProbe",
]

# classes matched by name along the MRO (no import of the model files needed)
_MIXERS = {
    ("transformers.models.mamba.modeling_mamba", "MambaMixer"): MambaProbe,
    ("transformers.models.falcon_mamba.modeling_falcon_mamba", "FalconMambaMixer"): MambaProbe,
    ("transformers.models.jamba.modeling_jamba", "JambaMambaMixer"): MambaProbe,
    ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer"): Mamba2Probe,
    # the hybrids' Mamba2 mixers: the same forward as Mamba2Mixer (FalconH1 adds muP multipliers)
    ("transformers.models.bamba.modeling_bamba", "BambaMixer"): Mamba2Probe,
    ("transformers.models.zamba2.modeling_zamba2", "Zamba2MambaMixer"): Mamba2Probe,
    ("transformers.models.granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridMambaLayer"): Mamba2Probe,
    ("transformers.models.nemotron_h.modeling_nemotron_h", "NemotronHMamba2Mixer"): Mamba2Probe,
    ("transformers.models.falcon_h1.modeling_falcon_h1", "FalconH1Mixer"): Mamba2Probe,
    # Gated DeltaNet (the gated delta rule)
    ("transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextGatedDeltaNet"): GatedDeltaNetProbe,
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5GatedDeltaNet"): GatedDeltaNetProbe,
    ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeGatedDeltaNet"): GatedDeltaNetProbe,
}

# recurrent layers without an ``A_log`` (the generic sign of a recurrent mixer, see provider()), no probe
_RECURRENT_WITHOUT_A_LOG = {
    ("transformers.models.recurrent_gemma.modeling_recurrent_gemma", "RecurrentGemmaRecurrentBlock"),  # RG-LRU
}
#: gated short-convolution mixers (LFM2's ``Lfm2ShortConv``, ...; not a vision tower's), no probe
_SHORT_CONV = re.compile(r"^(?!.*Vision).*ShortConv(olution)?$")


class UnsupportedShortConvProbe(UnsupportedMixerProbe):
    """A gated short-convolution sequence mixer (LFM2 and similar) esswatch has no probe for."""

    layer_type = "Hugging Face gated short-convolution mixer without an esswatch probe (not capturable)"
    reason = "a gated short-convolution sequence mixer (LFM2 and similar) esswatch has no probe for"


#: why the installed transformers is outside the supported range (``None`` when it is inside): then the
#: layers below would be captured wrongly or not at all, so they are reported as not capturable
_VERSION_PROBLEM = version_problem(transformers, SUPPORTED_TRANSFORMERS, "transformers")


class OutOfRangeProbe(UnsupportedProbe):
    """A Hugging Face layer esswatch would capture, with a transformers release outside the supported range."""

    layer_type = "Hugging Face layer, transformers outside the supported range (not capturable)"

    def unsupported_reason(self) -> str:
        return str(_VERSION_PROBLEM)


_REGISTRY_NAMES = {"ALL_ATTENTION_FUNCTIONS", "AttentionInterface"}
_ATTENTION_NAME = re.compile(r"Attention\d*$")
_by_type: "weakref.WeakKeyDictionary[type, Optional[Type[Probe]]]" = weakref.WeakKeyDictionary()


def _code_names(fn) -> set:
    """Global / attribute names a function's code refers to (nested code objects included)."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    names, stack = set(), [code] if code is not None else []
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(x for x in c.co_consts if inspect.iscode(x))
    return names


def calls_attention_registry(module_type: type) -> bool:
    """True when ``module_type`` is a transformers class whose ``forward`` looks its kernel up in the registry."""
    if not any(c.__module__.startswith("transformers.") for c in module_type.__mro__):
        return False
    forward = getattr(module_type, "forward", None)
    return forward is not None and bool(_code_names(forward) & _REGISTRY_NAMES)


def _looks_like_attention(t: type) -> bool:
    """A ``transformers.models`` class named ``...Attention`` (``...Attention2``)."""
    return t.__module__.startswith("transformers.models.") and bool(_ATTENTION_NAME.search(t.__name__))


def _probe_for_type(t: type) -> Optional[Type[Probe]]:
    for c in t.__mro__:
        p = _MIXERS.get((c.__module__, c.__qualname__))
        if p is not None:
            return p
    if calls_attention_registry(t):
        return HFAttentionProbe
    if _looks_like_attention(t):
        return BypassingAttentionProbe
    if t.__module__.startswith("transformers.models.") and _SHORT_CONV.search(t.__name__):
        return UnsupportedShortConvProbe
    if t.__module__.startswith("transformers.models."):
        return UnsupportedMixerProbe  # kept only if it owns an `A_log` (a recurrent mixer), see provider()
    return None


def provider(module: torch.nn.Module) -> Optional[Type[Probe]]:
    """The probe class for a transformers module, or ``None``.

    Statically bidirectional (``is_causal = False``) and cross-attention modules are not
    selected. An ``...Attention`` module of transformers that does not call the registry
    (and contains no other attention module) gets :class:`BypassingAttentionProbe`, and a
    recurrent mixer (a module that owns an ``A_log``, or RecurrentGemma's RG-LRU block) that esswatch
    has no probe for gets :class:`UnsupportedMixerProbe`: both warn, naming the layer, that it cannot
    be captured.
    """
    t = type(module)
    try:
        p = _by_type[t]
    except KeyError:
        p = _by_type[t] = _probe_for_type(t)
    if (
        p is UnsupportedMixerProbe
        and (t.__module__, t.__qualname__) not in _RECURRENT_WITHOUT_A_LOG
        and not isinstance(getattr(module, "A_log", None), torch.Tensor)
    ):
        return None
    if p is BypassingAttentionProbe and any(
        _looks_like_attention(type(m)) for m in module.modules() if m is not module
    ):
        return None  # a wrapper around the real attention module
    if p in (HFAttentionProbe, BypassingAttentionProbe):
        if getattr(module, "is_cross_attention", False) is True:
            return CrossAttentionProbe
        if getattr(module, "is_causal", True) is False:
            return BidirectionalAttentionProbe
    if _VERSION_PROBLEM is not None and p in (HFAttentionProbe, MambaProbe, Mamba2Probe, GatedDeltaNetProbe):
        return OutOfRangeProbe
    return p


add_provider(provider)
