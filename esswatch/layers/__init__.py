"""esswatch's reference sequence mixers: small, readable, pure PyTorch.

Each mixer maps ``(batch, L, d_model) -> (batch, L, d_model)``, exposes its
operator through ``featurize`` / ``operator_from`` and registers
:class:`~esswatch.layers.probe.MixerProbe` for itself on import, so
``esswatch.capture`` finds it:

- :class:`CausalSelfAttention`: SoftmaxAttention ``(batch, head)``; TSS = window, or grows;
- :class:`LinearAttention`: GatedRecurrence without decay ``(batch, head)``; TSS = head_dim;
- :class:`GatedLinearAttention`: GatedRecurrence with per-key decays ``(batch, head)``; TSS = key_dim;
- :class:`SelectiveSSM`: GatedRecurrence per channel ``(batch, channel)``; TSS = d_state;
- :class:`LongConvolution`: Convolution ``(1, channel)`` (input-independent); TSS unbounded.

:class:`SequenceModel` stacks one kind of them into a tiny language model.
"""

from .attention import CausalSelfAttention
from .gla import GatedLinearAttention
from .linear_attention import LinearAttention
from .long_conv import LongConvolution
from .model import MIXERS, Block, SequenceModel, make_mixer
from .probe import MixerProbe
from .ssm import SelectiveSSM

__all__ = [
    "CausalSelfAttention",
    "LinearAttention",
    "GatedLinearAttention",
    "SelectiveSSM",
    "LongConvolution",
    "SequenceModel",
    "Block",
    "MIXERS",
    "make_mixer",
    "MixerProbe",
]
