"""``SequenceModel``: a tiny language model around one kind of reference mixer.

``embedding -> n_layers x [x + mixer(norm(x)), x + mlp(norm(x))] -> norm -> head``,
the mixer chosen by name (:data:`MIXERS`). The examples and tests train it; capture
finds its mixers at ``blocks.<i>.mixer``.
"""

from __future__ import annotations

from typing import Dict, Type

import torch
from torch import nn

from .attention import CausalSelfAttention
from .gla import GatedLinearAttention
from .linear_attention import LinearAttention
from .long_conv import LongConvolution
from .ssm import SelectiveSSM

__all__ = ["SequenceModel", "Block", "MIXERS", "make_mixer"]

#: mixer name -> class; extra keyword arguments of :class:`SequenceModel` go to the class.
MIXERS: Dict[str, Type[nn.Module]] = {
    "attention": CausalSelfAttention,  # window=w for sliding-window attention
    "linear_attention": LinearAttention,
    "gla": GatedLinearAttention,
    "ssm": SelectiveSSM,
    "long_conv": LongConvolution,
}


def make_mixer(name: str, d_model: int, **kwargs) -> nn.Module:
    """A mixer of :data:`MIXERS` by name."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    return MIXERS[name](d_model, **kwargs)


class Block(nn.Module):
    """Pre-norm residual block: sequence mixer, then a position-wise MLP."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SequenceModel(nn.Module):
    """Token model ``(batch, L) int64 -> (batch, L, vocab_size)`` logits.

    Args:
        vocab_size: number of tokens.
        d_model: width.
        n_layers: number of blocks.
        mixer: a name of :data:`MIXERS`.
        mlp_ratio: MLP hidden width / ``d_model``.
        **mixer_kwargs: passed to the mixer class (e.g. ``n_heads=4``, ``window=16``, ``d_state=8``).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        mixer: str = "attention",
        mlp_ratio: int = 4,
        **mixer_kwargs,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            [Block(d_model, make_mixer(mixer, d_model, **mixer_kwargs), mlp_ratio) for _ in range(n_layers)]
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
