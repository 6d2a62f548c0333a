"""Multi-query associative recall (MQAR; Arora et al., "Zoology", 2023), generated locally.

A sequence starts with ``num_kv`` key-value pairs ``k_1 v_1 ... k_n v_n``; the rest
holds each key once more, at random positions, between filler tokens (0). At a
query position the model must output the value bound to that key. Keys come from
``[1, vocab/2)``, values from ``[vocab/2, vocab)``; labels are ``-100`` (ignored)
everywhere except at query positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["MQAR", "mqar_batch"]


def mqar_batch(
    batch_size: int, seq_len: int, num_kv: int, vocab_size: int, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``, both ``(batch_size, seq_len)`` int64."""
    half = vocab_size // 2
    if num_kv < 1 or num_kv > half - 1:
        raise ValueError(f"num_kv must be in 1..{half - 1} for vocab_size={vocab_size}, got {num_kv}")
    if seq_len < 3 * num_kv:
        raise ValueError(f"seq_len must be at least 3 * num_kv = {3 * num_kv}, got {seq_len}")
    keys = torch.argsort(torch.rand(batch_size, half - 1, generator=generator), dim=-1)[:, :num_kv] + 1
    values = torch.randint(half, vocab_size, (batch_size, num_kv), generator=generator)
    x = torch.zeros(batch_size, seq_len, dtype=torch.int64)
    y = torch.full((batch_size, seq_len), -100, dtype=torch.int64)
    x[:, 0 : 2 * num_kv : 2] = keys
    x[:, 1 : 2 * num_kv : 2] = values
    free = seq_len - 2 * num_kv
    pos = torch.argsort(torch.rand(batch_size, free, generator=generator), dim=-1)[:, :num_kv] + 2 * num_kv
    order = torch.argsort(torch.rand(batch_size, num_kv, generator=generator), dim=-1)
    rows = torch.arange(batch_size)[:, None]
    x[rows, pos] = keys[rows, order]
    y[rows, pos] = values[rows, order]
    return x, y


@dataclass
class MQAR:
    """A stream of MQAR batches with its own generator (the global RNG is not used)."""

    seq_len: int = 64
    num_kv: int = 8
    vocab_size: int = 64
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        self._gen = torch.Generator().manual_seed(self.seed)
        mqar_batch(1, self.seq_len, self.num_kv, self.vocab_size, torch.Generator())  # validate

    def batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return mqar_batch(self.batch_size, self.seq_len, self.num_kv, self.vocab_size, self._gen)

    def __iter__(self):
        while True:
            yield self.batch()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of query positions whose argmax equals the label."""
    mask = labels != -100
    return float((logits.argmax(-1)[mask] == labels[mask]).float().mean())
