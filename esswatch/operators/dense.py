"""``Dense(T)``: an explicit batch of causal matrices."""

from __future__ import annotations

import torch

from ..engine.validation import check_positive_int
from .base import Operator, matrix_scale

__all__ = ["Dense"]


class Dense(Operator):
    """A materialized causal operator ``T`` of shape ``(..., L, L)``.

    Args:
        t: the matrices; entries above the diagonal must be exactly zero.
        state_size: optional natural state size (``None`` = unbounded).
        value_dim: value channels sharing this operator (metadata for total ESS).
    """

    #: the rescaled copy; with gradients its gradient (:meth:`Operator.materialize_bytes`)
    dense_copies = (1, 3)

    def __init__(self, t: torch.Tensor, *, state_size=None, value_dim: int = 1):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"Dense expects a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
            raise ValueError(f"Dense expects a (..., L, L) tensor, got shape {tuple(t.shape)}")
        if not (t.is_floating_point()):
            raise ValueError(f"Dense expects a floating-point tensor, got {t.dtype}")
        self.t = t
        self.seq_len = t.shape[-1]
        self.batch_shape = t.shape[:-2]
        self.state_size = check_positive_int("Dense: state_size", state_size, allow_none=True)
        self.value_dim = check_positive_int("Dense: value_dim", value_dim)

    def _tensors(self):
        return (self.t,)

    def validate(self) -> None:
        super().validate()
        upper = torch.triu(self.t.detach(), diagonal=1)
        if bool((upper != 0).any()):
            worst = upper.reshape(-1, self.seq_len, self.seq_len).abs().amax(0)
            r, c = [int(x) for x in torch.nonzero(worst)[0]]
            raise ValueError(
                f"Dense operator is not causal: T[{r}, {c}] (above the diagonal) is non-zero; "
                "mask future positions (T[r, c] = 0 for c > r)"
            )

    def dense(self) -> torch.Tensor:
        return self.t

    def normalized(self) -> "Dense":
        s = matrix_scale(self.t, (-2, -1))
        if s is None:
            return self
        return Dense(self.t / s, state_size=self.state_size, value_dim=self.value_dim)

    def to(self, dtype=None, device=None) -> "Dense":
        return self._rebuild(lambda x, core: x.to(dtype=dtype, device=device))

    def _rebuild(self, fn) -> "Dense":
        return Dense(fn(self.t, 2), state_size=self.state_size, value_dim=self.value_dim)
