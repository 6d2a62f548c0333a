"""``LongConvolution``: a Hyena-style gated long convolution (LTI per channel).

Per channel ``d``: ``y = out(g * (h_d * v))`` with ``v, g = in_proj(x)`` and a causal
kernel ``h_d`` as long as the sequence, applied by FFT (or directly). The kernel is
either *implicit* (Hyena: a small MLP of sinusoidal position features, times an
exponential decay window with a per-channel rate) or *explicit* (a parameter per
channel and lag, up to ``max_len``). The operator is the lower-triangular Toeplitz
matrix of the kernel, :class:`~esswatch.operators.Convolution`, with leading dims
``(1, channel)``: it does not depend on the input, so one batch row stands for all.
The output gate ``g`` is outside it. Theoretical state size: unbounded (``None``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..operators import Convolution
from ..probes.registry import register_probe
from .probe import MixerProbe

__all__ = ["LongConvolution"]


class LongConvolution(nn.Module):
    """Gated long convolution on ``(batch, L, d_model)``.

    Args:
        d_model: model width (= number of channels).
        kernel: ``"implicit"`` (MLP of positions, any length) or ``"explicit"`` (needs ``max_len``).
        max_len: longest sequence for the explicit kernel.
        fft: convolve by FFT (``O(L log L)``) or directly (``O(L^2)``, exact summation order).
        pos_dim: sinusoid pairs in the implicit kernel's position features.
        hidden: hidden width of the implicit kernel's MLP.
        decay_min, decay_max: range of the per-channel decay rates of the window ``exp(-rate * t)``.
    """

    operator_keys = ("h",)

    def __init__(
        self,
        d_model: int,
        kernel: str = "implicit",
        max_len: Optional[int] = None,
        fft: bool = True,
        pos_dim: int = 8,
        hidden: int = 32,
        decay_min: float = 0.01,
        decay_max: float = 0.3,
    ):
        super().__init__()
        if kernel not in ("implicit", "explicit"):
            raise ValueError(f"LongConvolution: kernel must be 'implicit' or 'explicit', got {kernel!r}")
        if kernel == "explicit" and not (isinstance(max_len, int) and max_len >= 1):
            raise ValueError("LongConvolution: kernel='explicit' needs max_len (a positive int)")
        self.kernel = kernel
        self.max_len = max_len
        self.fft = fft
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        rates = torch.exp(torch.linspace(math.log(decay_min), math.log(decay_max), d_model))
        self.register_buffer("decay_rates", rates, persistent=False)
        if kernel == "implicit":
            self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1e-3), pos_dim)), persistent=False)
            self.kernel_mlp = nn.Sequential(nn.Linear(2 * pos_dim, hidden), nn.SiLU(), nn.Linear(hidden, d_model))
        else:
            t = torch.arange(max_len, dtype=torch.float32)
            self.h = nn.Parameter(torch.randn(d_model, max_len) * torch.exp(-rates[:, None] * t) / math.sqrt(d_model))

    @property
    def state_size(self) -> Optional[int]:
        return None

    def kernel_at(self, L: int) -> torch.Tensor:
        """The kernel ``(d_model, L)``: ``h[d, j]`` multiplies the input ``j`` steps back."""
        if self.kernel == "explicit":
            if L > self.max_len:
                raise ValueError(f"LongConvolution: sequence length {L} exceeds max_len={self.max_len}")
            return self.h[:, :L]
        t = torch.arange(L, device=self.freqs.device, dtype=self.freqs.dtype)
        angles = t[:, None] * self.freqs[None, :]
        feats = torch.cat(
            [torch.sin(angles), torch.cos(angles)], dim=-1
        )  # fixed frequencies: h[j] does not depend on L
        h = self.kernel_mlp(feats.to(self.kernel_mlp[0].weight.dtype)).transpose(0, 1)  # (d_model, L)
        return h * torch.exp(-self.decay_rates[:, None].to(h.dtype) * t.to(h.dtype))

    def featurize(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``v``: ``(batch, channel, L)``; ``h``: ``(1, channel, L)``; ``gate``: ``(batch, L, channel)``."""
        v, g = self.in_proj(x).chunk(2, dim=-1)
        return {"v": v.transpose(1, 2), "h": self.kernel_at(x.shape[1])[None], "gate": g}

    def operator_from(self, t: Dict[str, torch.Tensor]) -> Convolution:
        return Convolution(t["h"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.featurize(x)
        v, h = f["v"], f["h"]
        L = v.shape[-1]
        if self.fft:
            n = 2 * L
            y = torch.fft.irfft(torch.fft.rfft(v, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :L]
        else:  # y[t] = sum_j h[j] v[t - j]: a causal depthwise conv1d with the flipped kernel
            y = F.conv1d(F.pad(v, (L - 1, 0)), h[0].flip(-1)[:, None, :], groups=v.shape[1])
        return self.out(y.transpose(1, 2) * f["gate"])


register_probe(LongConvolution, MixerProbe)
