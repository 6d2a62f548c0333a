"""``ShortConv``: a causal depthwise convolution over time, applied before a mixer's projections.

Recurrent mixers learn associative recall far more easily when each position already
sees the few tokens before it (Zoology, Arora et al. 2023, pair every gated and linear
recurrence with such a convolution; Mamba's ``d_conv`` is the same thing). It is a
fixed-width, input-independent local mixing outside the operator ``T``: the queries,
keys and gates are computed from its output, so the operator keeps its form.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ShortConv"]


class ShortConv(nn.Module):
    """``(batch, L, d) -> (batch, L, d)``: output ``t`` mixes inputs ``t - width + 1 .. t`` per channel."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        if int(width) != width or width < 1:
            raise ValueError(f"ShortConv: width must be a positive int, got {width!r}")
        self.conv = nn.Conv1d(d_model, d_model, int(width), groups=d_model, padding=int(width) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :L].transpose(1, 2)
