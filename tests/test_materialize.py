"""Materializing softmax attention and trimming its Hankel blocks, the cheap way, against the plain way.

* ``SoftmaxAttention._dense_part`` fills one fresh tensor in place (no clamp when the bound
  shows none is needed, in-place softmax without autograd): bit for bit the plain
  out-of-place formula below, values and gradients, for every mask kind and dtype.
* ``trim_by_extents`` (every block trimmed from one pass over ``T``) gives the very blocks of
  ``trim_zero_lines`` (shapes, values, views), whose singular values match NumPy's SVD of
  ``T[i:, :i]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esswatch.engine.exact import nonzero_extents, trim_by_extents, trim_zero_lines
from esswatch.ess.blocks import BlockCache
from esswatch.operators import SoftmaxAttention

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def plain_dense_part(op: SoftmaxAttention, rows: slice, cols: slice) -> torch.Tensor:
    """The out-of-place formula (every step a new tensor, always clamped): the reference."""
    out_dt = torch.float64 if op.q.dtype == torch.float64 else torch.float32
    dt = out_dt
    if dt == torch.float32:
        bound = op.q.detach().abs().amax().double() * op.k.detach().abs().amax().double()
        if float(bound * op.q.shape[-1] * abs(op.scale)) > 1e36:
            dt = torch.float64
    L = op.seq_len
    r_idx, c_idx = torch.arange(L)[rows], torch.arange(L)[cols]
    fmax = torch.finfo(dt).max
    scores = torch.clamp(
        (op.q[..., rows, :].to(dt) @ op.k[..., cols, :].to(dt).transpose(-1, -2)) * op.scale, -fmax, fmax
    )
    scores = scores.expand(*op.batch_shape, r_idx.numel(), c_idx.numel())
    diff = r_idx[:, None] - c_idx[None, :]
    ok = diff >= 0
    if op.window is not None:
        ok = ok & (diff < op.window)
    if op.mask is None:
        return torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).to(out_dt)
    mask = op.mask[..., rows, cols]
    if mask.dtype == torch.bool:
        ok = ok & mask
    else:
        scores = scores + mask.to(dt)
        ok = ok & torch.isfinite(mask)
    scores = scores.masked_fill(~ok, float("-inf"))
    row_has = torch.isfinite(scores).any(dim=-1, keepdim=True)
    scores = torch.where(row_has, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1)
    return torch.where(row_has & ok, probs, torch.zeros_like(probs)).to(out_dt)


def _attention_cases(L=37, dtype=torch.float32):
    q, k = _rand(2, 3, L, 8, seed=1, dtype=dtype), _rand(2, 3, L, 8, seed=2, dtype=dtype)
    bmask = torch.rand(2, 1, L, L, generator=torch.Generator().manual_seed(3)) > 0.6
    bmask[0, 0, 5] = False  # a row that can attend to nothing
    pad = torch.ones(2, 1, L, L, dtype=torch.bool)
    pad[1, ..., :, :7] = False  # left padding of the second sequence: its first 7 rows attend to nothing
    add = _rand(L, L, seed=4, dtype=dtype) * 3
    add[add < -2] = float("-inf")
    hf = torch.zeros(2, 1, L, L, dtype=dtype)
    hf[1, ..., :4] = torch.finfo(dtype).min  # the transformers padding convention: a finite minimum
    return {
        "causal": SoftmaxAttention(q, k),
        "window": SoftmaxAttention(q, k, window=6),
        "bool_mask": SoftmaxAttention(q, k, mask=bmask),
        "padding+window": SoftmaxAttention(q, k, window=9, mask=pad),
        "additive_-inf": SoftmaxAttention(q, k, mask=add),
        "additive_finfo_min": SoftmaxAttention(q, k, mask=hf),
        "mask_more_batch_dims": SoftmaxAttention(q[0], k[0], mask=bmask),
        "gqa_broadcast_k": SoftmaxAttention(q, k[:, :1], scale=0.3),
        "float64_scores": SoftmaxAttention(q * 1e19, k * 1e19),  # past float32's range (for float32 inputs)
        "negative_scale": SoftmaxAttention(q, k, scale=-2.0, window=4),
    }


def _assert_dense_and_parts_match(name, op):
    """``dense()`` and three row/column parts of ``op`` equal the plain formula bit for bit."""
    assert torch.equal(op.dense(), plain_dense_part(op, slice(None), slice(None))), name
    for rows, cols in ((slice(9, 30), slice(0, 30)), (slice(20, 37), slice(11, 37)), (slice(0, 1), slice(0, 1))):
        assert torch.equal(op._dense_part(rows, cols), plain_dense_part(op, rows, cols)), (name, rows, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_and_parts_equal_the_plain_formula_bit_for_bit(dtype):
    L = 37
    for name, op in _attention_cases(L, dtype).items():
        _assert_dense_and_parts_match(name, op)
        with torch.no_grad():  # the in-place softmax
            assert torch.equal(op.dense(), plain_dense_part(op, slice(None), slice(None))), name


@pytest.mark.parametrize("rows_per_fill", [1, 4, 7])
def test_forbidden_fill_by_row_blocks_equals_the_plain_formula(monkeypatch, rows_per_fill):
    """The forbidden scores are filled by blocks of rows (slice fills plus the bands causality and
    the window cut through a block): with blocks smaller than the operator, every block edge case
    (diagonal and window bands, narrowed rows and columns) gives the plain formula bit for bit."""
    from esswatch.operators import attention

    monkeypatch.setattr(attention, "_FILL_ROWS", rows_per_fill)
    L = 37
    for name, op in _attention_cases(L, torch.float32).items():
        _assert_dense_and_parts_match(name, op)
        for w in (1, 3, 12):
            win = SoftmaxAttention(op.q, op.k, scale=op.scale, window=w)
            assert torch.equal(win.dense(), plain_dense_part(win, slice(None), slice(None))), (name, w)
            assert torch.equal(win.block(slice(20, 33), slice(14, 30)), win.dense()[..., 20:33, 14:30]), (name, w)


def test_dense_gradients_equal_the_plain_formula():
    L = 23
    for name, op in _attention_cases(L, torch.float64).items():
        w = _rand(*op.batch_shape, L, L, seed=7)
        grads = []
        for fn in (lambda o: o.dense(), lambda o: plain_dense_part(o, slice(None), slice(None))):
            q, k = op.q.clone().requires_grad_(), op.k.clone().requires_grad_()
            o = SoftmaxAttention(q, k, scale=op.scale, window=op.window, mask=op.mask)
            t = fn(o)
            (t * w).sum().backward()
            grads.append((t.detach(), q.grad, k.grad))
        for a, b in zip(*grads):
            assert torch.equal(a, b), name


def test_non_finite_inputs_keep_the_clamp():
    q, k = _rand(1, 6, 4, seed=1, dtype=torch.float32), _rand(1, 6, 4, seed=2, dtype=torch.float32)
    for bad in (float("inf"), float("nan")):
        qb = q.clone()
        qb[0, 3, 1] = bad
        op = SoftmaxAttention(qb, k)
        torch.testing.assert_close(
            op.dense(), plain_dense_part(op, slice(None), slice(None)), rtol=0, atol=0, equal_nan=True
        )


def test_dense_matches_the_definition_in_float64():
    """Independent of the plain formula: softmax rows of the scores over the allowed columns."""
    L = 11
    q, k = _rand(3, L, 5, seed=5), _rand(3, L, 5, seed=6)
    op = SoftmaxAttention(q, k, window=4)
    s = (q @ k.transpose(-1, -2)).numpy() / math.sqrt(5)
    ref = np.zeros_like(s)
    for r in range(L):
        c = np.arange(max(0, r - 3), r + 1)
        e = np.exp(s[:, r, c] - s[:, r, c].max(-1, keepdims=True))
        ref[:, r, c] = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(op.dense().numpy(), ref, rtol=1e-13, atol=1e-15)


# -- trimming every block from one pass over T -------------------------------------------------


def _patterns(L=24):
    """Batched lower-triangular matrices with different zero patterns per batch entry."""
    g = torch.Generator().manual_seed(11)
    t = torch.tril(_rand(3, L, L, seed=12))
    rnd = t * (torch.rand(3, L, L, generator=g) > 0.7)  # random zeros, different per entry
    pad = t.clone()
    pad[0, :, :5] = 0  # left padding: columns (keys) 0..4 never attended, entry 0 only
    pad[1, 18:, :] = 0  # right padding: rows 18.. empty, entry 1 only
    r = torch.arange(L)
    win = t * ((r[:, None] - r[None, :]) < torch.tensor([3, 5, 8])[:, None, None])  # a window per head
    pad_all = t.clone()
    pad_all[..., :, :5] = 0  # keys 0..4 padded in every entry: every row's column 0 is zero
    pad_all[..., 20:, :] = 0  # queries 20.. padded in every entry: the last row is zero
    sparse = torch.zeros(3, L, L, dtype=F64)
    sparse[2, 20, 2] = 1.5  # one non-zero in one entry
    sparse[0, 9, 8] = -2.0
    return {
        "random": rnd,
        "padding": pad,
        "padding_in_every_entry": pad_all,
        "windows_per_head": win,
        "sparse": sparse,
        "all_zero": torch.zeros(3, L, L, dtype=F64),
        "dense_tril": t,
        "unbatched_random": rnd[1],
    }


def _same_block(a, b, base):
    assert a.shape == b.shape and torch.equal(a, b)
    shares = lambda x: x.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert shares(a) == shares(b)  # a view exactly when trim_zero_lines gives a view


def test_trim_by_extents_equals_trim_zero_lines_on_every_block():
    for name, t in _patterns().items():
        L = t.shape[-1]
        first, last = nonzero_extents(t)
        for i in range(1, L):
            ref = trim_zero_lines(t[..., i:, :i])
            got = trim_by_extents(t, slice(i, L), slice(0, i), first, last)
            _same_block(got, ref, t)
            sv = np.linalg.svd(t[..., i:, :i].numpy(), compute_uv=False)
            mine = torch.linalg.svdvals(got).numpy()
            k = mine.shape[-1]
            np.testing.assert_allclose(mine, sv[..., :k], atol=1e-12, err_msg=f"{name} {i}")
            assert np.all(sv[..., k:] < 1e-12), (name, i)  # the trimmed lines carried nothing


def test_trim_by_extents_on_narrowed_slices_including_undecidable_ones():
    for t in _patterns().values():
        L = t.shape[-1]
        first, last = nonzero_extents(t)
        for i in range(2, L - 2):
            for rows, cols in ((slice(i, min(L, i + 4)), slice(max(0, i - 4), i)), (slice(i, L - 1), slice(1, i))):
                _same_block(trim_by_extents(t, rows, cols, first, last), trim_zero_lines(t[..., rows, cols]), t)


def test_nonzero_extents_match_a_loop():
    for name, t in _patterns().items():
        nz = (t != 0).reshape(-1, *t.shape[-2:]).any(0).numpy()
        first, last = nonzero_extents(t)
        L = nz.shape[0]
        assert first.tolist() == [int(np.argmax(row)) if row.any() else L for row in nz], name
        assert last.tolist() == [int(L - 1 - np.argmax(col[::-1])) if col.any() else -1 for col in nz.T], name


@pytest.mark.parametrize("blocks", [None, 1])  # from the extents / one scan per block
def test_block_cache_trims_the_dense_operator_as_before(blocks):
    """Every Hankel block BlockCache hands out: the block trim_zero_lines gives for the same slices."""
    cases = _attention_cases(L=29, dtype=torch.float64)
    # a wide window: H_14 is not narrowed (T is materialized), H_28 then is (narrowed slices of the dense T)
    cases["wide_window"] = SoftmaxAttention(cases["causal"].q, cases["causal"].k, window=20)
    for name, op in cases.items():
        cache, T = BlockCache(op, blocks=blocks), op.dense()
        for i in (14, 28, 1, 4, 10, 17):
            rows, cols = op.hankel_support(i)
            narrowed = (rows.indices(29)[:2], cols.indices(29)[:2]) != ((i, 29), (0, i))
            h = cache.hankel(i)
            ref = trim_zero_lines(op.block(rows, cols) if narrowed and cache._dense is None else T[..., rows, cols])
            assert h.shape == ref.shape and torch.equal(h, ref), (name, i)
            sv = np.linalg.svd(T[..., i:, :i].numpy(), compute_uv=False)
            np.testing.assert_allclose(torch.linalg.svdvals(h).numpy(), sv[..., : min(h.shape[-2:])], atol=1e-12)
        assert (cache._extents is not None) == (blocks is None and cache._dense is not None), name


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _anon_huge_kb(addr: int) -> int:
    """``AnonHugePages`` (kB) of the mapping of this process that holds ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_large_cpu_buffers_are_backed_by_huge_pages():
    """``alloc.empty``: same shape and dtype as ``torch.empty``; on Linux with transparent huge pages
    available (``madvise`` or ``always``), the kernel's own accounting shows huge pages in a touched
    32 MiB buffer."""
    from esswatch.engine import alloc

    small = alloc.empty((3, 5), dtype=torch.float64, device=torch.device("cpu"))
    assert small.shape == (3, 5) and small.dtype == torch.float64
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages: {_thp_mode()}")
    buf = alloc.empty((4, 1024, 2048), dtype=torch.float32, device=torch.device("cpu"))
    buf.fill_(1.0)
    assert _anon_huge_kb(buf.data_ptr() + buf.numel() * 2) >= 2048


def test_dense_on_advised_buffers_equals_the_plain_formula(monkeypatch):
    """Every buffer advised (threshold 0): ``dense()`` still equals the plain formula bit for bit."""
    from esswatch.engine import alloc

    monkeypatch.setattr(alloc, "HUGE_MIN_BYTES", 0)
    for name, op in _attention_cases(37, torch.float32).items():
        with torch.no_grad():
            assert torch.equal(op.dense(), plain_dense_part(op, slice(None), slice(None))), name
