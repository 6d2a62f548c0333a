"""``DeltaRule``: the gated delta rule (Gated DeltaNet, as in Qwen3-Next and Qwen3.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense import Dense

__all__ = ["DeltaRule", "delta_rule_dense"]


def _transition(x: torch.Tensor, k: torch.Tensor, bk: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """``B x = decay (x - bk (k . x))`` for the columns of ``x (..., N, m)`` (one step's transition)."""
    return decay[..., None, None] * (x - bk[..., :, None] * (k[..., None, :] @ x))


def delta_rule_dense(
    q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """The causal matrices ``(..., L, L)`` of the gated delta rule (see :class:`DeltaRule`), chunk by chunk.

    Column ``c`` starts as ``beta_c k_c`` at step ``c`` and is carried through the later steps' transitions
    ``B_s``; ``T[t, c] = q_t . x_c(t)``. Within a chunk of ``chunk`` positions the steps run one by one on
    at most ``chunk`` vectors. The columns of earlier chunks are carried across a chunk at once by its
    transition ``M = B_{s1-1} ... B_{s0}`` (an ``N x N`` matrix product), and their rows in the chunk are
    one product ``R X``, where row ``t`` of ``R`` is ``B_{s0} ... B_t q_t`` (each ``B_s`` is symmetric).
    So the ``O(L^2 N)`` work is matrix products; the Python steps are ``3 L``. No in-place writes
    (differentiable).
    """
    L, N = q.shape[-2:]
    batch = q.shape[:-2]
    bk = beta[..., None] * k
    decay = torch.exp(log_decay)
    carried = q.new_zeros(*batch, N, 0)  # the states of the columns of earlier chunks
    eye = torch.eye(N, dtype=q.dtype, device=q.device).expand(*batch, N, N)
    rows = []
    for s0 in range(0, L, chunk):
        s1 = min(s0 + chunk, L)
        kc, bkc, dc = k[..., s0:s1, :], bk[..., s0:s1, :], decay[..., s0:s1]
        # rows of R, built backwards: B_{s0+j} acts on the rows t >= s0 + j
        r = q[..., s0:s1, :].transpose(-1, -2)  # (..., N, C): one column per row t
        for j in range(s1 - s0 - 1, -1, -1):
            r = torch.cat([r[..., :j], _transition(r[..., j:], kc[..., j, :], bkc[..., j, :], dc[..., j])], dim=-1)
        past = r.transpose(-1, -2) @ carried  # (..., C, s0)
        # the chunk's own columns, step by step, and its transition M
        own, m, inner = q.new_zeros(*batch, N, 0), eye, []
        for j in range(s1 - s0):
            own = torch.cat([_transition(own, kc[..., j, :], bkc[..., j, :], dc[..., j]), bkc[..., j, :, None]], -1)
            m = _transition(m, kc[..., j, :], bkc[..., j, :], dc[..., j])
            inner.append(F.pad(q[..., s0 + j, None, :] @ own, (0, s1 - s0 - j - 1)))
        rows.append(F.pad(torch.cat([past, torch.cat(inner, dim=-2)], dim=-1), (0, L - s1)))
        carried = torch.cat([m @ carried, own], dim=-1)
    return torch.cat(rows, dim=-2)


class DeltaRule(Dense):
    """``T[t, c] = beta_c q_t^T B_t B_{t-1} ... B_{c+1} k_c`` for ``c <= t``, ``B_s = exp(g_s) (I - beta_s k_s k_s^T)``.

    The map from values to outputs of the gated delta rule ``S_t = B_t S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T q_t`` (a state ``S`` of ``N x value_dim`` per head), once ``q, k, beta`` and the decay
    ``g = log_decay`` are fixed. Unlike :class:`~esswatch.operators.GatedRecurrence` its transitions are not
    diagonal, so it is materialized (:func:`delta_rule_dense`) and handled as a :class:`Dense` operator.

    Args:
        q, k: ``(..., L, N)`` (the layer's scaled, normalized queries and keys).
        beta, log_decay: ``(..., L)``.
        value_dim: value channels sharing this operator (metadata for total ESS).

    Natural state size: ``N``.
    """

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
        q, k, beta, log_decay = (x.to(dtype) for x in (q, k, beta, log_decay))
        super().__init__(delta_rule_dense(q, k, beta, log_decay), state_size=int(q.shape[-1]), value_dim=value_dim)
