"""``GatedLinearAttention``: multi-head GLA (Yang et al., 2024) with a sequential scan.

Per head, with a key-width state ``S_t`` (``key_dim x head_dim``)::

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,
    log a_t = logsigmoid(W_a x_t) / gate_normalizer      (data-dependent, per key dim)

and the output ``out(o * silu(W_g x))``. The operator is
:class:`~esswatch.operators.GatedRecurrence` with ``q``, ``k`` and
``log_decay = log a`` of shape ``(batch, head, L, key_dim)``; the output gate is
outside it (it scales the output rows). Theoretical state size: ``key_dim``.

The scan is a plain loop over time: the readable reference, not a fast kernel.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..operators import GatedRecurrence
from ..probes.registry import register_probe
from .probe import MixerProbe
from .short_conv import ShortConv

__all__ = ["GatedLinearAttention"]


class GatedLinearAttention(nn.Module):
    """Multi-head gated linear attention on ``(batch, L, d_model)``.

    Args:
        d_model: model width (divisible by ``n_heads``); value width per head ``d_model // n_heads``.
        n_heads: number of heads.
        key_dim: key / state width per head (default: the head width).
        gate_normalizer: divides the log-gates (GLA uses 16: decays close to 1).
        d_conv: width of a causal depthwise convolution applied to the input before the
            projections (:class:`~esswatch.layers.short_conv.ShortConv`); 0 = none (default).
    """

    operator_keys = ("q", "k", "log_decay")

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        key_dim: Optional[int] = None,
        gate_normalizer: float = 16.0,
        bias: bool = False,
        d_conv: int = 0,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"GatedLinearAttention: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.key_dim = self.head_dim if key_dim is None else int(key_dim)
        self.gate_normalizer = float(gate_normalizer)
        self.q_proj = nn.Linear(d_model, n_heads * self.key_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_heads * self.key_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.decay_proj = nn.Linear(d_model, n_heads * self.key_dim, bias=True)
        self.gate_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.short_conv = ShortConv(d_model, d_conv) if d_conv else None

    @property
    def state_size(self) -> int:
        return self.key_dim

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.n_heads, -1).transpose(1, 2)

    def featurize(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``q`` (scaled by ``key_dim**-0.5``), ``k``, ``log_decay``: ``(batch, head, L, key_dim)``;
        ``v``: ``(batch, head, L, head_dim)``; ``gate``: ``(batch, L, d_model)``."""
        if self.short_conv is not None:
            x = self.short_conv(x)
        return {
            "q": self._heads(self.q_proj(x)) * self.key_dim**-0.5,
            "k": self._heads(self.k_proj(x)),
            "v": self._heads(self.v_proj(x)),
            "log_decay": self._heads(F.logsigmoid(self.decay_proj(x)) / self.gate_normalizer),
            "gate": F.silu(self.gate_proj(x)),
        }

    def operator_from(self, t: Dict[str, torch.Tensor]) -> GatedRecurrence:
        return GatedRecurrence(t["q"], t["k"], t["log_decay"], value_dim=self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.featurize(x)
        q, k, v, a = f["q"], f["k"], f["v"], torch.exp(f["log_decay"])
        B, H, L, D = v.shape
        state = v.new_zeros(B, H, self.key_dim, D)
        outs = []
        # unbind once (indexing inside the loop would cost a full-size gradient per step)
        for a_t, k_t, v_t, q_t in zip(a.unbind(2), k.unbind(2), v.unbind(2), q.unbind(2)):
            state = a_t[..., None] * state + k_t[..., None] * v_t[..., None, :]
            outs.append((q_t[..., None] * state).sum(-2))
        o = torch.stack(outs, dim=2)  # (B, H, L, D)
        return self.out(o.transpose(1, 2).reshape(B, L, H * D) * f["gate"])


register_probe(GatedLinearAttention, MixerProbe)
