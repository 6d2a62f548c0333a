"""``DeltaRule``: the gated delta rule (Gated DeltaNet, as in Qwen3-Next and Qwen3.5)."""

from __future__ import annotations

import torch

from ..engine.delta_gram import (
    SEGMENT,
    delta_gram_squared_singular_values,
    delta_gramians,
    delta_rule_dense,
    delta_window,
)
from ..engine.gram_spectrum import GROUP_BYTES
from ..engine.validation import check_positive_int
from .base import ENVELOPE_SLACK, Operator, matrix_scale

__all__ = ["DeltaRule", "delta_rule_dense", "GRAM_FROM"]

#: ``estimator="auto"`` uses the Gramians where ``L >= GRAM_FROM * N`` (below, windows where the gates forget within
#: a few steps, else the dense route). Measured at N = 128, 8 heads x 2 rows, one CPU thread, against ``exact``
#: with ``T`` in closed form and long-memory gates: the Gramians took 1.4x its time at L = 512, 0.7x at 768 and
#: 0.5x at 1024 (examples/benchmarks/README.md, "Materializing the gated delta rule")
GRAM_FROM = 6


class DeltaRule(Operator):
    """``T[t, c] = beta_c q_t^T B_t B_{t-1} ... B_{c+1} k_c`` for ``c <= t``, ``B_s = exp(g_s) (I - beta_s k_s k_s^T)``.

    The map from values to outputs of the gated delta rule ``S_t = B_t S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T q_t`` (a state ``S`` of ``N x value_dim`` per head), once ``q, k, beta`` and the decay
    ``g = log_decay`` are fixed. Its transitions are not diagonal (unlike
    :class:`~esswatch.operators.GatedRecurrence`), but it factors through the ``N``-dimensional state: the
    ``"gram"`` estimator (the default) takes its Gramians from the recurrence, segment by segment
    (:func:`esswatch.engine.delta_gram.delta_gramians`), at every index and without materializing ``T``.
    ``dense()`` materializes it (:func:`delta_rule_dense`) for the other estimators, and for the rare index
    where neither Gramian factors (a state all but erased on both sides of it).

    Args:
        q, k: ``(..., L, N)`` (the layer's scaled, normalized queries and keys).
        beta, log_decay: ``(..., L)``.
        value_dim: value channels sharing this operator (metadata for total ESS).

    Natural state size: ``N``.
    """

    #: ``T``, the carried columns and the rows' pieces; with gradients each chunk's saved products
    #: (:meth:`Operator.materialize_bytes`)
    dense_copies = (3, 8)

    has_gramians = True
    gram_at_ends = True

    def __init__(self, q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor, *, value_dim=1):
        for name, x, rank in (("q", q, 2), ("k", k, 2), ("beta", beta, 1), ("log_decay", log_decay, 1)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < rank:
                raise ValueError(
                    f"DeltaRule: {name} must be a floating tensor with at least {rank} dims, got "
                    f"{getattr(x, 'shape', type(x).__name__)}"
                )
        if q.shape != k.shape or q.shape[-1] < 1:
            raise ValueError(f"DeltaRule: q {tuple(q.shape)} and k {tuple(k.shape)} must have one shape (..., L, N)")
        if beta.shape != q.shape[:-1] or log_decay.shape != q.shape[:-1]:
            raise ValueError(
                f"DeltaRule: beta {tuple(beta.shape)} and log_decay {tuple(log_decay.shape)} must have shape "
                f"{tuple(q.shape[:-1])} (q's without N)"
            )
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
        self.q, self.k, self.beta, self.log_decay = (x.to(dtype) for x in (q, k, beta, log_decay))
        self.seq_len, self.state_width = q.shape[-2], q.shape[-1]
        self.batch_shape = q.shape[:-2]
        self.state_size = int(q.shape[-1])
        self.value_dim = check_positive_int("DeltaRule: value_dim", value_dim)

    def _tensors(self):
        return (self.q, self.k, self.beta, self.log_decay)

    @property
    def prefers_gram(self) -> bool:
        """``auto`` takes the Gramians from ``L >= GRAM_FROM * N`` on; on shorter sequences the dense route
        (``T`` is small there) was as fast or faster (``examples/benchmarks/delta_rule.py``)."""
        return self.seq_len >= GRAM_FROM * self.state_width

    def dense(self) -> torch.Tensor:
        return delta_rule_dense(self.q, self.k, self.beta, self.log_decay)

    def gramians(self, indices: torch.Tensor):
        """``(P, Q)`` at sorted unique ``indices`` (:func:`esswatch.engine.delta_gram.delta_gramians`)."""
        return delta_gramians(self.q, self.k, self.beta, self.log_decay, indices)

    def hankel_window(self, i: int, a: int, b: int) -> torch.Tensor:
        """``T[..., i:i+a, i-b:i]`` in float64 from two segments' closed forms
        (:func:`esswatch.engine.delta_gram.delta_window`): no ``T``, a cost independent of ``L``."""
        return delta_window(self.q, self.k, self.beta, self.log_decay, i, a, b)

    def envelope(self):
        """``out = log ||q_r||``, ``inp = log |beta_c| ||k_c||``, ``step = g_s + log ||I - beta_s k_s k_s^T||``
        (the norm is ``max(1, |1 - beta_s ||k_s||^2|)``), float64, detached. Taken in the inputs' dtype (no
        float64 copy of ``q, k``), each widened by ``ENVELOPE_SLACK`` for its round-off."""
        with torch.no_grad():
            q, k, beta, g = (x.detach() for x in self._tensors())
            kk = (k * k).sum(-1)
            f64 = lambda x: x.to(torch.float64)  # noqa: E731
            slack = 0.0 if q.dtype == torch.float64 else ENVELOPE_SLACK
            out = torch.log(f64(torch.linalg.vector_norm(q, dim=-1))) + slack
            inp = torch.log(f64(beta.abs()) * torch.sqrt(f64(kk))) + slack
            step = f64(g) + torch.log(torch.clamp(f64((1 - beta * kk).abs()), min=1.0)) + slack
        return out, inp, step

    def gram_bytes(self, n: int, grad: bool = False) -> int:
        """No buffer grows with ``L``: the ``P``, ``Q`` stacks and the ends' factors (``3 n N^2`` per matrix),
        the eigenproblems' groups (:data:`~esswatch.engine.gram_spectrum.GROUP_BYTES`, about twelve copies)
        and one segment's temporaries, in float64. With ``grad``, the graph keeps every segment's (about
        ``6 N^2 + 4 C N + 3 C^2`` values each, forward and reversed: ``2 (L / C + n)`` segments)."""
        per, N, C = 8 * self.numel_batch(), self.state_width, SEGMENT
        out = 3 * per * n * N * N + 12 * min(GROUP_BYTES, per * n * N * N) + per * (8 * N * N + 4 * C * (C + N))
        if grad:
            out += 2 * (self.seq_len // C + 1 + n) * per * (6 * N * N + 4 * C * N + 3 * C * C)
        return out

    def gram_spectrum(self, indices: torch.Tensor):
        """Every index, the ends included (:func:`esswatch.engine.delta_gram.delta_gram_squared_singular_values`)."""
        return delta_gram_squared_singular_values(self.q, self.k, self.beta, self.log_decay, indices)

    def normalized(self) -> "DeltaRule":
        s = matrix_scale(self.q, (-2, -1), squared=True)  # T is linear in q
        if s is None:
            return self
        return DeltaRule(self.q / s, self.k, self.beta, self.log_decay, value_dim=self.value_dim)

    def to(self, dtype=None, device=None) -> "DeltaRule":
        return self._rebuild(lambda x, core: x.to(dtype=dtype, device=device))

    def _rebuild(self, fn) -> "DeltaRule":
        q, k, beta, ld = (fn(x, c) for x, c in zip(self._tensors(), (2, 2, 1, 1)))
        return DeltaRule(q, k, beta, ld, value_dim=self.value_dim)
