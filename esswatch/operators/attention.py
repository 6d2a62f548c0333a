"""``SoftmaxAttention``: causal (optionally sliding-window, masked) softmax attention."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..engine import alloc
from ..engine.exact import EXACT_CHUNK_BYTES
from ..engine.spectral import compute_dtype
from ..engine.validation import broadcast_batch, check_finite, check_finite_number, check_positive_int
from .base import Operator

__all__ = ["SoftmaxAttention"]

#: scores whose bound exceeds this are computed in float64 for float32 inputs (softmax is
#: invariant to the row max it subtracts, but the scores themselves must be representable)
_F32_SAFE = 1e36
#: the same for float64 scores: below it they cannot overflow and are not clamped
_F64_SAFE = 1e300


#: rows per block when the forbidden scores are filled (``SoftmaxAttention._fill_forbidden_``)
_FILL_ROWS = 256


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, -1)``; in place (same kernel, same values) on CPU without autograd:
    a fresh ``L x L`` output costs about as much as the softmax itself."""
    if x.requires_grad or x.device.type != "cpu":
        return torch.softmax(x, dim=-1)
    return torch.softmax(x, dim=-1, out=x)


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

    #: the scores and ``T``; with gradients the softmax's saved output and the backward pass's buffers
    #: (:meth:`Operator.materialize_bytes`)
    dense_copies = (2, 4)

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
            if isinstance(mask, torch.Tensor) and not (mask.dtype == torch.bool or mask.is_floating_point()):
                raise ValueError(
                    f"SoftmaxAttention: mask must be boolean (True = may attend) or an additive float mask, got "
                    f"{mask.dtype} (for a 0/1 mask such as a Hugging Face attention_mask, pass mask.bool())"
                )
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
        # one pass: NaN and +inf both fail `< inf` (softmax has no value for a score of +inf: torch gives NaN)
        if self.mask is not None and self.mask.is_floating_point() and not bool((self.mask < float("inf")).all()):
            raise ValueError("SoftmaxAttention.mask contains NaN or +inf (an additive mask blocks with -inf)")

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

    def materialize_bytes(self, indices, grad: bool) -> int:
        """With a window ``w`` shorter than the sequence the blocks come from :meth:`block` (``T`` is never built):
        each block's scores span about ``w`` rows and ``2 w`` columns and stay alive until the blocks, stacked
        into one batched SVD, are decomposed (twice that with gradients), beside the rescaled ``q`` and ``k``;
        without gradients the blocks are built in chunks (``EXACT_CHUNK_BYTES`` of values), so only a
        chunk's are alive at once. Without a window, :attr:`dense_copies` of ``T``."""
        if self.window is None or self.window >= self.seq_len:
            return super().materialize_bytes(indices, grad)
        itemsize = torch.finfo(compute_dtype(self.dtype)).bits // 8
        b, w, n = self.numel_batch(), self.window, max(1, len(indices))
        inputs = 2 * b * self.seq_len * self.q.shape[-1] * itemsize
        if grad:
            return inputs + n * b * w * w * itemsize * (2 * 4 + 1)
        # one chunk alive: about 7.2 w^2 per block measured (scores, softmax temporaries, the stacked copy)
        return inputs + min(n, max(1, EXACT_CHUNK_BYTES // (b * w * w * itemsize))) * b * w * w * itemsize * 10

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

    def _score_dtype(self, out_dt: torch.dtype) -> tuple[torch.dtype, bool]:
        """``(dtype, clamp)``: the scores' dtype and whether they may overflow it (then clamped).

        ``|score| <= max|q| max|k| d |scale|`` (one sync): past float32's range, float32 scores
        are computed in float64; below the bound the clamp to the finite range is the identity
        and skipped (NaN or infinite inputs keep it)."""
        bound = float(
            self.q.detach().abs().amax().double()
            * self.k.detach().abs().amax().double()
            * self.q.shape[-1]
            * abs(self.scale)
        )
        dt = torch.float64 if out_dt == torch.float32 and bound > _F32_SAFE else out_dt
        return dt, not bound <= (_F32_SAFE if dt == torch.float32 else _F64_SAFE)

    def _forbidden(self, rows: slice, cols: slice) -> torch.Tensor:
        """Boolean ``(R, C)``: True where causality or the window forbid ``T[r, c]``."""
        L, dev = self.seq_len, self.q.device
        (r0, r1, rs), (c0, c1, cs) = rows.indices(L), cols.indices(L)
        if rs != 1 or cs != 1:
            r, c = torch.arange(L, device=dev)[rows], torch.arange(L, device=dev)[cols]
            diff = r[:, None] - c[None, :]
            return (diff < 0) if self.window is None else (diff < 0) | (diff >= self.window)
        shape = (max(r1 - r0, 0), max(c1 - c0, 0))
        # allowed iff 0 <= (r0 + a) - (c0 + b) < w: b - a <= r0 - c0 (and b - a > r0 - c0 - w)
        bad = torch.ones(shape, dtype=torch.bool, device=dev).triu_(r0 - c0 + 1)
        if self.window is not None:
            bad |= torch.ones(shape, dtype=torch.bool, device=dev).tril_(r0 - c0 - self.window)
        return bad

    def _fill_forbidden_(self, scores: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """``scores.masked_fill_(self._forbidden(rows, cols), -inf)``, by blocks of ``_FILL_ROWS`` rows:
        the columns forbidden to every row of a block are plain slice fills, and only the bands
        where causality or the window cut through the block are masked (4-6x faster than one
        broadcast mask over ``L x L`` at L = 2048, one thread; the same values)."""
        L, ninf = self.seq_len, float("-inf")
        (r0, r1, rs), (c0, c1, cs) = rows.indices(L), cols.indices(L)
        if rs != 1 or cs != 1:
            return scores.masked_fill_(self._forbidden(rows, cols), ninf)
        C, w = max(c1 - c0, 0), self.window
        clip = lambda j: max(0, min(C, j))  # a global column bound as a local one
        for a in range(0, max(r1 - r0, 0), _FILL_ROWS):
            b = min(a + _FILL_ROWS, r1 - r0)
            top, bottom = r0 + a, r0 + b - 1  # the block's first and last row
            part = scores[..., a:b, :]
            part[..., clip(bottom + 1 - c0) :] = ninf  # c > bottom: after every row of the block
            bands = [(clip(top + 1 - c0), clip(bottom + 1 - c0))]  # the diagonal: c in (top, bottom]
            if w is not None:
                part[..., : clip(top - w + 1 - c0)] = ninf  # c <= top - w: out of every row's window
                bands.append((clip(top - w + 1 - c0), clip(bottom - w + 1 - c0)))  # c in (top - w, bottom - w]
            for j0, j1 in bands:
                if j0 < j1:
                    part[..., j0:j1].masked_fill_(
                        self._forbidden(slice(top, bottom + 1), slice(c0 + j0, c0 + j1)), ninf
                    )
        return scores

    def _dense_part(self, rows: slice, cols: slice) -> torch.Tensor:
        """Rows ``rows`` of ``T`` restricted to ``cols``, which must hold every column the rows may attend to.

        One fresh ``(..., R, C)`` tensor (the scores) is filled in place and, without autograd
        on CPU, turned into probabilities in place: the same values as the out-of-place
        formula, bit for bit (``tests/test_materialize.py``)."""
        out_dt = compute_dtype(self.q.dtype)
        dt, clamp = self._score_dtype(out_dt)
        q, kt = self.q[..., rows, :].to(dt), self.k[..., cols, :].to(dt).transpose(-1, -2)
        if q.requires_grad or kt.requires_grad or q.device.type != "cpu":
            scores = q @ kt
        else:  # a large CPU buffer on huge pages (engine/alloc.py: its first touch is most of the cost)
            shape = torch.broadcast_shapes(q.shape[:-2], kt.shape[:-2]) + (q.shape[-2], kt.shape[-1])
            scores = torch.matmul(q, kt, out=alloc.empty(shape, dtype=dt, device=q.device))
        scores = scores.mul_(self.scale)
        if clamp:
            fmax = torch.finfo(dt).max
            scores = scores.clamp_(-fmax, fmax)
        full = self.batch_shape + scores.shape[-2:]
        if scores.shape != full:  # a mask with more batch dims than q, k
            scores = scores.expand(full).clone()
        if self.mask is None:
            # every row can attend at least to itself: one masked softmax, no empty-row handling
            return _softmax(self._fill_forbidden_(scores, rows, cols)).to(out_dt)
        bad = self._forbidden(rows, cols)
        mask = self.mask[..., rows, cols]
        if mask.dtype == torch.bool:
            bad = bad | ~mask
        else:
            scores = scores.add_(mask.to(dt))
            bad = bad | ~torch.isfinite(mask)
        scores = scores.masked_fill_(bad, float("-inf"))
        if not scores.requires_grad and scores.device.type == "cpu" and bool(torch.isfinite(scores.amax(-1)).all()):
            # every row has a finite entry (its max) and none is +inf: the softmax's -inf entries are exactly 0, so
            # the masking below would change nothing (the same values without isfinite's four buffers of T's size)
            return _softmax(scores).to(out_dt)
        row_has = torch.isfinite(scores).any(dim=-1, keepdim=True)
        probs = _softmax(scores.masked_fill_(~row_has, 0.0))
        drop = bad | ~row_has
        # the softmax's output is saved for its backward: zeroed in place only without autograd
        probs = probs.masked_fill(drop, 0.0) if probs.requires_grad else probs.masked_fill_(drop, 0.0)
        return probs.to(out_dt)

    def to(self, dtype=None, device=None) -> "SoftmaxAttention":
        return self._rebuild(lambda x, core: x.to(dtype=dtype if x.is_floating_point() else None, device=device))

    def _rebuild(self, fn) -> "SoftmaxAttention":
        return SoftmaxAttention(
            fn(self.q, 2),
            fn(self.k, 2),
            scale=self.scale,
            window=self.window,
            mask=None if self.mask is None else fn(self.mask, 2),
            value_dim=self.value_dim,
        )
