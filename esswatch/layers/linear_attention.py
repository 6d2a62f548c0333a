"""``LinearAttention``: multi-head causal linear attention (Katharopoulos et al., 2020).

Per head: ``y_r = sum_{c <= r} (phi(q_r) . phi(k_c)) v_c / z_r`` with the feature map
``phi`` (``elu(x) + 1`` or the identity) and, when normalized,
``z_r = phi(q_r) . sum_{c <= r} phi(k_c)``. Dividing a row by ``z_r`` is folded into
the query, so the operator is :class:`~esswatch.operators.GatedRecurrence` without
decay, ``q = phi(q) / z`` and ``k = phi(k)``, leading dims ``(batch, head)``.
Theoretical state size: the key width ``head_dim`` (the state is ``head_dim x head_dim``
per head, of rank at most ``head_dim`` in time).
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

__all__ = ["LinearAttention"]

_FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1.0,
    "identity": lambda x: x,
}


class LinearAttention(nn.Module):
    """Multi-head causal linear attention on ``(batch, L, d_model)``.

    Args:
        d_model: model width (divisible by ``n_heads``).
        n_heads: number of heads.
        feature_map: ``"elu"`` (``elu + 1``, positive) or ``"identity"``.
        normalize: divide each output by ``z_r`` (default: ``True`` for ``"elu"``,
            ``False`` for ``"identity"``, whose ``z_r`` can vanish).
        eps: added to ``z_r``.
        d_conv: width of a causal depthwise convolution applied to the input before the
            projections (:class:`~esswatch.layers.short_conv.ShortConv`); 0 = none (default).
    """

    operator_keys = ("q", "k")

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        feature_map: str = "elu",
        normalize: Optional[bool] = None,
        eps: float = 1e-6,
        bias: bool = False,
        d_conv: int = 0,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"LinearAttention: d_model={d_model} is not divisible by n_heads={n_heads}")
        if feature_map not in _FEATURE_MAPS:
            raise ValueError(
                f"LinearAttention: feature_map must be one of {sorted(_FEATURE_MAPS)}, got {feature_map!r}"
            )
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.feature_map = feature_map
        self.normalize = (feature_map == "elu") if normalize is None else bool(normalize)
        self.eps = eps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.short_conv = ShortConv(d_model, d_conv) if d_conv else None

    @property
    def state_size(self) -> int:
        return self.head_dim

    def featurize(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``q = phi(q) / z`` (normalization folded in), ``k = phi(k)``, ``v``: ``(batch, head, L, head_dim)``."""
        if self.short_conv is not None:
            x = self.short_conv(x)
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        phi = _FEATURE_MAPS[self.feature_map]
        q, k = phi(q), phi(k)
        if self.normalize:
            z = (q * torch.cumsum(k, dim=-2)).sum(-1, keepdim=True) + self.eps
            q = q / z
        return {"q": q, "k": k, "v": v}

    def operator_from(self, t: Dict[str, torch.Tensor]) -> GatedRecurrence:
        return GatedRecurrence(t["q"], t["k"], None, value_dim=self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.featurize(x)
        B, H, L, D = f["v"].shape
        scores = f["q"] @ f["k"].transpose(-1, -2)  # (B, H, L, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        y = scores.masked_fill(~causal, 0.0) @ f["v"]
        return self.out(y.transpose(1, 2).reshape(B, L, H * D))


register_probe(LinearAttention, MixerProbe)
