"""The masks of a recorded Hugging Face attention call, as :class:`~.attention.HFAttentionProbe` builds its operator.

- :func:`as_mask`: the mask transformers passed to the kernel (4-D boolean or additive float,
  2-D flash padding mask, flex-attention ``BlockMask``) as a ``(..., L, L)`` boolean or
  additive float mask with ``-inf`` where masked;
- :func:`softcapped_probs`: the dense causal attention probabilities of a call with logit
  soft-capping (Gemma 2), which :class:`esswatch.operators.SoftmaxAttention` does not model.
"""

from __future__ import annotations

from typing import Optional

import torch

from esswatch.engine.spectral import compute_dtype
from esswatch.probes import CaptureError

__all__ = ["as_mask", "softcapped_probs"]


def as_mask(mask, q: torch.Tensor, L: int, name: str) -> Optional[torch.Tensor]:
    """The recorded mask as a ``(..., L, L)`` boolean or additive float mask with ``-inf`` where masked."""
    if mask is None:
        return None
    if hasattr(mask, "mask_mod"):  # flex attention BlockMask
        try:
            from torch.nn.attention.flex_attention import create_mask

            B, H = q.shape[0], q.shape[1]
            return create_mask(mask.mask_mod, B, H, L, L, device=q.device)
        except Exception as e:  # pragma: no cover - depends on the torch build
            raise CaptureError(f"{name}: could not evaluate the flex-attention BlockMask ({e})") from e
    if mask.dim() == 2:  # flash: (batch, keys) padding mask, 1 = token
        valid = mask[:, -L:].bool()
        return valid[:, None, :, None] & valid[:, None, None, :]
    if mask.dim() != 4:
        raise CaptureError(f"{name}: unsupported attention mask of shape {tuple(mask.shape)}")
    mask = mask[..., -L:]
    if mask.dtype == torch.bool:
        return mask
    floor = torch.finfo(mask.dtype).min / 2
    return mask.masked_fill(mask <= floor, float("-inf"))


def softcapped_probs(q, k, scale, softcap, window, mask) -> torch.Tensor:
    """Dense causal probabilities with logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma 2)."""
    dt = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    s = softcap * torch.tanh(s / softcap)
    L = q.shape[-2]
    r = torch.arange(L, device=q.device)
    ok = r[None, :] <= r[:, None]
    if window is not None:
        ok = ok & (r[:, None] - r[None, :] < window)
    if mask is not None:
        if mask.dtype == torch.bool:
            ok = ok & mask
        else:
            s = s + mask.to(dt)
            ok = ok & torch.isfinite(mask)
    s = s.masked_fill(~ok, float("-inf"))
    has = ok.any(-1, keepdim=True)
    p = torch.softmax(torch.where(has, s, torch.zeros_like(s)), dim=-1)
    return torch.where(has & ok, p, torch.zeros_like(p))
