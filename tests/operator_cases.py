"""Operators and spectra shared by the operator and functional-API tests (float64, seeded)."""

from __future__ import annotations

import torch

from esswatch.operators import Convolution, Dense, GatedRecurrence, SoftmaxAttention

F64 = torch.float64


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def ops(L=24, seed=0):
    q, k = rand(2, 3, L, 6, seed=seed), rand(2, 3, L, 6, seed=seed + 1)
    ld = -torch.rand(2, 3, L, 6, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    return {
        "dense": Dense(torch.tril(rand(2, L, L, seed=seed + 3))),
        "softmax": SoftmaxAttention(q, k),
        "softmax_window": SoftmaxAttention(q, k, window=5),
        "softmax_mask": SoftmaxAttention(q, k, mask=torch.rand(L, L, generator=torch.Generator().manual_seed(9)) > 0.3),
        "linear": GatedRecurrence(q, k),
        "gla": GatedRecurrence(q, k, ld),
        "mamba2": GatedRecurrence(q, k, ld[..., :1]),
        "conv": Convolution(rand(3, L, seed=seed + 4)),
    }


def trained_like_attention(L, heads=2, d=16, sharp=4.0, seed=0):
    """Peaked, low-ESS softmax attention: keys cluster on a few directions, large logits."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, 4, d, generator=g, dtype=F64)
    assign = torch.randint(0, 4, (heads, L), generator=g)
    k = centers[torch.arange(heads)[:, None], assign] + 0.05 * torch.randn(heads, L, d, generator=g, dtype=F64)
    q = centers[torch.arange(heads)[:, None], torch.randint(0, 4, (heads, L), generator=g)]
    return SoftmaxAttention(q * sharp, k)
