"""Probe for Hugging Face Gated DeltaNet layers: ``Qwen3NextGatedDeltaNet`` (Qwen3-Next) and
``Qwen3_5GatedDeltaNet`` / ``Qwen3_5MoeGatedDeltaNet`` (Qwen3.5), :class:`GatedDeltaNetProbe`.

On an armed forward call the probe takes the layer's input and recomputes, with the layer's own
submodules and parameters, the inputs of its delta rule exactly as the PyTorch path of ``forward``
does: the padding mask, the projections (Qwen3-Next's fused ``in_proj_qkvz`` / ``in_proj_ba`` through
the layer's own ``fix_query_key_value_ordering``, or Qwen3.5's separate ``in_proj_qkv`` / ``in_proj_b`` /
``in_proj_a``), the depthwise causal convolution and its SiLU, ``beta = sigmoid(b)``,
``g = -exp(A_log) softplus(a + dt_bias)``, the L2 normalization of queries and keys, their repetition
over the value heads that share them and the queries' ``1 / sqrt(head_k_dim)``. It does not depend on
which kernel ran (the torch loops, or the fused kernels of ``flash-linear-attention``) and uses no
randomness. The cost is one more set of projections and one convolution on sampled steps only.

Operator (:class:`esswatch.operators.DeltaRule`), per value head (leading dims ``(batch, head)``):
``T[t, c] = beta_c q_t^T B_t ... B_{c+1} k_c`` with ``B_s = exp(g_s) (I - beta_s k_s k_s^T)``;
``value_dim = head_v_dim``. The layer computes ``o = T v`` per value channel, then the gated RMS norm
with ``z`` and ``out_proj`` (outside the operator). Natural state size: ``head_k_dim``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F

from esswatch.operators import DeltaRule, Operator

from .mamba import _causal_conv, _mask_padding, _MixerProbe

__all__ = ["GatedDeltaNetProbe", "gated_delta_inputs"]


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """The layers' ``l2norm`` (flash-linear-attention's): ``x / sqrt(sum x^2 + 1e-6)``."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def gated_delta_inputs(layer, hidden_states: torch.Tensor, attention_mask=None):
    """``(q, k, v, beta, g)`` of a Gated DeltaNet layer's torch path, per value head.

    Shapes: ``q``, ``k`` ``(batch, v_heads, L, head_k_dim)`` (float32, normalized, repeated over the value
    heads, ``q`` scaled); ``v`` ``(batch, v_heads, L, head_v_dim)``; ``beta``, ``g`` ``(batch, v_heads, L)``.
    """
    b, L, _ = hidden_states.shape
    hs = _mask_padding(hidden_states, attention_mask)
    if hasattr(layer, "in_proj_qkvz"):  # Qwen3-Next: fused projections, the layer's own reordering
        query, key, value, _z, beta_in, a = layer.fix_query_key_value_ordering(
            layer.in_proj_qkvz(hs), layer.in_proj_ba(hs)
        )
        mixed = torch.cat([x.reshape(b, L, -1) for x in (query, key, value)], dim=-1)
    else:  # Qwen3.5
        mixed, beta_in, a = layer.in_proj_qkv(hs), layer.in_proj_b(hs), layer.in_proj_a(hs)
    mixed = _causal_conv(layer, mixed.transpose(1, 2), F.silu).transpose(1, 2)  # the layers' conv activation: SiLU
    q, k, v = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    q, k = (_l2norm(x.reshape(b, L, -1, layer.head_k_dim).float()) for x in (q, k))
    per_key = layer.num_v_heads // layer.num_k_heads
    q, k = (x.repeat_interleave(per_key, dim=2).transpose(1, 2) for x in (q, k))
    q = q / (layer.head_k_dim**0.5)
    v = v.reshape(b, L, -1, layer.head_v_dim).transpose(1, 2)
    beta = beta_in.sigmoid().float().transpose(1, 2)
    g = (-layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias)).transpose(1, 2)
    return q, k, v, beta, g


class GatedDeltaNetProbe(_MixerProbe):
    """Gated DeltaNet layer (Qwen3-Next, Qwen3.5): the gated delta rule per value head."""

    layer_type = "Hugging Face Gated DeltaNet (Qwen3-Next, Qwen3.5)"
    padding_effect = (
        "the layer zeroes padded inputs before its projections only (its convolution carries real tokens "
        "into the padded positions that follow them)"
    )

    def tss(self) -> int:
        return int(self.module.head_k_dim)

    def _record_from(self, layer, hidden, mask) -> None:
        q, k, _v, beta, g = gated_delta_inputs(layer, hidden, mask)
        self.record(
            q=self.keep(q, head_dim=1),
            k=self.keep(k, head_dim=1),
            beta=self.keep(beta, head_dim=1),
            g=self.keep(g, head_dim=1),
            value_dim=int(layer.head_v_dim),
            mask=self.keep(mask),
        )

    def build(self, record: Dict[str, Any]) -> Operator:
        self._warn_padding(record["mask"])
        return DeltaRule(record["q"], record["k"], record["beta"], record["g"], value_dim=record["value_dim"])
