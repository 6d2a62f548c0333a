"""The chunked form of the Gramians ``P_i`` of a diagonal recurrence at many or all indices (see :mod:`.gram`'s
module doc): the recurrence ``P_{t+1} = D_t P_t D_t + k_t k_t^T`` in two levels, matmuls and sums inside chunks of
``C ~ sqrt(L)`` positions, one step per chunk between them.
"""

from __future__ import annotations

import torch

__all__ = ["CUMSUM_SPAN", "chunked_forward"]

#: the chunked form sums a chunk's outer products with one cumulative sum, weighted to the chunk's end and back,
#: where ``Lam`` spans at most this much inside every chunk: the weights and their products then stay within
#: ``exp(+-2 * 300)``, inside float64's range; stronger decays take one step per offset
CUMSUM_SPAN = 300.0


def chunked_forward(k, lam, idx, C, scale=None, descending=False):
    """``P_i`` for the sorted unique indices ``idx`` (ascending, or ``descending``) by chunks (see module doc),
    times ``scale`` (``(n, N|1)``, or ``None``) on both sides.

    Two levels of the recurrence ``P_{t+1} = D_t P_t D_t + k_t k_t^T``: inside every chunk (all chunks at once),
    then between chunks (one step per chunk: ``L / C`` steps). Inside a chunk the outer products are weighted to
    its end (factors ``<= 1``) and summed (a cumulative sum with a graph, in place without one), where ``Lam``
    spans at most :data:`CUMSUM_SPAN` in every chunk; then ``P_i = b (e A e + S) b`` with
    ``b = exp(Lam[i-1] - Lam[end]) >= 1`` and ``e = exp(Lam[end] - Lam[start - 1]) <= 1``. Stronger decays take
    one step per offset (every factor ``<= 1``).
    """
    *batch, L, N = k.shape
    nc = -(-L // C)
    pad = nc * C - L
    dev, dt = k.device, k.dtype
    kc = (torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k).reshape(*batch, nc, C, N)
    lamp = lc = None
    if lam is not None:
        # padded positions repeat the last Lam (no decay); they carry k = 0
        lamp = torch.cat([lam, lam[..., -1:, :].expand(*lam.shape[:-2], pad, lam.shape[-1])], dim=-2) if pad else lam
        lc = lamp.reshape(*batch, nc, C, lamp.shape[-1])
    m, jj = (idx - 1) // C, (idx - 1) % C
    if lam is None or float((lc.amax(dim=-2) - lc.amin(dim=-2)).amax().detach()) <= CUMSUM_SPAN:
        kw = kc if lam is None else kc * torch.exp(lc[..., C - 1 :, :] - lc)  # weighted to the chunks' ends
        graph = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (k, lam, scale))
        if graph:  # the outer products summed with the offsets last (a contiguous cumulative sum), then permuted
            x = kw.transpose(-1, -2).contiguous()
            S = torch.cumsum(x[..., :, None, :] * x[..., None, :, :], dim=-1)
            S = S.permute(*range(len(batch) + 1), -1, -3, -2).contiguous()  # batch + (nc, C, N, N)
        A = _anchors(S[..., :, C - 1, :, :] if graph else kw.transpose(-1, -2) @ kw, lamp, C, batch, N, dt, dev)
        b = scale
        if lam is not None:
            starts = torch.clamp(torch.arange(nc, device=dev) * C - 1, min=0)
            e = torch.exp(lc[..., :, C - 1, :] - lamp[..., starts, :])  # A[0] = 0 needs no weight
            A = A * (e[..., :, None] * e[..., None, :])
            b = torch.exp(lamp[..., idx - 1, :] - lc[..., m, C - 1, :])  # batch + (n, N|1)
            b = b if scale is None else b * scale
        if graph:
            return _scaled(S[..., m, jj, :, :] + A[..., m, :, :], b)
        # without a graph: the sums in place, and the indices read as a slice where they are consecutive
        # descending indices (Q's, in reversed time) as a slice too: the sums stored with positions reversed
        S = _offset_sums(kw, A, descending).reshape(*batch, nc * C, N, N)
        return _scaled(_rows(S, nc * C - idx if descending else idx - 1), b, inplace=True)
    # a decay too strong inside one chunk for those weights to stay in range: one step per offset
    step = torch.exp(lc[..., 1:, :] - lc[..., :-1, :])  # a at offsets 1..C-1 (<= 1)
    kk = kc[..., :, :, None] * kc[..., :, None, :]  # batch + (nc, C, N, N)
    parts = [kk[..., 0, :, :]]
    for j in range(1, C):
        a = step[..., j - 1, :]
        parts.append(parts[-1] * (a[..., :, None] * a[..., None, :]) + kk[..., j, :, :])
    S = torch.stack(parts, dim=-3)  # batch + (nc, C, N, N), to each offset
    A = _anchors(S[..., :, C - 1, :, :], lamp, C, batch, N, dt, dev)
    # P_i = D A[m] D + S[m][i-1-mC], m = (i-1) // C, D = exp(Lam[i-1] - Lam[mC-1])
    has = (m > 0).to(dt)
    g = torch.exp(lamp[..., idx - 1, :] - lamp[..., torch.clamp(m * C - 1, min=0), :])  # batch + (n, N|1)
    base = A[..., m, :, :] * (g[..., :, None] * g[..., None, :]) * has[:, None, None]
    return _scaled(S[..., m, jj, :, :] + base, scale)


def _rows(x, pos):
    """``x[..., pos, :, :]`` for ascending ``pos``, a slice where they are consecutive."""
    n = pos.numel()
    first, last = (int(v) for v in pos[[0, -1]].tolist())
    return x[..., first : first + n, :, :] if last - first + 1 == n else x[..., pos, :, :]


def _offset_sums(kw, A, rev=False):
    """``A[m] + sum_{c <= j} kw_c kw_c^T`` at every offset ``j`` of every chunk ``m``, batch + (nc, C, N, N), without
    a graph: the outer products, the anchors added at offset 0, then ``C - 1`` in-place additions of each offset
    to the next (on one CPU thread about 2.5x faster than a cumulative sum, which needs the offsets last and a
    transposed copy). ``rev``: stored with chunks and offsets reversed (flat position ``p`` at ``nc C - 1 - p``)."""
    kw, A = (kw.flip(-2, -3), A.flip(-3)) if rev else (kw, A)
    S = kw[..., :, None] * kw[..., None, :]
    C = S.shape[-3]
    S[..., C - 1 if rev else 0, :, :] += A
    v = S.flatten(-2)
    for j in range(C - 2, -1, -1) if rev else range(1, C):
        v[..., j, :].add_(v[..., j + 1 if rev else j - 1, :])
    return S


def _scaled(P, scale, inplace=False):
    """``diag(scale) P diag(scale)`` (``scale``: ``(..., n, N|1)`` or ``None``); ``inplace`` where ``P`` is the
    caller's own, without a graph."""
    if scale is None:
        return P
    if torch.is_grad_enabled() and (P.requires_grad or scale.requires_grad):
        return P * (scale[..., :, None] * scale[..., None, :])
    return (P.mul_(scale[..., :, None]) if inplace else P * scale[..., :, None]).mul_(scale[..., None, :])


def _anchors(ends, lamp, C, batch, N, dt, dev):
    """``A[m]`` = ``P`` at position ``mC`` from the chunk sums ``ends[m]`` (weighted to the chunk's end)."""
    anchors = [torch.zeros(*batch, N, N, dtype=dt, device=dev)]
    for m in range(1, ends.shape[-3]):
        prev = anchors[-1]
        if lamp is not None and m > 1:
            g = torch.exp(lamp[..., m * C - 1, :] - lamp[..., (m - 1) * C - 1, :])
            prev = prev * (g[..., :, None] * g[..., None, :])
        anchors.append(prev + ends[..., m - 1, :, :])
    return torch.stack(anchors, dim=-3)
