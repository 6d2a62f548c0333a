"""``SelectiveSSM``: a Mamba / S6-style selective diagonal state-space mixer.

Per channel ``d`` (``d_inner`` channels, state width ``N``), with ``u`` the
channel's input after the causal depthwise convolution and SiLU::

    dt_t = softplus(W_dt x_t + b_dt)[d]          A[d, :] = -exp(A_log[d, :])  (negative)
    B_t, C_t = W_B u_t, W_C u_t                 (input dependent, shared by the channels)
    h_t = exp(dt_t A[d]) * h_{t-1} + dt_t B_t u_t[d],     y_t[d] = C_t . h_t + D[d] u_t[d]

then ``out((y) * silu(z))``. The operator (``docs/ess.md`` section 1) is
:class:`~esswatch.operators.GatedRecurrence` per channel with ``q = C``,
``k = dt * B``, ``log_decay = dt * A``, leading dims ``(batch, channel)``; the
feedthrough ``D u`` and the output gate ``silu(z)`` are outside it. Theoretical
state size: ``N``.

The scan is a plain loop over time: the readable reference, not a fast kernel.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..operators import GatedRecurrence
from ..probes.registry import register_probe
from .probe import MixerProbe

__all__ = ["SelectiveSSM"]


class SelectiveSSM(nn.Module):
    """Selective diagonal SSM (Mamba block without the fused kernels) on ``(batch, L, d_model)``.

    Args:
        d_model: model width.
        d_state: state width ``N`` per channel.
        expand: ``d_inner = expand * d_model`` channels.
        d_conv: width of the causal depthwise convolution before the SSM (0 = none).
        dt_rank: rank of the step-size projection (default ``ceil(d_model / 16)``).
        dt_min, dt_max: range of the initial step sizes.
    """

    operator_keys = ("q", "k", "log_decay")

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 1,
        d_conv: int = 4,
        dt_rank: Optional[int] = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv = (
            nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
            if d_conv > 0
            else None
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out = nn.Linear(self.d_inner, d_model, bias=False)
        with torch.no_grad():  # step sizes log-uniform in [dt_min, dt_max] after the softplus
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @property
    def state_size(self) -> int:
        return self.d_state

    def featurize(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``u``: ``(batch, channel, L)``; ``q = C``: ``(batch, 1, L, N)``; ``k = dt * B`` and
        ``log_decay = dt * A``: ``(batch, channel, L, N)``; ``gate = silu(z)``: ``(batch, L, channel)``."""
        L = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        if self.conv is not None:
            u = self.conv(u.transpose(1, 2))[..., :L].transpose(1, 2)
        u = F.silu(u)  # (B, L, D)
        dt_low, b, c = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low)).transpose(1, 2)  # (B, D, L)
        A = -torch.exp(self.A_log)  # (D, N)
        return {
            "u": u.transpose(1, 2),
            "q": c[:, None],
            "k": dt[..., None] * b[:, None],
            "log_decay": dt[..., None] * A[:, None, :],
            "gate": F.silu(z),
        }

    def operator_from(self, t: Dict[str, torch.Tensor]) -> GatedRecurrence:
        return GatedRecurrence(t["q"], t["k"], t["log_decay"], value_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.featurize(x)
        u, q, k, a = f["u"], f["q"], f["k"], torch.exp(f["log_decay"])
        B, D, _ = u.shape
        h = u.new_zeros(B, D, self.d_state)
        ys = []
        # unbind once (indexing inside the loop would cost a full-size gradient per step)
        for a_t, k_t, u_t, q_t in zip(a.unbind(2), k.unbind(2), u.unbind(2), q.unbind(2)):
            h = a_t * h + k_t * u_t[..., None]
            ys.append((q_t * h).sum(-1))
        y = torch.stack(ys, dim=-1) + self.D[:, None] * u  # (B, D, L)
        return self.out(y.transpose(1, 2) * f["gate"])


register_probe(SelectiveSSM, MixerProbe)
