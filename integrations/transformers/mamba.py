"""Probes for Hugging Face Mamba-family mixers: ``MambaMixer``, ``FalconMambaMixer``,
``JambaMambaMixer`` (:class:`MambaProbe`), ``Mamba2Mixer`` and the hybrids' copies of it
(``BambaMixer``, ``Zamba2MambaMixer``, ``GraniteMoeHybridMambaLayer``, ``NemotronHMamba2Mixer``,
``FalconH1Mixer``; :class:`Mamba2Probe`).

On an armed forward call the probe takes the mixer's input and recomputes, with the
mixer's own submodules and parameters, the selective-scan inputs exactly as the
PyTorch path of ``forward`` does (padding mask, Falcon-H1's muP multipliers, ``in_proj``,
depthwise causal conv + activation, ``x_proj`` / split, FalconMamba's and Jamba's B/C/dt norms,
``dt`` bias, softplus and clamp). It does not depend on which scan ran (the torch loop on CPU, the fused CUDA
kernels when ``kernels`` / ``mamba_ssm`` are installed), and it uses no randomness.
The cost is one more ``in_proj`` and conv on sampled steps only.

Operators (:class:`esswatch.operators.GatedRecurrence`):

- Mamba / FalconMamba / Jamba, per channel ``d`` (leading dims ``(batch, channel)``):
  ``q = C_r``, ``k = dt[c, d] * B_c``, ``log_decay = dt[s, d] * A[d, :]``; one value
  channel per operator (``value_dim = 1``). The layer computes
  ``y_d = T_d u_d + D_d u_d``, then ``y * silu(z)`` and ``out_proj``.
- Mamba2, per head ``h`` (leading dims ``(batch, head)``): ``q = C_r``, ``k = dt[c, h] B_c``
  (B and C of the head's group), ``log_decay = dt[s, h] * A[h]`` of shape ``(..., L, 1)``;
  ``value_dim = head_dim``. The layer computes ``y_h = T_h x_h + D_h x_h``, then the gated
  RMS norm ``norm(y, z)`` and ``out_proj``.

The theoretical state size is the SSM state width ``N`` (``config.state_size``).
Calls that continue a cached state (decoding steps, chunked prefill) are skipped with
a warning: their convolution reads tokens of earlier calls. After a recorded prefill
(``generate()`` under an armed capture) the capture warns once that only the prefill is
measured.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from esswatch.operators import GatedRecurrence, Operator
from esswatch.probes import CaptureWarning, Probe, UnsupportedProbe

__all__ = ["MambaProbe", "Mamba2Probe", "UnsupportedMixerProbe", "mamba_scan_inputs", "mamba2_scan_inputs"]


def _mask_padding(x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``apply_mask_to_padding_states`` of the HF Mamba models (``x`` is ``(batch, L, channels)``)."""
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


def _causal_conv(mixer, x: torch.Tensor, act=None) -> torch.Tensor:
    """Depthwise causal conv + activation (``act``, default ``mixer.act``) of ``x`` ``(batch, channels, L)``,
    as ``causal_conv1d_fn``."""
    w = mixer.conv1d.weight  # (channels, 1, K)
    L = x.shape[-1]
    out = F.conv1d(x.to(w.dtype), w, mixer.conv1d.bias, padding=w.shape[-1] - 1, groups=x.shape[1])[..., :L]
    return (mixer.act if act is None else act)(out).to(x.dtype)


def mamba_scan_inputs(mixer, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """``(u, dt, B, C)`` of a ``MambaMixer`` / ``FalconMambaMixer`` torch path.

    Shapes: ``u`` and ``dt`` ``(batch, channels, L)`` (``dt`` after bias and softplus),
    ``B`` and ``C`` ``(batch, L, N)``.
    """
    hs = _mask_padding(hidden_states, attention_mask)
    projected = mixer.in_proj(hs).transpose(1, 2)
    x, _gate = projected.chunk(2, dim=1)
    x = _causal_conv(mixer, x)
    u = _mask_padding(x.transpose(1, 2), attention_mask)  # (batch, L, channels)
    ts, B, C = torch.split(mixer.x_proj(u), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    if hasattr(mixer, "b_layernorm"):  # FalconMamba: weightless RMS norms
        ts, B, C = mixer.dt_layernorm(ts), mixer.b_layernorm(B), mixer.c_layernorm(C)
    dt = mixer.dt_proj.weight @ ts.transpose(1, 2)
    if mixer.dt_proj.bias is not None:
        dt = dt + mixer.dt_proj.bias.float().to(dt.dtype)[..., None]
    dt = F.softplus(dt)
    return u.transpose(1, 2), dt, B, C


def mamba2_scan_inputs(mixer, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """``(x, dt, B, C)`` of a ``Mamba2Mixer`` torch path.

    Shapes: ``x`` ``(batch, L, heads, head_dim)``, ``dt`` ``(batch, L, heads)`` (after bias,
    softplus and clamp), ``B`` and ``C`` ``(batch, L, groups, N)``.
    """
    b, L, _ = hidden_states.shape
    hs = _mask_padding(hidden_states, attention_mask)
    multiplier = getattr(mixer, "ssm_in_multiplier", None)  # Falcon-H1's muP multipliers
    if multiplier is not None:
        hs = hs * multiplier
    projected = mixer.in_proj(hs)
    mup = getattr(mixer, "mup_vector", None)
    if isinstance(mup, torch.Tensor):
        projected = projected * mup
    _gate, xbc, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    xbc = _causal_conv(mixer, xbc.transpose(1, 2))
    xbc = _mask_padding(xbc.transpose(1, 2), attention_mask)
    G, N = mixer.n_groups, mixer.ssm_state_size
    x, B, C = torch.split(xbc, [mixer.intermediate_size, G * N, G * N], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias.to(dt.dtype))
    lo, hi = mixer.time_step_limit
    dt = torch.clamp(dt, min=lo, max=hi)
    return (x.reshape(b, L, mixer.num_heads, mixer.head_dim), dt, B.reshape(b, L, G, N), C.reshape(b, L, G, N))


def _continues_state(cache, mixer, hidden: torch.Tensor) -> bool:
    """Whether ``cache`` already holds a state of ``mixer``'s layer (host-side flags only, no sync)."""
    has = getattr(cache, "has_previous_state", None)
    if callable(has):
        try:
            return bool(has(mixer.layer_idx))
        except Exception:  # pragma: no cover - another cache API
            pass
    return hidden.shape[1] == 1


class _MixerProbe(Probe):
    """Shared hook logic: recompute the scan inputs from the mixer's input on armed calls."""

    def __init__(self, name, module, session) -> None:
        super().__init__(name, module, session)
        self._warned_pad = False

    def attach(self) -> List[Any]:
        return [self.module.register_forward_pre_hook(self._hook, with_kwargs=True)]

    def _hook(self, module, args, kwargs) -> None:
        """Forward pre-hook: the cache still shows whether this call continues a previous state."""
        if not self.session.armed:
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        # the cache: ``cache_params`` up to transformers 5.23, ``cache`` from 5.24
        cache = args[1] if len(args) > 1 else kwargs.get("cache", kwargs.get("cache_params"))
        if self.has_record:  # a later call in this armed window: a decoding step (warned once)?
            if cache is not None and _continues_state(cache, module, hidden):
                self.session.note_cached_call(self.name)
            return
        mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
        if cache is not None and _continues_state(cache, module, hidden):
            warnings.warn(
                f"esswatch: {self.name}: this call continues a cached state (decoding step or chunked "
                "prefill): its convolution reads tokens of earlier calls; call skipped.",
                CaptureWarning,
                stacklevel=2,
            )
            return
        rows = self.view()[0]  # recompute only the rows that are kept
        if rows is not None:
            hidden = hidden[:rows]
            mask = None if mask is None else mask[:rows]
        grad = contextlib.nullcontext() if self.session.keep_graph else torch.no_grad()
        with grad:
            self._record_from(module, hidden, mask)

    def tss(self) -> Optional[int]:
        return int(self.module.ssm_state_size)

    #: what padding does to the operator (the padding warning's middle)
    padding_effect = "padded positions have zero input (B = C = 0), so they are zero rows and columns of the operator"

    def valid_rows(self, record: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Rows with a token that is not padding (the ``attention_mask``)."""
        mask = record.get("mask")
        return None if mask is None else (mask != 0).any(-1)

    def _warn_padding(self, mask: Optional[torch.Tensor]) -> None:
        if mask is not None and not self._warned_pad and not bool((mask != 0).all()):
            self._warned_pad = True
            warnings.warn(
                f"esswatch: {self.name}: padded batch: {self.padding_effect}, and ESS at index i mixes "
                "different token positions across differently padded rows.",
                CaptureWarning,
                stacklevel=3,
            )


class MambaProbe(_MixerProbe):
    """Mamba / FalconMamba / Jamba mixer: a gated diagonal recurrence per channel
    (``docs/ess.md`` section 1, Mamba/S6)."""

    layer_type = "Hugging Face MambaMixer / FalconMambaMixer / JambaMambaMixer"

    def _record_from(self, mixer, hidden, mask) -> None:
        _u, dt, B, C = mamba_scan_inputs(mixer, hidden, mask)
        A = -torch.exp(mixer.A_log.float())  # (channels, N)
        dt = self.keep(dt, head_dim=1)
        if self.view()[1] is not None:
            A = A[: dt.shape[1]]
        if not self.session.keep_graph:
            A = A.detach()
        self.record(dt=dt, B=self.keep(B), C=self.keep(C), A=A, mask=self.keep(mask))

    def build(self, record: Dict[str, Any]) -> Operator:
        self._warn_padding(record["mask"])
        dt = record["dt"].float()  # (b, d, L)
        B, C, A = record["B"].float(), record["C"].float(), record["A"]
        q = C[:, None]  # (b, 1, L, N)
        k = dt[..., None] * B[:, None]  # (b, d, L, N)
        log_decay = dt[..., None] * A[None, :, None, :]  # (b, d, L, N)
        return GatedRecurrence(q, k, log_decay, value_dim=1)


class Mamba2Probe(_MixerProbe):
    """Mamba2 mixer: a gated recurrence per head with one scalar decay per step (SSD)."""

    layer_type = "Hugging Face Mamba2Mixer (also Bamba, Zamba2, GraniteMoeHybrid, NemotronH, FalconH1)"

    def _record_from(self, mixer, hidden, mask) -> None:
        _x, dt, B, C = mamba2_scan_inputs(mixer, hidden, mask)
        H, G = mixer.num_heads, mixer.n_groups
        A = -torch.exp(mixer.A_log.float())  # (heads,)
        dt = self.keep(dt.transpose(1, 2), head_dim=1)  # (b, h, L)
        h = dt.shape[1]
        per_group = H // G
        g = -(-h // per_group)  # groups the kept heads use
        B, C = self.keep(B)[:, :, :g], self.keep(C)[:, :, :g]
        A = A[:h]
        if not self.session.keep_graph:
            A = A.detach()
        self.record(dt=dt, B=B, C=C, A=A, per_group=per_group, value_dim=int(mixer.head_dim), mask=self.keep(mask))

    def build(self, record: Dict[str, Any]) -> Operator:
        self._warn_padding(record["mask"])
        dt, A = record["dt"].float(), record["A"]  # (b, h, L), (h,)
        h = dt.shape[1]
        groups = torch.arange(h, device=dt.device) // record["per_group"]
        B = record["B"].float().index_select(2, groups).transpose(1, 2)  # (b, h, L, N)
        C = record["C"].float().index_select(2, groups).transpose(1, 2)
        k = dt[..., None] * B
        log_decay = (dt * A[None, :, None])[..., None]  # (b, h, L, 1)
        return GatedRecurrence(C, k, log_decay, value_dim=record["value_dim"])


class UnsupportedMixerProbe(UnsupportedProbe):
    """A transformers recurrent mixer (a module with an ``A_log`` parameter) esswatch has no probe
    for, e.g. OLMo-hybrid's gated delta rule layer.

    Not capturable: the capture names it (an error when nothing else can be captured,
    otherwise one warning), see :mod:`esswatch.probes.unsupported`.
    """

    layer_type = "Hugging Face recurrent mixer without an esswatch probe (not capturable)"
    reason = (
        "a recurrent (state-space or linear-attention) mixer esswatch has no probe for (supported: "
        "MambaMixer, FalconMambaMixer, JambaMambaMixer, Mamba2Mixer, the Mamba2 mixers of Bamba, "
        "Zamba2, GraniteMoeHybrid, NemotronH and FalconH1, and the Gated DeltaNet of Qwen3-Next and Qwen3.5)"
    )
