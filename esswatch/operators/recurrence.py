"""``GatedRecurrence``: diagonal gated recurrences and linear attention."""

from __future__ import annotations

from typing import Optional

import torch

from ..engine.gram import gramian_form
from ..engine.gram import gramians as _gramians
from ..engine.spectral import compute_dtype
from ..engine.validation import broadcast_batch, check_positive_int
from .base import ENVELOPE_SLACK, Operator, matrix_scale

__all__ = ["GatedRecurrence"]

_CHUNK_ELEMS = 1 << 24  # elements per block when materializing (..., rows, L, N)


class GatedRecurrence(Operator):
    """``T[r, c] = sum_n q[r, n] k[c, n] prod_{s=c+1..r} a[s, n]`` for ``c <= r``, ``a = exp(log_decay)``.

    One class covers linear attention (``log_decay=None``), RetNet (a constant
    scalar decay per head), GLA (``(..., L, N)`` gates), Mamba2/SSD (``(..., L, 1)``,
    one decay per head: ``log_decay = dt * A``), Mamba/S6 per channel
    (``q = C``, ``k = dt * B``, ``log_decay = dt * A``) and S4D.

    Args:
        q, k: ``(..., L, N)``; leading dims broadcast.
        log_decay: broadcastable to ``(..., L, N)`` (``(..., L, 1)`` for one decay
            per head), or ``None`` (no decay: linear attention).
        value_dim: value channels sharing this operator (metadata for total ESS).

    Natural state size: ``N``.
    """

    has_gramians = True

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, log_decay: Optional[torch.Tensor] = None, *, value_dim: int = 1
    ):
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
                raise ValueError(
                    f"GatedRecurrence: {name} must be a floating tensor (..., L, N), got "
                    f"{getattr(x, 'shape', type(x).__name__)}"
                )
        if q.shape[-2:] != k.shape[-2:]:
            raise ValueError(f"GatedRecurrence: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in (L, N)")
        try:
            batch = broadcast_batch(q.shape[:-2], k.shape[:-2])
        except RuntimeError as e:
            raise ValueError(
                f"GatedRecurrence: leading dims of q {tuple(q.shape)} and k {tuple(k.shape)} do not broadcast"
            ) from e
        L, N = q.shape[-2:]
        if N < 1:
            raise ValueError(
                f"GatedRecurrence: the state width N (last dim of q, k) must be >= 1, got q {tuple(q.shape)}"
            )
        if log_decay is not None:
            if not isinstance(log_decay, torch.Tensor) or not log_decay.is_floating_point() or log_decay.dim() < 2:
                raise ValueError("GatedRecurrence: log_decay must be a floating tensor (..., L, N) or (..., L, 1)")
            if log_decay.shape[-2] != L or log_decay.shape[-1] not in (1, N):
                raise ValueError(
                    f"GatedRecurrence: log_decay must be (..., L, N) or (..., L, 1) with L={L}, "
                    f"N={N}; got {tuple(log_decay.shape)}"
                )
            try:
                batch = broadcast_batch(batch, log_decay.shape[:-2])
            except RuntimeError as e:
                raise ValueError(
                    f"GatedRecurrence: log_decay {tuple(log_decay.shape)} does not broadcast with q/k"
                ) from e
        self.q, self.k, self.log_decay = q, k, log_decay
        self.seq_len = L
        self.state_width = N
        self.batch_shape = torch.Size(batch)
        self.state_size = N
        self.value_dim = check_positive_int("GatedRecurrence: value_dim", value_dim)

    def _tensors(self):
        return tuple(x for x in (self.q, self.k, self.log_decay) if x is not None)

    @property
    def dtype(self):
        return self.q.dtype

    def expanded(self):
        """``(q, k, log_decay)`` broadcast to ``batch + (L, N)`` / ``batch + (L, N|1)``."""
        L, N = self.seq_len, self.state_width
        q = self.q.expand(*self.batch_shape, L, N)
        k = self.k.expand(*self.batch_shape, L, N)
        ld = None
        if self.log_decay is not None:
            ld = self.log_decay.expand(*self.batch_shape, L, self.log_decay.shape[-1])
        return q, k, ld

    def gramians(self, indices: torch.Tensor, method: str = "auto"):
        """``(P, Q)`` at sorted unique ``indices`` (:func:`esswatch.engine.gram.gramians`)."""
        return _gramians(*self.expanded(), indices, method)

    def _block(self, rows: slice, cols: slice, dt) -> torch.Tensor:
        """``T[..., rows, cols]`` computed from the formula (masked to ``c <= r``)."""
        q, k, ld = self.expanded()
        q, k = q.to(dt), k.to(dt)
        L = self.seq_len
        r_idx = torch.arange(L, device=q.device)[rows]
        c_idx = torch.arange(L, device=q.device)[cols]
        causal = c_idx[None, :] <= r_idx[:, None]
        if ld is None:
            out = q[..., rows, :] @ k[..., cols, :].transpose(-1, -2)
            return out * causal
        cum = torch.cumsum(ld.to(dt), dim=-2)  # cum[t] = sum_{s <= t} log a_s
        if ld.shape[-1] == 1:
            diff = cum[..., rows, :] - cum[..., cols, :].transpose(-1, -2)  # (..., R, C)
            diff = diff.masked_fill(~causal, float("-inf"))
            return (q[..., rows, :] @ k[..., cols, :].transpose(-1, -2)) * torch.exp(diff)
        qr, kc, cr, cc = q[..., rows, :], k[..., cols, :], cum[..., rows, :], cum[..., cols, :]
        R, C, N = qr.shape[-2], kc.shape[-2], qr.shape[-1]
        per_row = max(1, _CHUNK_ELEMS // max(1, self.numel_batch() * C * N))
        outs = []
        for s in range(0, R, per_row):
            e = min(R, s + per_row)
            diff = cr[..., s:e, None, :] - cc[..., None, :, :]  # (..., r, C, N)
            diff = diff.masked_fill(~causal[s:e, :, None], float("-inf"))
            outs.append((qr[..., s:e, None, :] * kc[..., None, :, :] * torch.exp(diff)).sum(-1))
        return torch.cat(outs, dim=-2)

    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        """``T[..., rows, cols]`` from the formula (float32, or float64 for float64 input)."""
        return self._block(rows, cols, compute_dtype(self.q.dtype))

    def dense(self) -> torch.Tensor:
        return self._block(slice(None), slice(None), compute_dtype(self.q.dtype))

    def hankel(self, i: int) -> torch.Tensor:
        return self._block(slice(i, None), slice(0, i), compute_dtype(self.q.dtype))

    def gram_bytes(self, n: int, grad: bool = False) -> int:
        """The Gramian route's buffers (float64), by the form :func:`esswatch.engine.gram.gramians` picks: the
        direct form's weighted factors (``n x L x N`` per matrix, about eight such buffers), the chunked form's
        for a few indices (about four ``L x N`` and two ``N x N`` per chunk) or its per-position outer products
        and their running sums (about three ``L x N x N``); then the
        ``P``, ``Q`` stacks and their eigenproblems. With ``grad``, half as much again (the graph)."""
        b, L, N = self.numel_batch(), self.seq_len, self.state_width
        per = 8 * b
        form, C = gramian_form(n, L, N, b)
        if form == "direct":
            out = 8 * per * n * L * N
        elif form == "few":  # weighted factors and one N x N sum per chunk
            out = 4 * per * L * N + 2 * per * (L // C + 1) * N * N + 3 * per * n * C * N
        else:
            out = 3 * per * L * N * N
        out += 4 * per * n * N * N
        return out * 3 // 2 if grad else out

    def materialize_bytes(self, indices, grad: bool) -> int:
        """The dense routes cut each block from the formula (:meth:`hankel`), never ``T``: without gradients
        about six ``(rows, C, N)`` temporaries of at most ``_CHUNK_ELEMS`` elements at a time, with gradients
        about three per element of every block times the decay's width (its graph)."""
        itemsize = torch.finfo(compute_dtype(self.q.dtype)).bits // 8
        width = 1 if self.log_decay is None or self.log_decay.shape[-1] == 1 else self.state_width
        L, b = self.seq_len, self.numel_batch()
        blocks = [(L - i) * i for i in indices] or [0]
        if grad:
            return 3 * b * sum(blocks) * width * itemsize
        if width == 1:
            return 2 * b * max(blocks) * itemsize
        return 6 * min(_CHUNK_ELEMS, b * max(blocks) * width) * itemsize

    def envelope(self):
        """``out = log ||q_r||``, ``inp = log ||k_c||``, ``step = max_n log_decay[s, n]`` (Cauchy-Schwarz over
        the state), float64, detached; ``None`` without a decay (nothing is negligible)."""
        if self.log_decay is None:
            return None
        shape = (*self.batch_shape, self.seq_len)
        slack = 0.0 if self.q.dtype == torch.float64 else ENVELOPE_SLACK
        with torch.no_grad():  # in the inputs' dtype as given, then broadcast (no float64 or broadcast copies)
            norm = lambda x: torch.linalg.vector_norm(x.detach(), dim=-1).to(torch.float64)  # noqa: E731
            out = (torch.log(norm(self.q)) + slack).expand(shape)
            inp = (torch.log(norm(self.k)) + slack).expand(shape)
            step = self.log_decay.detach().amax(dim=-1).to(torch.float64).expand(shape)
        return out, inp, step

    def normalized(self) -> "GatedRecurrence":
        sq = matrix_scale(self.q, (-2, -1))
        sk = matrix_scale(self.k, (-2, -1))
        if sq is None and sk is None:
            return self
        q = self.q if sq is None else self.q / sq
        k = self.k if sk is None else self.k / sk
        return GatedRecurrence(q, k, self.log_decay, value_dim=self.value_dim)

    def to(self, dtype=None, device=None) -> "GatedRecurrence":
        cast = lambda x: None if x is None else x.to(dtype=dtype, device=device)
        return GatedRecurrence(cast(self.q), cast(self.k), cast(self.log_decay), value_dim=self.value_dim)
