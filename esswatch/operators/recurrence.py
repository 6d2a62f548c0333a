"""``GatedRecurrence``: diagonal gated recurrences and linear attention."""

from __future__ import annotations

from typing import Optional

import torch

from ..engine.gram import gramian_form, log_cumsum
from ..engine.gram import gramians as _gramians
from ..engine.spectral import compute_dtype
from ..engine.validation import broadcast_batch, check_positive_int
from .base import ENVELOPE_SLACK, Operator, matrix_scale

__all__ = ["GatedRecurrence"]

_CHUNK_ELEMS = 1 << 24  # elements per chunk of the direct sum (..., rows, cols, N)
_TILE = 64  # rows per tile where a block crosses the diagonal


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
        self._all_decay = None  # _decays(), computed once

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

    def _decays(self) -> bool:
        """Whether every ``log_decay`` is ``<= 0`` (every real gate), so that the factored blocks' exponents are."""
        if self._all_decay is None:
            self._all_decay = self.log_decay is None or bool((self.log_decay.detach() <= 0).all())
        return self._all_decay

    def _factors(self, q, k, cum, rows: slice, cols: slice, t: int, dt):
        """``(O, R)`` with ``T[rows, cols] = O R^T`` for ``cols <= t <= rows``: ``O[r] = q[r] exp(cum[r] - cum[t])``,
        ``R[c] = k[c] exp(cum[t] - cum[c])``; the exponents in float64, each ``<= 0`` for decays."""
        ref = cum[..., t : t + 1, :]
        o = q[..., rows, :].to(torch.float64) * torch.exp(cum[..., rows, :] - ref)
        r = k[..., cols, :].to(torch.float64) * torch.exp(ref - cum[..., cols, :])
        return o.to(dt), r.to(dt)

    def _block(self, rows: slice, cols: slice, dt) -> torch.Tensor:
        """``T[..., rows, cols]`` computed from the formula (masked to ``c <= r``).

        With decays, columns before the rows' first index come from one product of factors (:meth:`_factors`, a
        matmul of width ``N``: every ``H_i`` and its windows), and the part that crosses the diagonal from
        tiles of ``_TILE`` rows, each a product for the columns before it and the direct sum over the state
        for its own ``_TILE x _TILE`` square. A positive ``log_decay`` takes the direct sum everywhere
        (:meth:`_direct`), whose exponents never split."""
        q, k, ld = self.expanded()
        L = self.seq_len
        r0, r1, _ = rows.indices(L)
        c0, c1, _ = cols.indices(L)
        if ld is None:
            causal = torch.arange(c0, c1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
            return (q[..., r0:r1, :].to(dt) @ k[..., c0:c1, :].to(dt).transpose(-1, -2)) * causal
        if not self._decays():
            return self._direct(q, k, ld, slice(r0, r1), slice(c0, c1), dt)
        # cum[t] = sum_{s <= t} log a_s; a decay below the floor is 0 either way, and keeps cum's round-off small
        cum = log_cumsum(ld, ld.shape)
        if c1 <= c0 or r1 <= r0 or c1 - 1 <= r0:  # every column <= every row: one product
            if c1 <= c0 or r1 <= r0:
                return q.new_zeros(*self.batch_shape, max(0, r1 - r0), max(0, c1 - c0), dtype=dt)
            o, r = self._factors(q, k, cum, slice(r0, r1), slice(c0, c1), c1 - 1, dt)
            return o @ r.transpose(-1, -2)
        tiles = []
        for s in range(r0, r1, _TILE):
            e = min(r1, s + _TILE)
            parts = []
            before = min(c1, s)  # columns c < s: a product with t = before - 1
            if before > c0:
                o, r = self._factors(q, k, cum, slice(s, e), slice(c0, before), before - 1, dt)
                parts.append(o @ r.transpose(-1, -2))
            lo, hi = max(c0, s), min(c1, e)
            if hi > lo:
                parts.append(self._direct(q, k, ld, slice(s, e), slice(lo, hi), dt, cum=cum))
            if c1 > max(c0, e):
                parts.append(q.new_zeros(*self.batch_shape, e - s, c1 - max(c0, e), dtype=dt))
            tiles.append(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        return torch.cat(tiles, dim=-2)

    def _direct(self, q, k, ld, rows: slice, cols: slice, dt, cum=None) -> torch.Tensor:
        """``T[..., rows, cols]`` as the sum over the state of ``q k exp(cum[r] - cum[c])``, masked to ``c <= r``, by
        chunks of at most ``_CHUNK_ELEMS`` ``(rows, cols, N)`` elements (``cum`` in float64 when given)."""
        L = self.seq_len
        r_idx = torch.arange(L, device=q.device)[rows]
        c_idx = torch.arange(L, device=q.device)[cols]
        causal = c_idx[None, :] <= r_idx[:, None]
        if cum is None:
            cum = torch.cumsum(ld.to(dt), dim=-2)
        qr, kc = q[..., rows, :].to(dt), k[..., cols, :].to(dt)
        cr, cc = cum[..., rows, :], cum[..., cols, :]
        R, C, N = qr.shape[-2], kc.shape[-2], qr.shape[-1]
        per_row = max(1, _CHUNK_ELEMS // max(1, self.numel_batch() * C * N))
        outs = []
        for s in range(0, R, per_row):
            e = min(R, s + per_row)
            diff = cr[..., s:e, None, :] - cc[..., None, :, :]  # (..., r, C, N|1)
            diff = diff.masked_fill(~causal[s:e, :, None], float("-inf"))
            outs.append((qr[..., s:e, None, :] * kc[..., None, :, :] * torch.exp(diff).to(dt)).sum(-1))
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
        direct form's weighted factors (``n x L x N`` per matrix, about eight such buffers), the segments for a few
        indices (without a graph two buffers of the longest segment, at most ``2 x L x N``; with one ``Lam`` and
        each segment's float64 factors, weights and products, all of them alive: about six ``L x N``) or the
        chunked form's per-position outer products
        and their running sums (about three ``L x N x N``); then the
        ``P``, ``Q`` stacks and their eigenproblems. With ``grad``, half as much again (the graph); the chunked form
        with a graph keeps its outer products, their cumulative sums and a permuted copy (``3 L N^2`` per direction)
        and every index's gathered and scaled Gramians and eigenproblem (measured: up to ``5 L N^2 + 10 n N^2``
        at all indices), counted as ``6 L N^2 + 12 n N^2``."""
        b, L, N = self.numel_batch(), self.seq_len, self.state_width
        per = 8 * b
        form = gramian_form(n, L, N, b)[0]
        if form == "chunked" and grad:
            return per * N * N * (6 * L + 12 * n)
        if form == "direct":
            out = 8 * per * n * L * N
        elif form == "few":  # the segments' buffers; with a graph Lam and every segment's factors, weights, products
            out = (6 if grad else 2) * per * L * N
        else:
            out = 3 * per * L * N * N
        out += 4 * per * n * N * N
        return out * 3 // 2 if grad else out

    def materialize_bytes(self, indices, grad: bool) -> int:
        """The dense routes cut each block from the formula (:meth:`hankel`), never ``T``. With decays (or none),
        each block is one product of two width-``N`` factors, and every block is alive, with a stacked copy, until
        the batched SVD: twice their sum, plus per block the factors' float64 and compute-dtype buffers of ``L x N``
        (with gradients, all of them are in the graph). A positive ``log_decay`` takes the direct sum: about six
        ``(rows, C, N)`` temporaries of at most ``_CHUNK_ELEMS`` elements at a time, with gradients about three per
        element of every block times the decay's width."""
        itemsize = torch.finfo(compute_dtype(self.q.dtype)).bits // 8
        L, N, b = self.seq_len, self.state_width, self.numel_batch()
        blocks = [(L - i) * i for i in indices] or [0]
        if self._decays():
            factors = b * L * N * (4 * 8 + 2 * itemsize)
            return 2 * b * sum(blocks) * itemsize + factors * (len(blocks) if grad else 1)
        width = self.state_width if self.log_decay.shape[-1] > 1 else 1
        if grad:
            return 3 * b * sum(blocks) * width * itemsize
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
        sq = matrix_scale(self.q, (-2, -1), squared=True)
        sk = matrix_scale(self.k, (-2, -1), squared=True)
        if sq is None and sk is None:
            return self
        q = self.q if sq is None else self.q / sq
        k = self.k if sk is None else self.k / sk
        return GatedRecurrence(q, k, self.log_decay, value_dim=self.value_dim)

    def to(self, dtype=None, device=None) -> "GatedRecurrence":
        return self._rebuild(lambda x, core: x.to(dtype=dtype, device=device))

    def _rebuild(self, fn) -> "GatedRecurrence":
        ld = None if self.log_decay is None else fn(self.log_decay, 2)
        return GatedRecurrence(fn(self.q, 2), fn(self.k, 2), ld, value_dim=self.value_dim)
