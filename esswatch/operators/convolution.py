"""``Convolution``: LTI causal long convolutions (Hyena, long conv)."""

from __future__ import annotations

import torch

from ..engine.spectral import compute_dtype
from ..engine.validation import check_positive_int
from .base import Operator, matrix_scale

__all__ = ["Convolution"]


class Convolution(Operator):
    """``T[r, c] = h[r - c]`` for ``c <= r`` (a lower-triangular Toeplitz matrix).

    Args:
        h: kernel ``(..., L)``.
        value_dim: value channels sharing this kernel (metadata for total ESS).

    The natural state size is unbounded (``TSS_i = min(i, L - i)``).
    """

    #: ``T`` and a trimmed copy of its blocks; with gradients its gradient and the scatter back to the kernel
    #: (:meth:`Operator.materialize_bytes`)
    dense_copies = (2, 3)

    def __init__(self, h: torch.Tensor, *, value_dim: int = 1):
        if not isinstance(h, torch.Tensor) or h.dim() < 1 or not h.is_floating_point():
            raise ValueError(
                f"Convolution: h must be a floating tensor (..., L), got {getattr(h, 'shape', type(h).__name__)}"
            )
        self.h = h
        self.seq_len = h.shape[-1]
        self.batch_shape = h.shape[:-1]
        self.state_size = None
        self.value_dim = check_positive_int("Convolution: value_dim", value_dim)

    def _tensors(self):
        return (self.h,)

    def dense(self) -> torch.Tensor:
        # T[r, c] = hp[L - 1 + r - c] with hp = (L - 1 zeros, h): row r of T is the window
        # hp[r : r + L] reversed. No L x L index matrix; one L x L allocation (the flip).
        L = self.seq_len
        dt = compute_dtype(self.h.dtype)
        hp = torch.nn.functional.pad(self.h.to(dt), (L - 1, 0))
        return hp.unfold(-1, L, 1).flip(-1)

    def normalized(self) -> "Convolution":
        s = matrix_scale(self.h, (-1,))
        if s is None:
            return self
        return Convolution(self.h / s, value_dim=self.value_dim)

    def _support(self) -> int:
        """Kernel length: 1 + the largest lag with a non-zero tap in any channel (one host sync)."""
        if getattr(self, "_kernel_len", None) is None:
            nz = (self.h.detach() != 0).reshape(-1, self.seq_len).any(0)
            idx = nz.nonzero()
            self._kernel_len = int(idx[-1]) + 1 if idx.numel() else 1
        return self._kernel_len

    def hankel_support(self, i: int):
        """A kernel of length ``K`` leaves ``H_i`` non-zero in rows ``i..i+K-2`` and columns ``i-K+1..i-1``."""
        K = self._support()
        return slice(i, min(self.seq_len, i + K - 1)), slice(max(0, i - K + 1), i)

    def materialize_bytes(self, indices, grad: bool) -> int:
        """A kernel of length ``K`` shorter than the sequence leaves ``H_i`` non-zero in at most ``(K - 1) x
        (K - 1)`` entries, which :meth:`block` cuts without ``T``: per block its lag indices (int64), the gathered
        taps and their masked copy, all alive until the stacked SVD (with gradients the graph keeps the indices
        and the mask). Indices whose support is not narrowed take :attr:`dense_copies` of ``T``."""
        L, b = self.seq_len, self.numel_batch()
        itemsize = torch.finfo(compute_dtype(self.dtype)).bits // 8
        sizes, full = [], False
        for i in indices:
            rows, cols = (len(range(*s.indices(L))) for s in self.hankel_support(i))
            if (rows, cols) == (L - i, i):
                full = True
            else:
                sizes.append(rows * cols)
        out = super().materialize_bytes(indices, grad) if full else 0
        return out + sum(sizes) * (8 + 3 * b * itemsize) * (2 if grad else 1)

    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        L = self.seq_len
        dt = compute_dtype(self.h.dtype)
        r = torch.arange(L, device=self.h.device)
        lag = r[rows][:, None] - r[cols][None, :]
        return self.h.to(dt)[..., lag.clamp(min=0)] * (lag >= 0)

    def hankel_fro2(self, indices, dense=None):
        """Exact ``||H_i||_F^2 = sum_d h[d]^2 * #{(r, c): r - c = d, r >= i > c}`` in O(L) per index."""
        L = self.seq_len
        d = torch.arange(L, dtype=torch.float64, device=self.h.device)
        i = indices.to(device=self.h.device, dtype=torch.float64)[:, None]
        # c ranges over [max(0, i - d), min(i - 1, L - 1 - d)]
        count = torch.clamp(torch.minimum(i - 1, L - 1 - d) - torch.clamp(i - d, min=0) + 1, min=0)
        return (self.h.detach().to(torch.float64) ** 2)[..., None, :].mul(count).sum(-1)

    def to(self, dtype=None, device=None) -> "Convolution":
        return self._rebuild(lambda x, core: x.to(dtype=dtype, device=device))

    def _rebuild(self, fn) -> "Convolution":
        return Convolution(fn(self.h, 1), value_dim=self.value_dim)
