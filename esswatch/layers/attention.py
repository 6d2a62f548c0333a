"""``CausalSelfAttention``: multi-head causal softmax attention, optionally sliding-window.

Per head ``h``: ``y_h = T_h v_h`` with ``T_h[r, c] = softmax_c(q_r . k_c / sqrt(d_h))``
over ``c <= r`` (and ``r - c < window`` for a sliding window), then the heads are
concatenated and projected. The operator is
:class:`~esswatch.operators.SoftmaxAttention` with leading dims ``(batch, head)``.
Theoretical state size: the window ``w``, or ``None`` (the cache grows with the
index) without a window.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..operators import SoftmaxAttention
from ..probes.registry import register_probe
from .probe import MixerProbe

__all__ = ["CausalSelfAttention"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax self-attention on ``(batch, L, d_model)``.

    Args:
        d_model: model width (divisible by ``n_heads``).
        n_heads: number of heads; head width ``d_model // n_heads``.
        window: sliding-window width ``w`` (each position sees itself and the
            ``w - 1`` before it); ``None`` = full causal attention.
        bias: biases in the projections.
    """

    operator_keys = ("q", "k")

    def __init__(self, d_model: int, n_heads: int = 4, window: Optional[int] = None, bias: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model={d_model} is not divisible by n_heads={n_heads}")
        if window is not None and (int(window) != window or window < 1):
            raise ValueError(f"CausalSelfAttention: window must be a positive int or None, got {window!r}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.window = None if window is None else int(window)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    @property
    def state_size(self) -> Optional[int]:
        return self.window

    def featurize(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``q, k, v`` of shape ``(batch, head, L, head_dim)``."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return {"q": q, "k": k, "v": v}

    def operator_from(self, t: Dict[str, torch.Tensor]) -> SoftmaxAttention:
        return SoftmaxAttention(t["q"], t["k"], window=self.window, value_dim=self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.featurize(x)
        B, H, L, D = f["v"].shape
        if self.window is None:
            y = F.scaled_dot_product_attention(f["q"], f["k"], f["v"], is_causal=True)
        else:
            pos = torch.arange(L, device=x.device)
            lag = pos[:, None] - pos[None, :]
            allowed = (lag >= 0) & (lag < self.window)  # True = may attend
            y = F.scaled_dot_product_attention(f["q"], f["k"], f["v"], attn_mask=allowed)
        return self.out(y.transpose(1, 2).reshape(B, L, H * D))


register_probe(CausalSelfAttention, MixerProbe)
