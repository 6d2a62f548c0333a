"""``SoftmaxAttention``: causal (optionally sliding-window, masked) softmax attention."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..engine.spectral import compute_dtype
from ..engine.validation import broadcast_batch, check_finite, check_finite_number, check_positive_int
from .base import Operator

__all__ = ["SoftmaxAttention"]

#: scores whose bound exceeds this are computed in float64 for float32 inputs (softmax is
#: invariant to the row max it subtracts, but the scores themselves must be representable)
_F32_SAFE = 1e36


class SoftmaxAttention(Operator):
    """``T[r, c] = softmax_c(scale * q_r . k_c + mask[r, c])`` over ``c <= r``.

    Args:
        q, k: ``(..., L, d)``; leading dims broadcast (e.g. grouped-query heads
            can pass ``k`` with a head dim of 1 after ``unsqueeze``).
        scale: defaults to ``1 / sqrt(d)``.
        window: sliding window width ``w``: ``T[r, c] = 0`` for ``r - c >= w``.
            The natural state size is then ``w``; otherwise it grows with the index.
        mask: optional ``(..., L, L)`` mask broadcastable to the scores; boolean
            (``True`` = may attend, as in ``scaled_dot_product_attention``) or
            additive float. Causality is always applied on top.
        value_dim: value channels sharing this head (metadata for total ESS).

    A row that can attend to nothing (fully masked) is all zero.
    """

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: Optional[float] = None,
        window: Optional[int] = None,
        mask: Optional[torch.Tensor] = None,
        value_dim: int = 1,
    ):
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
                raise ValueError(
                    f"SoftmaxAttention: {name} must be a floating tensor (..., L, d), got "
                    f"{getattr(x, 'shape', type(x).__name__)}"
                )
        if q.shape[-2:] != k.shape[-2:]:
            raise ValueError(f"SoftmaxAttention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in (L, d)")
        try:
            batch = broadcast_batch(q.shape[:-2], k.shape[:-2])
        except RuntimeError as e:
            raise ValueError(
                f"SoftmaxAttention: leading dims of q {tuple(q.shape)} and k {tuple(k.shape)} do not broadcast"
            ) from e
        if q.shape[-1] < 1:
            raise ValueError(
                f"SoftmaxAttention: the head dim d (last dim of q, k) must be >= 1, got q {tuple(q.shape)}"
            )
        window = check_positive_int("SoftmaxAttention: window", window, allow_none=True)
        if scale is not None:
            scale = check_finite_number("SoftmaxAttention: scale", scale)
        L = q.shape[-2]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or mask.shape[-2:] != (L, L):
                raise ValueError(
                    f"SoftmaxAttention: mask must be (..., L, L) = (..., {L}, {L}), got "
                    f"{getattr(mask, 'shape', type(mask).__name__)}"
                )
            try:
                batch = broadcast_batch(batch, mask.shape[:-2])
            except RuntimeError as e:
                raise ValueError(f"SoftmaxAttention: mask {tuple(mask.shape)} does not broadcast with q/k") from e
        self.q, self.k, self.mask = q, k, mask
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        self.window = None if window is None else int(window)
        self.seq_len = L
        self.batch_shape = torch.Size(batch)
        self.state_size = self.window
        self.value_dim = check_positive_int("SoftmaxAttention: value_dim", value_dim)

    def _tensors(self):
        return tuple(x for x in (self.q, self.k, self.mask) if x is not None)

    @property
    def dtype(self):
        return self.q.dtype

    def validate(self) -> None:
        for name, x in (("q", self.q), ("k", self.k)):
            check_finite(x, f"SoftmaxAttention.{name}")
        if self.mask is not None and self.mask.is_floating_point() and bool(torch.isnan(self.mask).any()):
            raise ValueError("SoftmaxAttention.mask contains NaN")

    def allowed(self) -> torch.Tensor:
        """Boolean ``(L, L)`` structural mask: causal and within the window."""
        L = self.seq_len
        r = torch.arange(L, device=self.q.device)
        diff = r[:, None] - r[None, :]
        ok = diff >= 0
        if self.window is not None:
            ok = ok & (diff < self.window)
        return ok

    def hankel_support(self, i: int):
        """With a window ``w``, ``H_i``'s non-zeros lie in rows ``i..i+w-2`` and columns ``i-w+1..i-1``."""
        if self.window is None:
            return super().hankel_support(i)
        w = self.window
        return slice(i, min(self.seq_len, i + w - 1)), slice(max(0, i - w + 1), i)

    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        """``T[..., rows, cols]`` from the rows' scores only (the same arithmetic as :meth:`dense`)."""
        L = self.seq_len
        r0, r1, _ = rows.indices(L)
        c0, c1, _ = cols.indices(L)
        if r1 <= r0 or c1 <= c0:
            return self.dense()[..., rows, cols]
        # a row's softmax needs every column it may attend to: [r - w + 1, r] (causal, window)
        lo = 0 if self.window is None else max(0, r0 - self.window + 1)
        lo = min(lo, c0)
        hi = max(r1, c1)
        t = self._dense_part(slice(r0, r1), slice(lo, hi))
        return t[..., :, c0 - lo : c1 - lo]

    def dense(self) -> torch.Tensor:
        return self._dense_part(slice(None), slice(None))

    def _dense_part(self, rows: slice, cols: slice) -> torch.Tensor:
        """Rows ``rows`` of ``T`` restricted to ``cols``, which must hold every column the rows may attend to."""
        out_dt = compute_dtype(self.q.dtype)
        dt = out_dt
        if dt == torch.float32:
            # |score| <= max|q| max|k| d |scale|: past float32's range, score in float64 (one sync)
            bound = (
                self.q.detach().abs().amax().double()
                * self.k.detach().abs().amax().double()
                * self.q.shape[-1]
                * abs(self.scale)
            )
            if float(bound) > _F32_SAFE:
                dt = torch.float64
        L = self.seq_len
        r_idx = torch.arange(L, device=self.q.device)[rows]
        c_idx = torch.arange(L, device=self.q.device)[cols]
        q = self.q[..., rows, :]
        k = self.k[..., cols, :]
        fmax = torch.finfo(dt).max
        scores = torch.clamp((q.to(dt) @ k.to(dt).transpose(-1, -2)) * self.scale, -fmax, fmax)
        scores = scores.expand(*self.batch_shape, r_idx.numel(), c_idx.numel())
        diff = r_idx[:, None] - c_idx[None, :]
        ok = diff >= 0
        if self.window is not None:
            ok = ok & (diff < self.window)
        if self.mask is None:
            # every row can attend at least to itself: one masked softmax, no empty-row handling
            return torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).to(out_dt)
        mask = self.mask[..., rows, cols]
        if mask.dtype == torch.bool:
            ok = ok & mask
        else:
            scores = scores + mask.to(dt)
            ok = ok & torch.isfinite(mask)
        scores = scores.masked_fill(~ok, float("-inf"))
        row_has = torch.isfinite(scores).any(dim=-1, keepdim=True)
        scores = torch.where(row_has, scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=-1)
        return torch.where(row_has & ok, probs, torch.zeros_like(probs)).to(out_dt)

    def to(self, dtype=None, device=None) -> "SoftmaxAttention":
        cast = lambda x: None if x is None else x.to(dtype=dtype if x.is_floating_point() else None, device=device)
        return SoftmaxAttention(
            cast(self.q),
            cast(self.k),
            scale=self.scale,
            window=self.window,
            mask=cast(self.mask),
            value_dim=self.value_dim,
        )
