"""The fast engine paths against NumPy/torch SVDs of T[i:, :i] (float64).

Factored/chunked Gramians, duplicate and unsorted indices, trimmed exact SVDs (windows,
masks, padding, short kernels), the deflated SLQ and its calibration, and the RNG contract.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import entropy_ess_ref, hankel_sv, tolerance_ess_ref

import esswatch as ew
from esswatch.engine import adaptive
from esswatch.engine.exact import batched_svdvals, trim_zero_lines
from esswatch.engine.gram import gram_singular_values, gramian_form, gramians
from esswatch.engine.slq import slq_entropy
from esswatch.operators import Convolution, Dense, GatedRecurrence, SoftmaxAttention

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _decays(kind, B, L, N, seed, strength=1.0):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    width = N if kind == "full" else 1
    return -torch.rand(B, L, width, generator=g, dtype=F64) * strength


# -- Gramians: direct and chunked -----------------------------------------------------------


@pytest.mark.parametrize("decay", ["none", "full", "head"])
@pytest.mark.parametrize("method", ["direct", "few", "chunked"])
def test_gram_singular_values_match_numpy(decay, method):
    B, L, N = 2, 70, 5
    q, k = _rand(B, L, N, seed=1), _rand(B, L, N, seed=2)
    ld = _decays(decay, B, L, N, seed=3, strength=0.5)
    T = GatedRecurrence(q, k, ld).dense().numpy()
    idx = torch.tensor([5, 6, 31, 32, 33, 64, 65])  # across chunk boundaries (C = 8 here)
    sv, ok, fro2 = gram_singular_values(q, k, ld, idx, method=method)
    assert ok.all()
    for j, i in enumerate(idx.tolist()):
        ref = hankel_sv(T, i)[..., :N]
        np.testing.assert_allclose(sv[..., j, :].numpy(), ref, rtol=1e-6, atol=1e-8 * ref.max())
        np.testing.assert_allclose(fro2[..., j].numpy(), (T[..., i:, :i] ** 2).sum((-1, -2)), rtol=1e-10)


def test_gram_where_neither_gramian_factors_takes_their_square_roots(monkeypatch):
    """Decays that erase the state at positions 57 and 63 leave ``H_60`` of rank 3 < N from both sides, so
    neither Gramian factors (in exact arithmetic; round-off lets a Cholesky pass in one batch row). Without
    gradients the truncated square roots resolve it (``ok``), with NumPy's singular values and entropy-ESS;
    with gradients it is left unresolved and ``entropy_ess`` computes it from the window the two erasures
    confine it to (``esswatch.ess.near``), with the same value and a finite gradient, without ``T``."""
    from reference import gated_recurrence_loop

    B, L, N = 2, 120, 6
    q, k = _rand(B, L, N, seed=11), _rand(B, L, N, seed=12)
    ld = -0.3 * torch.rand(B, L, N, generator=torch.Generator().manual_seed(13), dtype=F64)
    ld[:, [57, 63], :] = -1000.0
    T = np.stack([gated_recurrence_loop(q[b].numpy(), k[b].numpy(), ld[b].numpy()) for b in range(B)])
    idx = torch.tensor([30, 60, 90])
    sv, ok, _ = gram_singular_values(q, k, ld, idx)
    assert ok.all()
    for j, i in enumerate(idx.tolist()):
        ref = hankel_sv(T, i)[..., :N]
        np.testing.assert_allclose(sv[..., j, :].numpy(), ref, rtol=1e-6, atol=1e-7 * ref.max())
    assert (hankel_sv(T, 60)[..., 3:N] < 1e-12).all()  # rank 3: the case this test is about
    want = entropy_ess_ref(T, idx.tolist())
    np.testing.assert_allclose(
        ew.entropy_ess(GatedRecurrence(q, k, ld), idx, estimator="gram").numpy(), want, rtol=1e-6
    )
    qg = q.clone().requires_grad_()
    assert not gram_singular_values(qg, k, ld, idx)[1][..., 1].all()  # a Cholesky may still pass on round-off
    monkeypatch.setattr(GatedRecurrence, "dense", lambda self: pytest.fail("T materialized"))
    e = ew.entropy_ess(GatedRecurrence(qg, k, ld), idx, estimator="gram")
    np.testing.assert_allclose(e.detach().numpy(), want, rtol=1e-6)
    e.sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_gram_direct_and_chunked_agree_with_strong_and_vanishing_decays():
    B, L, N = 2, 200, 4
    q, k = _rand(B, L, N, seed=4), _rand(B, L, N, seed=5)
    ld = _decays("full", B, L, N, seed=6, strength=30.0)  # many products underflow to 0
    ld[:, 50] = -1e6  # a decay of (numerically) zero
    idx = torch.arange(1, L)
    P1, Q1 = gramians(q, k, ld, idx, "direct")
    P2, Q2 = gramians(q, k, ld, idx, "chunked")
    assert torch.isfinite(P1).all() and torch.isfinite(Q1).all()
    np.testing.assert_allclose(P1.numpy(), P2.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Q1.numpy(), Q2.numpy(), rtol=1e-10, atol=1e-12)
    T = GatedRecurrence(q, k, ld).dense().numpy()
    e = ew.entropy_ess(GatedRecurrence(q, k, ld), list(range(1, L, 7)), estimator="gram")
    np.testing.assert_allclose(e.numpy(), entropy_ess_ref(T, range(1, L, 7)), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("decay", ["full", "head"])
def test_gram_chunked_cumulative_sums_with_strong_decays_in_range(decay):
    """Decays up to 30 per step span about 250 inside a chunk (C = 14), just below ``CUMSUM_SPAN``: the chunked
    form takes its one cumulative sum, weighted to each chunk's end and back (factors down to ``exp(-250)`` and up
    to ``exp(250)``), and must agree with the direct form, whose factors are all ``<= 1``."""
    from esswatch.engine.gram_chunked import CUMSUM_SPAN

    B, L, N = 2, 203, 4
    q, k = _rand(B, L, N, seed=31), _rand(B, L, N, seed=32)
    ld = _decays(decay, B, L, N, seed=33, strength=30.0)
    C = round(L**0.5)
    lam = torch.cumsum(ld, dim=-2)
    span = max(
        float((lam[..., s : s + C, :].amax(-2) - lam[..., s : s + C, :].amin(-2)).amax()) for s in range(0, L, C)
    )
    assert 200 < span <= CUMSUM_SPAN  # the case this test is about
    idx = torch.arange(1, L)
    P1, Q1 = gramians(q, k, ld, idx, "direct")
    P2, Q2 = gramians(q, k, ld, idx, "chunked")
    for a, b in ((P1, P2), (Q1, Q2)):
        assert torch.isfinite(b).all()
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decay", ["none", "full", "head"])
def test_gram_few_indices_by_segments_match_the_all_offsets_path(decay):
    """A few indices (n C <= L) take the segments between them (``"few"``); they must give the same Gramians as
    the chunked form's all-offsets path and the direct form, with strong and zero decays."""
    B, L, N = 3, 203, 5  # C = 14: positions 13, 14, 15 straddle a chunk boundary
    q, k = _rand(B, L, N, seed=21), _rand(B, L, N, seed=22)
    ld = _decays(decay, B, L, N, seed=23, strength=30.0)
    if ld is not None:
        ld[:, 60] = -1e6  # a decay of (numerically) zero
    few = torch.tensor([1, 13, 14, 15, 61, 100, 202])
    assert few.numel() * round(L**0.5) <= L
    P1, Q1 = gramians(q, k, ld, few, "few")
    assert gramian_form(few.numel(), L, N, 10**4)[0] == "few"  # what "auto" takes for a large batch
    P2, Q2 = gramians(q, k, ld, torch.arange(1, L), "chunked")
    P3, Q3 = gramians(q, k, ld, few, "direct")
    for a, b in ((P1, P2[..., few - 1, :, :]), (Q1, Q2[..., few - 1, :, :]), (P1, P3), (Q1, Q3)):
        assert torch.isfinite(a).all()
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decay", ["none", "full", "head", "shared"])
def test_gram_segments_in_place_match_the_graph_and_leave_the_inputs_alone(decay):
    """Without a graph the segments form their weights and weighted factors in place, in buffers of the longest
    segment, from each segment's own sums of ``log_decay``; with one, out of place from ``Lam``. Both must give
    the direct form's Gramians, in float32 and in float64 (where a conversion would alias the input), with a
    decay per channel, per head, or shared across the batch (broadcast), and must not change ``q``, ``k`` or
    ``log_decay``."""
    L, N = 203, 4
    few = torch.tensor([1, 2, 30, 31, 120, 202])  # segments of 1 to 89 positions
    for dtype in (torch.float32, torch.float64):
        q, k = _rand(2, 3, L, N, seed=51).to(dtype), _rand(2, 3, L, N, seed=52).to(dtype)
        if decay == "none":
            ld = None
        elif decay == "shared":  # one decay for both rows of the batch: (3, L, N) against (2, 3, L, N)
            ld = _decays("full", 3, L, N, seed=53, strength=2.0).to(dtype)
        else:
            ld = _decays(decay, 6, L, N, seed=53, strength=2.0).reshape(2, 3, L, -1).to(dtype)
        before = [None if x is None else x.clone() for x in (q, k, ld)]
        P1, Q1 = gramians(q, k, ld, few, "few")
        for x, b in zip((q, k, ld), before):
            assert x is None or torch.equal(x, b)
        P2, Q2 = gramians(q.double(), k.double(), None if ld is None else ld.double(), few, "direct")
        leaves = [x.clone().requires_grad_(True) for x in (q, k)]
        P3, Q3 = gramians(*leaves, ld, few, "few")
        assert P3.requires_grad and Q3.requires_grad
        for a, b in ((P1, P2), (Q1, Q2), (P1, P3.detach()), (Q1, Q3.detach())):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decay", ["none", "full", "head"])
def test_gram_chunked_sums_in_place_match_the_direct_form_and_the_graph(decay):
    """Without a graph the chunked form sums each chunk in place, and stores ``Q``'s reversed-time sums with
    positions reversed, so that its descending indices read as a slice. Two batch dimensions, all indices
    (slices) and scattered ones (gathers, ``n C > L``): the direct form's Gramians, and those of the graph's
    path (a cumulative sum) to round-off."""
    L, N = 203, 4  # C = 14, 15 chunks with a padded tail
    q, k = _rand(2, 3, L, N, seed=41), _rand(2, 3, L, N, seed=42)
    ld = None if decay == "none" else _decays(decay, 6, L, N, seed=43, strength=2.0).reshape(2, 3, L, -1)
    for idx in (torch.arange(1, L), torch.tensor([1, 2, 14, 15, 16, 40, 41, 77, 99, 150, 151, 170, 200, 201, 202, 99])):
        idx = torch.unique(idx)
        assert idx.numel() * round(L**0.5) > L  # the all-offsets path
        P1, Q1 = gramians(q, k, ld, idx, "chunked")
        P2, Q2 = gramians(q, k, ld, idx, "direct")
        leaves = [x.clone().requires_grad_(True) for x in (q, k)]
        P3, Q3 = gramians(*leaves, ld, idx, "chunked")
        assert P3.requires_grad and Q3.requires_grad
        for a, b in ((P1, P2), (Q1, Q2), (P1, P3.detach()), (Q1, Q3.detach())):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


def test_gram_all_indices_long_sequence_matches_exact():
    B, L, N = 2, 300, 6
    q, k = _rand(B, L, N, seed=7), _rand(B, L, N, seed=8)
    ld = torch.nn.functional.logsigmoid(_rand(B, L, N, seed=9) + 3)
    op = GatedRecurrence(q, k, ld)
    e = ew.entropy_ess(op, estimator="gram")  # all indices: the chunked form
    idx = [1, 5, 6, 7, 100, 150, 293, 294, 299]
    np.testing.assert_allclose(
        e[..., [i - 1 for i in idx]].numpy(), entropy_ess_ref(op.dense().numpy(), idx), rtol=1e-5, atol=1e-9
    )


@pytest.mark.parametrize("method", ["direct", "few", "chunked"])
def test_gradcheck_gram_factored(method):
    L, N = 11, 2
    q = _rand(1, L, N, seed=1).requires_grad_()
    k = _rand(1, L, N, seed=2).requires_grad_()
    ld = (-torch.rand(1, L, N, generator=torch.Generator().manual_seed(3), dtype=F64) - 0.1).requires_grad_()
    idx = torch.tensor([3, 5, 8])

    def f(q, k, ld):
        sv, _, _ = gram_singular_values(q, k, ld, idx, method=method)
        return ew.engine.entropy_from_singular_values(sv)

    torch.autograd.gradcheck(f, (q, k, ld))
    # through the public API, all indices (the chunked form), gradients finite
    e = ew.entropy_ess(GatedRecurrence(q, k, ld), estimator="gram").sum()
    grads = torch.autograd.grad(e, (q, k, ld))
    assert all(torch.isfinite(g).all() for g in grads)


# -- duplicate and unsorted indices (issue 11 item 7) ------------------------------------------


@pytest.mark.parametrize("estimator", ["gram", "auto", "exact", "randomized"])
def test_duplicate_and_unsorted_indices(estimator):
    L = 40
    op = GatedRecurrence(_rand(2, L, 3, seed=1), _rand(2, L, 3, seed=2), _decays("full", 2, L, 3, seed=3))
    idx = [17, 3, 17, 30, 1, 3, 39, 17]
    ref = entropy_ess_ref(op.dense().numpy(), idx)
    e = ew.entropy_ess(op, idx, estimator=estimator)
    assert e.shape == (2, len(idx))
    np.testing.assert_allclose(e.numpy(), ref, rtol=1e-5 if estimator != "randomized" else 0.02, atol=1e-9)
    if estimator != "randomized":
        t = ew.tolerance_ess(op, idx, estimator=estimator, tol=1e-6)
        np.testing.assert_allclose(t.numpy(), tolerance_ess_ref(op.dense().numpy(), idx, 1e-6, True))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("relative, tol", [(True, 1e-3), (True, 1e-6), (False, 1e-2)])
def test_tolerance_ess_randomized_counts_match_numpy(dtype, relative, tol):
    """``tolerance_ess(estimator="randomized")`` counts exactly: a low-rank gated recurrence (the sketches
    resolve it), causal softmax attention (a long spectrum: the fallback to an exact SVD) and a decaying
    long convolution, blocks from 64 to 128 wide, against a NumPy SVD of the float64 blocks."""
    L, idx = 256, [64, 128, 200]
    gates = _decays("full", 2, L, 8, seed=3, strength=0.05)
    ops = [
        GatedRecurrence(_rand(2, L, 8, seed=1), _rand(2, L, 8, seed=2), gates),
        SoftmaxAttention(_rand(2, L, 8, seed=4), _rand(2, L, 8, seed=5)),
        Convolution(_rand(2, L, seed=6) * torch.exp(-torch.arange(L, dtype=F64) / 12)),
    ]
    for op in ops:
        op = op.to(dtype)
        T = op.dense().double().numpy()
        got = ew.tolerance_ess(op, idx, estimator="randomized", tol=tol, relative=relative).numpy()
        np.testing.assert_array_equal(got, tolerance_ess_ref(T, idx, tol, relative), err_msg=type(op).__name__)


def test_duplicate_indices_softmax_with_randomized_entries():
    L = 200
    op = SoftmaxAttention(_rand(2, L, 8, seed=1), _rand(2, L, 8, seed=2))
    idx = [100, 5, 100, 150, 5]
    e = ew.entropy_ess(op, idx)
    ref = entropy_ess_ref(op.dense().numpy(), idx)
    np.testing.assert_allclose(e.numpy(), ref, rtol=0.02)
    assert torch.equal(e[:, 0], e[:, 2]) and torch.equal(e[:, 1], e[:, 4])


# -- trimmed exact SVDs ----------------------------------------------------------------------


def test_trim_zero_lines_keeps_singular_values():
    h = torch.zeros(3, 20, 12, dtype=F64)
    h[:, 4:9, 2:7] = _rand(3, 5, 5, seed=1)
    h[1, 15, 0] = 2.0  # a non-zero in one batch entry keeps its line
    t = trim_zero_lines(h)
    assert t.shape[-2:] == (6, 6)
    full = torch.linalg.svdvals(h)
    np.testing.assert_allclose(torch.linalg.svdvals(t).numpy(), full[..., :6].numpy(), atol=1e-12)
    assert torch.equal(trim_zero_lines(torch.zeros(2, 5, 4)), torch.zeros(2, 1, 1))
    # batched, oriented: same values as one call per block
    blocks = [_rand(2, 9, 4, seed=2), _rand(2, 4, 9, seed=3), _rand(2, 9, 4, seed=4)]
    for b, sv in zip(blocks, batched_svdvals(blocks)):
        np.testing.assert_allclose(sv.numpy(), torch.linalg.svdvals(b).numpy(), rtol=1e-12)


@pytest.mark.parametrize("case", ["window", "window_mask", "padding_mask", "short_kernel", "dense_zero_rows"])
def test_trimmed_exact_matches_numpy(case):
    L = 48
    q, k = _rand(2, L, 4, seed=1), _rand(2, L, 4, seed=2)
    if case == "window":
        op = SoftmaxAttention(q, k, window=6)
    elif case == "window_mask":
        op = SoftmaxAttention(q, k, window=9, mask=torch.rand(L, L, generator=torch.Generator().manual_seed(3)) > 0.3)
    elif case == "padding_mask":
        keep = torch.ones(2, 1, L, dtype=torch.bool)
        keep[0, :, 30:] = False  # right padding in batch row 0 ...
        keep[:, :, :4] = False  # ... and 4 masked prefix positions in both
        op = SoftmaxAttention(q, k, mask=keep.expand(2, L, L))
    elif case == "short_kernel":
        h = torch.zeros(3, L, dtype=F64)
        h[:, :5] = _rand(3, 5, seed=4)
        op = Convolution(h)
    else:
        T = torch.tril(_rand(2, L, L, seed=5))
        T[:, 20:26, :] = 0
        T[:, :, 10:14] = 0
        op = Dense(T)
    T = op.dense().numpy()
    idx = list(range(1, L))
    ref = entropy_ess_ref(T, idx)
    for est in ("exact", "auto"):
        np.testing.assert_allclose(ew.entropy_ess(op, idx, estimator=est).numpy(), ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        ew.tolerance_ess(op, idx, estimator="exact").numpy(), tolerance_ess_ref(T, idx, 1e-3, True)
    )


def test_structured_blocks_equal_dense_slices():
    L = 30
    q, k = _rand(2, L, 3, seed=1), _rand(2, L, 3, seed=2)
    mask = _rand(L, L, seed=3)
    ops = [
        SoftmaxAttention(q, k),
        SoftmaxAttention(q, k, window=5),
        SoftmaxAttention(q, k, window=7, mask=mask),
        SoftmaxAttention(q, k, mask=mask > 0),
        Convolution(_rand(2, L, seed=4)),
        GatedRecurrence(q, k, _decays("full", 2, L, 3, seed=5)),
    ]
    for op in ops:
        T = op.dense()
        for rows, cols in [(slice(10, 16), slice(4, 10)), (slice(0, L), slice(0, 3)), (slice(25, L), slice(20, 25))]:
            np.testing.assert_allclose(op.block(rows, cols).numpy(), T[..., rows, cols].numpy(), atol=1e-14)
        for i in (1, 7, 15, 29):
            rows, cols = op.hankel_support(i)
            outside = T[..., i:, :i].clone()
            outside[..., rows.start - i : rows.stop - i, cols] = 0
            assert bool((outside == 0).all()), type(op).__name__


def test_sliding_window_support_is_at_most_w():
    op = SoftmaxAttention(_rand(1, 100, 4, seed=1), _rand(1, 100, 4, seed=2), window=8)
    rows, cols = op.hankel_support(50)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (7, 7)


# -- the deflated SLQ --------------------------------------------------------------------------


def _flat_tail_attention(L, heads=4, noise=0.05, seed=0, d=16, sharp=4.0, clusters=4):
    """Low-ESS attention with a long flat tail: clustered queries and keys plus small noise."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, clusters, d, generator=g, dtype=F64)
    h = torch.arange(heads)[:, None]
    k = centers[h, torch.randint(0, clusters, (heads, L), generator=g)] + noise * torch.randn(
        heads, L, d, generator=g, dtype=F64
    )
    q = centers[h, torch.randint(0, clusters, (heads, L), generator=g)] + noise * torch.randn(
        heads, L, d, generator=g, dtype=F64
    )
    return SoftmaxAttention(q * sharp, k)


def test_slq_entropy_against_svd_on_flat_tail():
    op = _flat_tail_attention(512)
    h = op.dense()[..., 256:, :256]
    ex = entropy_ess_ref(op.dense().numpy(), [256])[..., 0]
    est, half_gap, se, t, fro2 = slq_entropy(h, 32, torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(h)
    assert (t <= s[..., :32] * (1 + 1e-9)).all()  # interlacing: t_j <= s_j
    np.testing.assert_allclose(fro2.numpy(), (h**2).sum((-1, -2)).numpy(), rtol=1e-12)
    err = np.abs(est.numpy() - ex) / ex
    assert (err <= half_gap.numpy() + 3 * se.numpy() + 1e-3).all(), (err, half_gap, se)
    assert (err < 0.02).all()


@pytest.fixture
def small_slq(monkeypatch):
    """The SLQ normally starts at blocks of 384 x 384; let it run at test sizes."""
    monkeypatch.setattr(adaptive, "SLQ_MIN_SIZE", 96)


def test_randomized_uses_slq_on_flat_tail_and_keeps_bounds(small_slq):
    op = _flat_tail_attention(512)
    idx = [160, 256, 350]
    ref = entropy_ess_ref(op.dense().numpy(), idx)
    e, lo, hi = ew.entropy_ess(op, idx, estimator="randomized", rtol=0.02, return_bounds=True)
    assert np.all(lo.numpy() <= ref * (1 + 1e-9)) and np.all(hi.numpy() >= ref * (1 - 1e-9))
    assert np.all((lo <= e).numpy() & (e <= hi).numpy())
    slq = (hi / lo > 1.02**2 + 1e-9).numpy()  # bounds did not close: the SLQ was accepted
    assert slq.sum() >= 6, (lo, hi)
    assert np.all(np.abs(e.numpy() - ref) <= 0.02 * ref)


def test_no_quadrature_below_the_calibrated_rtol():
    """Below rtol = 0.02 (where the quadrature's confidence is calibrated; its float32 bias of about 1% took up
    a smaller rtol whole) the entries the bounds leave open are exact: every estimate within rtol of NumPy,
    and each entry's bounds either closed or equal to it. At 0.02 the same blocks go to the quadrature."""
    op = _flat_tail_attention(512)
    idx = [160, 256, 350]
    ref = entropy_ess_ref(op.dense().numpy(), idx)
    _, lo, hi = ew.entropy_ess(op, idx, estimator="randomized", rtol=0.02, return_bounds=True)
    assert (hi / lo > 1.02**2 + 1e-9).sum() >= 4  # the premise: the quadrature answers these at 0.02
    for rtol in (0.01, 0.005):
        e, lo, hi = (x.numpy() for x in ew.entropy_ess(op, idx, estimator="randomized", rtol=rtol, return_bounds=True))
        assert np.all(np.abs(e - ref) <= rtol * ref)
        assert np.all((hi / lo <= (1 + rtol) ** 2 + 1e-9) | (lo == hi)), (rtol, lo, hi)


def test_slq_calibration(small_slq):
    """>= 80 seeded trials across operator types: the miss rate stays at or under the stated 5%."""
    rtol = 0.02
    trials = misses = via_slq = 0
    L = 384
    g = torch.Generator().manual_seed(11)
    ops = []
    for seed in range(3):
        ops.append(_flat_tail_attention(L, seed=seed))  # low ESS, flat tail
        ops.append(_flat_tail_attention(L, seed=seed + 10, noise=0.1))  # a longer tail
    ops.append(
        SoftmaxAttention(torch.randn(4, L, 16, generator=g, dtype=F64), torch.randn(4, L, 16, generator=g, dtype=F64))
    )  # random attention
    kernel = torch.randn(4, L, generator=g, dtype=F64) * torch.exp(-torch.arange(L, dtype=F64) / (L / 8))
    ops.append(Convolution(kernel))  # long convolution
    ops.append(Dense(torch.tril(torch.randn(4, L, L, generator=g, dtype=F64))))  # random dense causal
    for j, op in enumerate(ops):
        idx = [128, 192, 256]
        ref = entropy_ess_ref(op.dense().numpy(), idx)
        e, lo, hi = ew.entropy_ess(
            op,
            idx,
            estimator="randomized",
            rtol=rtol,
            return_bounds=True,
            generator=torch.Generator().manual_seed(100 + j),
        )
        e, lo, hi = e.numpy(), lo.numpy(), hi.numpy()
        assert np.all(lo <= ref * (1 + 1e-9)) and np.all(hi >= ref * (1 - 1e-9))
        trials += ref.size
        misses += int((np.abs(e - ref) > rtol * ref).sum())
        via_slq += int((hi / lo > (1 + rtol) ** 2 + 1e-9).sum())
    assert trials >= 80
    assert via_slq >= 30, via_slq  # the calibration really exercises the SLQ
    assert misses / trials <= 0.05, (misses, trials)


def _attention_at_init(L, d, scale, seed, heads=4, dtype=F64):
    """Near-uniform attention as at initialisation: small queries and keys (a value near s_1, a band
    of about d values, then a long tail)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(heads, L, d, generator=g, dtype=F64) for _ in range(2))
    return SoftmaxAttention(q.to(dtype), k.to(dtype))


def test_second_try_answers_attention_at_initialisation(monkeypatch):
    """Attention at initialisation (head dimension 64) at the default sizes: the rank-16 quadrature
    cannot pass (the d-value band sits in its tail), the rank-128 second try does, within rtol of a
    NumPy SVD; without the second try the same entries are computed exactly."""
    L, idx, rtol = 1400, [660, 740], 0.02
    op = _attention_at_init(L, 64, 0.3, seed=3, heads=2, dtype=torch.float32)
    ref = entropy_ess_ref(op.dense().double().numpy(), idx)
    e, lo, hi = (x.double().numpy() for x in ew.entropy_ess(op, idx, estimator="randomized", return_bounds=True))
    assert np.all(np.abs(e - ref) <= rtol * ref), (e, ref)
    assert np.all(lo <= ref * (1 + 1e-5)) and np.all(hi >= ref * (1 - 1e-5))
    assert np.all(lo < hi)  # not computed exactly: the quadrature answered
    monkeypatch.setattr(adaptive, "SLQ_RETRY_MIN_SIZE", 10**9)
    e0, lo0, hi0 = ew.entropy_ess(op, idx, estimator="randomized", return_bounds=True)
    assert torch.equal(lo0, hi0)  # the first try alone gives these entries up to exact SVDs
    assert np.allclose(e0.double().numpy(), ref, rtol=1e-5)


def test_second_try_rank_grows_with_the_first_estimate(monkeypatch):
    """The second try's deflation rank doubles from 128 while the first estimate is above 1.5 times
    it (up to p / 3); hopeless entries (above 3 times the largest rank) do not raise it. At the
    default sizes an ESS-300 head is answered by the rank-256 try within rtol of a NumPy SVD."""
    r = adaptive._retry_rank
    t = lambda *v: torch.tensor(v, dtype=F64)
    assert r(t(150.0), 600) == 0  # below SLQ_RETRY_MIN_SIZE
    assert r(t(185.0), 1365) == 128
    assert r(t(230.0), 1820) == 256
    assert r(t(260.0), 910) == 256
    assert r(t(260.0), 700) == 128  # 256 > 700 / 3
    assert r(t(480.0), 1820) == 512  # GPT-2-shaped attention at initialisation, L = 4096
    assert r(t(480.0), 1500) == 256  # 512 > 1500 / 3
    assert r(t(500.0), 4096) == 512
    assert r(t(150.0, 5000.0), 4096) == 128  # 5000 > 3 * 1024: left to its exact SVD
    assert r(t(float("nan")), 1024) == 128
    used = []
    orig = adaptive._slq_try

    def spy(h, fro2, stop, generator, k, basis=None):
        out = orig(h, fro2, stop, generator, k, basis)
        used.append((k, out[3].tolist()))
        return out

    monkeypatch.setattr(adaptive, "_slq_try", spy)
    op = _attention_at_init(2048, 64, 0.7, seed=5, heads=1, dtype=torch.float32)
    ref = entropy_ess_ref(op.dense().double().numpy(), [1024])
    e, lo, hi = (x.double().numpy() for x in ew.entropy_ess(op, [1024], estimator="randomized", return_bounds=True))
    assert 250 < ref[0, 0] < 400
    assert used == [(256, [True])]  # the first quadrature is only a scout here (test_scout_...)
    assert abs(e[0, 0] - ref[0, 0]) <= 0.02 * ref[0, 0] and lo[0, 0] <= ref[0, 0] * (1 + 1e-5) <= hi[0, 0] * (1 + 2e-5)


class _QuadratureSpy:
    """Records the adaptive estimator's quadrature runs, ``calls``: ``(rank, steps, stop given)``, and its
    tries with the acceptance test, ``tries``: ``(deflation rank, own basis, accepted per entry)``."""

    def __init__(self, monkeypatch):
        self.calls, self.tries = [], []
        slq, try_ = adaptive.slq_entropy, adaptive._slq_try

        def spy(h, k, generator, **kw):
            self.calls.append((k, kw.get("steps"), kw.get("stop") is not None))
            return slq(h, k, generator, **kw)

        def spy_try(h, fro2, stop, generator, k, basis=None):
            out = try_(h, fro2, stop, generator, k, basis)
            self.tries.append((k if basis is None else basis.shape[-1], basis is None, out[3].tolist()))
            return out

        monkeypatch.setattr(adaptive, "slq_entropy", spy)
        monkeypatch.setattr(adaptive, "_slq_try", spy_try)


@pytest.mark.parametrize("seed", [0, 1])
def test_scout_replaces_a_first_quadrature_that_cannot_pass(monkeypatch, seed):
    """Attention at initialisation (pilot ratio far above SLQ_SCOUT_RATIO, a tail that is not flat): with a
    second try possible (p >= 640) the first quadrature is a SLQ_SCOUT_STEPS-step run without acceptance,
    then the second try at the rank the full first try picks too; below 640 the block goes to exact at
    once. With the scout off the first try runs and is rejected everywhere. Values against NumPy."""
    op = _attention_at_init(2048, 64, 0.3, seed=seed, heads=2, dtype=torch.float32)
    idx = [500, 1024]  # p = 500 (no second try) and p = 1024
    ref = entropy_ess_ref(op.dense().double().numpy(), idx)
    results, spy, cut = {}, _QuadratureSpy(monkeypatch), adaptive.SLQ_SCOUT_RATIO
    # the rank-64 first try runs up to SLQ_SCOUT_RATIO: off here, so that "scout off" is the rank-16 first try
    monkeypatch.setattr(adaptive, "SLQ_WIDE_RATIO", math.inf)
    for scout in (True, False):
        monkeypatch.setattr(adaptive, "SLQ_SCOUT_RATIO", cut if scout else math.inf)
        spy.calls = []
        e, lo, hi = (x.double().numpy() for x in ew.entropy_ess(op, idx, estimator="randomized", return_bounds=True))
        results[scout] = (spy.calls, e)
        assert np.all(lo <= ref * (1 + 1e-5)) and np.all(hi >= ref * (1 - 1e-5))
        assert np.all(np.abs(e - ref) <= 0.02 * ref)
        np.testing.assert_allclose(e[:, 0], ref[:, 0], rtol=1e-5)  # p = 500: exact
    scout_calls, off_calls = results[True][0], results[False][0]
    steps = adaptive.SLQ_SCOUT_STEPS
    # (rank, steps: None = all SLQ_STEPS with checks, acceptance test given)
    assert scout_calls == [(adaptive.SLQ_RANK, steps, False), (128, None, True)]
    assert off_calls == [(adaptive.SLQ_RANK, None, True)] * 2 + [(128, None, True)]


def test_a_flat_tail_with_a_large_pilot_ratio_keeps_its_first_quadrature(monkeypatch):
    """A random dense causal matrix: a pilot ratio far above SLQ_SCOUT_RATIO, but a flat tail (the pilot's
    test), where the first quadrature does pass: it runs, and answers within rtol of NumPy."""
    g = torch.Generator().manual_seed(0)
    op = Dense(torch.tril(torch.randn(2, 1024, 1024, generator=g)))
    ref = entropy_ess_ref(op.dense().numpy(), [512])
    spy = _QuadratureSpy(monkeypatch)
    ratios = _LadderSpy(monkeypatch)
    e, lo, hi = (x.double().numpy() for x in ew.entropy_ess(op, [512], estimator="randomized", return_bounds=True))
    assert ratios.calls[1][1] > adaptive.SLQ_SCOUT_RATIO
    assert spy.calls[0] == (adaptive.SLQ_RANK, None, True)
    assert np.all(hi / lo > 1.02**2) and np.all(np.abs(e - ref) <= 0.02 * ref)


def test_a_band_above_the_tail_gets_a_rank64_first_quadrature(monkeypatch):
    """Clustered attention with more noise (a band of about clusters x d values above the flat tail): a pilot
    ratio between SLQ_WIDE_RATIO and SLQ_SCOUT_RATIO, a tail that is not flat. The first quadrature deflates
    at rank 64 by its own subspace iteration, accepts every head and answers within rtol of NumPy; with the
    rule off (the previous route) the pilot's rank-16 basis is tried first. Both inside the exact bounds."""
    op = _flat_tail_attention(2048, heads=2, noise=0.07, seed=0).to(dtype=torch.float32)
    ref = entropy_ess_ref(op.dense().double().numpy(), [695])
    cut, calls, est, spy = adaptive.SLQ_WIDE_RATIO, {}, {}, _QuadratureSpy(monkeypatch)
    for wide in (cut, math.inf):
        spy.tries = []
        monkeypatch.setattr(adaptive, "SLQ_WIDE_RATIO", wide)
        gen = torch.Generator().manual_seed(0)
        out = ew.entropy_ess(op, [695], estimator="randomized", return_bounds=True, generator=gen)
        e, lo, hi = (x.double().numpy() for x in out)
        assert np.all(lo <= ref * (1 + 1e-5)) and np.all(hi >= ref * (1 - 1e-5)) and np.all(hi / lo > 1.02**2)
        calls[wide], est[wide] = spy.tries, e
    assert calls[cut] == [(adaptive.SLQ_WIDE_RANK, True, [True, True])]
    assert np.all(np.abs(est[cut] - ref) <= 0.02 * ref)
    assert calls[math.inf][0][:2] == (adaptive.SKETCH_PILOT_RANK, False)


def test_tail_energy_of_a_float32_block_with_a_tiny_remainder():
    """The control variate's mean, the tail's energy after deflation: on a float32 block whose rank-128
    deflation leaves about 1e-8 of the energy, ``1 - ||h V||^2 / ||h||^2`` is float32 round-off, and
    ``slq._tail_energy`` forms the remainder instead. Against the same block in float64."""
    from esswatch.engine import slq

    op = _flat_tail_attention(2048, heads=2, noise=0.07, seed=0).to(dtype=torch.float32)
    h = op.dense()[..., 695:, :695]
    h64 = h.double()
    V64 = torch.linalg.svd(h64, full_matrices=False).Vh[..., :128, :].mT  # the top right subspace
    ref = ((h64 - h64 @ V64 @ V64.mT) ** 2).sum((-1, -2)) / (h64**2).sum((-1, -2))
    V = V64.float()
    hv = h @ V
    t, fro2 = torch.linalg.svdvals(hv.double()), slq.frobenius2(h)
    naive = 1 - (t * t).sum(-1) / fro2
    got = slq._tail_energy(h, hv, V.mT, fro2, t)
    assert torch.all(ref < 1e-6)
    assert torch.all((naive - ref).abs() > 0.1 * ref), (naive, ref)  # the difference is round-off here
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=0)
    t64 = torch.linalg.svdvals(h64 @ V64)  # float64 blocks keep the difference (exact there)
    torch.testing.assert_close(
        slq._tail_energy(h64, h64 @ V64, V64.mT, (h64**2).sum((-1, -2)), t64), ref, rtol=1e-6, atol=0
    )


def test_float32_quadrature_within_rtol_on_a_low_energy_tail(monkeypatch):
    """A float32 low-ESS block (clustered attention, d = 16, noise 0.07, L = 2048, i = 695) over ten generator
    seeds, with the rank-64 first try and without it (rank 16, then rank-128 second tries): every answer
    within rtol of NumPy. Before the tail energy was formed directly, the rank-128 tries' control variate
    had a wrong mean here and 3 of 40 answers missed (largest error 3.9%)."""
    op = _flat_tail_attention(2048, heads=4, noise=0.07, seed=0).to(dtype=torch.float32)
    ref = entropy_ess_ref(op.dense().double().numpy(), [695])
    for wide in (adaptive.SLQ_WIDE_RATIO, math.inf):
        monkeypatch.setattr(adaptive, "SLQ_WIDE_RATIO", wide)
        for seed in range(10):
            gen = torch.Generator().manual_seed(seed)
            e = ew.entropy_ess(op, [695], estimator="randomized", generator=gen).double().numpy()
            assert np.all(np.abs(e - ref) <= 0.02 * ref), (wide, seed, e, ref)


def test_float32_quadrature_has_no_bias_of_its_own_on_a_small_block(small_slq):
    """Near-uniform attention (q, k of standard deviation 0.9, d = 64, L = 384) at i = 128: a 256 x 128 block
    with an ESS of about 85, where the calibration's float32 run missed most often. Estimated 30 times in
    float64 and in float32 (the same operator rounded), the quadrature's answers have the same mean error
    against NumPy in both dtypes, within 0.3 percentage points (examples/benchmarks/cross_talk.py: +0.8% to
    +0.9% in both, from the one-sided split's cross-talk). Such blocks miss rtol on about 6% of the answers in
    both dtypes (100 draws of this and two more operators); 30 draws stay under 15% in each."""
    g = torch.Generator().manual_seed(7)
    q, k = (0.9 * torch.randn(4, 384, 64, generator=g, dtype=torch.float64) for _ in range(2))
    T = SoftmaxAttention(q, k).dense()
    h = T[..., 128:, :128]
    ref = torch.from_numpy(entropy_ess_ref(T.numpy(), [128])[:, 0])
    means = {}
    for dtype in (torch.float64, torch.float32):
        errs = []
        for r in range(30):
            e, lo, hi = adaptive.randomized_entropy(h.to(dtype), 0.02, torch.Generator().manual_seed(r))
            assert torch.all(lo.double() <= ref * (1 + 1e-6)) and torch.all(hi.double() >= ref * (1 - 1e-6))
            by_slq = hi.double() / lo.double() > 1.02**2 + 1e-9
            errs.append(((e.double() - ref) / ref)[by_slq])
        err = torch.cat(errs)
        assert err.numel() >= 80, (dtype, err.numel())  # the quadrature answers most of the 120 entries
        assert float((err.abs() > 0.02).double().mean()) <= 0.15, (dtype, err)
        means[dtype] = float(err.mean())
    assert abs(means[torch.float32] - means[torch.float64]) <= 0.003, means


def test_rank64_first_quadrature_calibration(small_slq, monkeypatch):
    """The rank-64 first quadrature over >= 80 seeded trials (flat tails with noise 0.08-0.1 at L = 768, whose
    blocks of p = 256 to 384 have pilot ratios of about 4 to 6): it answers >= 40 entries, and the miss rate
    stays at or under the stated 5%."""
    spy = _QuadratureSpy(monkeypatch)
    settings = [(0.08, 16), (0.1, 16)] * 4  # (noise, head dimension)
    ops = [_flat_tail_attention(768, noise=nz, d=d, seed=30 + s) for s, (nz, d) in enumerate(settings)]
    trials, misses = _calibration_counts(ops, [256, 384, 512], seed=300)
    answered = sum(sum(ok) for k, own, ok in spy.tries if k == adaptive.SLQ_WIDE_RANK and own)
    assert trials >= 80
    assert answered >= 40, spy.tries  # the rank-64 route really answers entries
    assert misses / trials <= 0.05, (misses, trials)


def _calibration_counts(ops, idx, seed, rtol=0.02):
    """``(trials, misses)`` of ``randomized`` over ``ops`` at ``idx`` against NumPy (operator ``j`` with generator
    seed ``seed + j``); the deterministic bounds must hold on every entry."""
    trials = misses = 0
    for j, op in enumerate(ops):
        ref = entropy_ess_ref(op.dense().numpy(), idx)
        gen = torch.Generator().manual_seed(seed + j)
        out = ew.entropy_ess(op, idx, estimator="randomized", rtol=rtol, return_bounds=True, generator=gen)
        e, lo, hi = (x.numpy() for x in out)
        assert np.all(lo <= ref * (1 + 1e-9)) and np.all(hi >= ref * (1 - 1e-9))
        trials += ref.size
        misses += int((np.abs(e - ref) > rtol * ref).sum())
    return trials, misses


def test_second_try_calibration(small_slq, monkeypatch):
    """The second try at test sizes (deflation rank 32 from blocks of 128): over >= 80 seeded trials
    on attention at initialisation and flat tails it answers >= 20 entries, and the miss rate stays
    at or under the stated 5%."""
    monkeypatch.setattr(adaptive, "SLQ_RETRY_RANK", 32)
    monkeypatch.setattr(adaptive, "SLQ_RETRY_MIN_SIZE", 128)
    spy = _QuadratureSpy(monkeypatch)
    L = 384
    ops = [_attention_at_init(L, d, sc, seed) for seed, (d, sc) in enumerate([(16, 0.3), (16, 0.5), (24, 0.3)] * 2)]
    ops += [_flat_tail_attention(L, seed=20 + s, noise=0.1) for s in range(2)]
    trials, misses = _calibration_counts(ops, [128, 192, 256], seed=200)
    answered = [sum(ok) for k, own, ok in spy.tries if k == 32 and own]
    assert trials >= 80
    assert sum(answered) >= 20, answered  # the second try really answers entries
    assert misses / trials <= 0.05, (misses, trials)


def test_slq_path_does_not_touch_global_rng(small_slq):
    op = _flat_tail_attention(300)
    state = torch.random.get_rng_state()
    a = ew.entropy_ess(op, [150], estimator="randomized")
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a, ew.entropy_ess(op, [150], estimator="randomized"))


# -- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_paths_on_cuda_match_cpu(small_slq):
    L = 256
    ops = [
        GatedRecurrence(_rand(2, L, 8, seed=1), _rand(2, L, 8, seed=2), _decays("full", 2, L, 8, seed=3)),
        SoftmaxAttention(_rand(2, L, 8, seed=4), _rand(2, L, 8, seed=5), window=16),
        _flat_tail_attention(L),
    ]
    for op in ops:
        cpu = ew.entropy_ess(op, estimator="exact" if not isinstance(op, GatedRecurrence) else "gram")
        gpu = ew.entropy_ess(op.to(device="cuda"), estimator="exact" if not isinstance(op, GatedRecurrence) else "gram")
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-6)
    op = _flat_tail_attention(L).to(device="cuda")
    e = ew.entropy_ess(op, [128], estimator="randomized")
    ref = entropy_ess_ref(op.dense().cpu().numpy(), [128])
    assert e.device.type == "cuda" and np.all(np.abs(e.cpu().numpy() - ref) <= 0.021 * ref)


class _LadderSpy:
    """Records the adaptive estimator's sketches (rank, power iterations) and bound ratios, in order."""

    def __init__(self, monkeypatch):
        self.calls = []
        sketch, ratio = adaptive.sketch_singular_values, adaptive._ratio

        def spy_sketch(*a, **k):
            self.calls.append(("sketch", a[4], a[5]))
            return sketch(*a, **k)

        def spy_ratio(lo, hi):
            r = ratio(lo, hi)
            self.calls.append(("ratio", r))
            return r

        monkeypatch.setattr(adaptive, "sketch_singular_values", spy_sketch)
        monkeypatch.setattr(adaptive, "_ratio", spy_ratio)

    def ranks(self):
        return [c[1] for c in self.calls if c[0] == "sketch"]


def _geometric_spectrum(L, tau, seed, heads=2):
    """A causal matrix whose blocks' singular values fall about as exp(-j / tau): closable by a sketch."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(heads, L, 128, generator=g), torch.randn(heads, L, 128, generator=g)
    return Dense(torch.tril(torch.einsum("hlr,r,hmr->hlm", u, torch.exp(-torch.arange(128) / tau), v)))


@pytest.mark.parametrize("L, i", [(1024, 347), (768, 300)])
def test_sketch_ladder_still_closes_a_decaying_spectrum(monkeypatch, L, i):
    """A spectrum falling as exp(-j / 2): the pilot's bounds stay open (its ratio is above the re-sketch's
    ``SKETCH_REPROJECT_RATIO``) but its unseen energy fills few values, so the flat-tail screen lets the
    rank-32 sketch run, which closes the bounds: within rtol of NumPy, deterministically."""
    spy = _LadderSpy(monkeypatch)
    op = _geometric_spectrum(L, 2.0, seed=i)
    ref = entropy_ess_ref(op.dense().double().numpy(), [i])
    e, lo, hi = (x.double().numpy() for x in ew.entropy_ess(op, [i], estimator="randomized", return_bounds=True))
    pilot = spy.calls[1][1]
    assert adaptive.SKETCH_REPROJECT_RATIO < pilot <= adaptive.SKETCH_HOPELESS_RATIO, spy.calls
    assert spy.ranks() == [16, 32]  # no float64 re-sketch at rank 16, then the rank-32 rung
    assert np.all(hi / lo <= 1.02**2) and np.all(lo <= ref * (1 + 1e-5)) and np.all(hi >= ref * (1 - 1e-5))
    assert np.all(np.abs(e - ref) <= 0.02 * ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_flat_tail_screen_skips_a_ladder_that_cannot_close(monkeypatch, seed):
    """Eight-cluster flat-tail attention (float32, a block of p = 347 < SLQ_MIN_SIZE; the quadrature of
    small blocks off): the pilot's bounds are open but below SKETCH_HOPELESS_RATIO, and its unseen energy
    fills more than p / 2 values at its smallest level. The screen sends the block to its exact SVD at
    once; the old ladder (screen off) ran the rank-32 sketch, did not close, and computed the same exact
    value."""
    L, i = 1024, 347
    att = _flat_tail_attention(L, d=32, sharp=2.0, clusters=8, seed=seed)
    op = SoftmaxAttention(att.q.float(), att.k.float())
    ref = entropy_ess_ref(op.dense().double().numpy(), [i])
    monkeypatch.setattr(adaptive, "SLQ_SMALL_MIN_SIZE", math.inf)
    spy = _LadderSpy(monkeypatch)
    e, lo, hi = ew.entropy_ess(op, [i], estimator="randomized", return_bounds=True)
    assert adaptive.SKETCH_REPROJECT_RATIO < spy.calls[1][1] <= adaptive.SKETCH_HOPELESS_RATIO
    assert spy.ranks() == [16]  # the pilot only
    assert torch.equal(lo, hi) and np.allclose(e.double().numpy(), ref, rtol=1e-5)  # exact
    spy.calls.clear()
    monkeypatch.setattr(adaptive, "SKETCH_FLAT_TAIL", math.inf)
    monkeypatch.setattr(adaptive, "SKETCH_REPROJECT_RATIO", math.inf)
    e0, lo0, hi0 = ew.entropy_ess(op, [i], estimator="randomized", return_bounds=True)
    assert spy.ranks()[:3] == [16, 16, 32] and torch.equal(lo0, hi0)  # the ladder ran and gave up
    assert np.allclose(e0.double().numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_small_blocks_go_to_the_quadrature_only_where_the_pilot_is_close(monkeypatch, seed):
    """Blocks with SLQ_SMALL_MIN_SIZE <= p < SLQ_MIN_SIZE (here p = 300, float32): flat-tail attention
    (pilot ratio at most SLQ_SMALL_MAX_RATIO) is answered by the SLQ (its bounds stay open), within rtol
    of NumPy's SVD; attention at initialisation (pilot ratio far above it) gets its exact SVD, no SLQ."""
    L, i = 1024, 300
    att = _flat_tail_attention(L, d=64, seed=seed)
    flat = SoftmaxAttention(att.q.float(), att.k.float())
    g = torch.Generator().manual_seed(seed)
    init = SoftmaxAttention(*(0.3 * torch.randn(4, L, 64, generator=g) for _ in range(2)))
    for op, slq_answers in ((flat, True), (init, False)):
        ref = entropy_ess_ref(op.dense().double().numpy(), [i])
        ladder, slq = _LadderSpy(monkeypatch), _QuadratureSpy(monkeypatch)
        e, lo, hi = (x.double().numpy() for x in ew.entropy_ess(op, [i], estimator="randomized", return_bounds=True))
        pilot = ladder.calls[1][1]
        assert (pilot <= adaptive.SLQ_SMALL_MAX_RATIO) == slq_answers and ladder.ranks() == [16]
        assert len(slq.calls) == int(slq_answers)
        assert np.all(lo <= ref * (1 + 1e-5)) and np.all(hi >= ref * (1 - 1e-5))
        if slq_answers:
            assert np.all(hi / lo > 1.02**2) and np.all(np.abs(e - ref) <= 0.02 * ref)
        else:
            assert np.array_equal(lo, hi) and np.allclose(e, ref, rtol=1e-5)
    assert adaptive.SLQ_SMALL_MIN_SIZE <= 300 < adaptive.SLQ_MIN_SIZE


def test_slq_with_the_pilots_rank16_basis_against_svd():
    """The adaptive path deflates by the pilot's right basis orth(H^T Q) (rank 16, half a power
    iteration): the interlacing of the top values and the accuracy must hold with it too."""
    from esswatch.engine.randomized import sketch_singular_values

    op = _flat_tail_attention(512, seed=3)
    h = op.dense()[..., 256:, :256]
    g = torch.Generator().manual_seed(5)
    _, basis = sketch_singular_values(
        lambda v: h @ v, lambda w: h.mT @ w, 256, h.shape[:-2], 16, 0, h.dtype, h.device, g, return_basis=True
    )
    est, half_gap, se, t, fro2 = slq_entropy(h, 16, g, basis=basis)
    s = torch.linalg.svdvals(h)
    assert t.shape[-1] == 16 and (t <= s[..., :16] * (1 + 1e-9)).all()
    ex = entropy_ess_ref(op.dense().numpy(), [256])[..., 0]
    err = np.abs(est.numpy() - ex) / ex
    assert (err <= half_gap.numpy() + 3 * se.numpy() + 1e-3).all(), (err, half_gap, se)
    assert (err < 0.02).all()


def test_slq_checks_follow_the_stated_rule():
    """The stopping rule by hand (stop = 1, at most 12 steps): the first check after 4 steps gives
    up entries above SLQ_GIVE_UP; a check is skipped while no open entry could pass even at
    step^-2; a later check gives up an entry whose power law through its last two criteria stays
    above stop at step 12; accepted entries keep the values of the last check they passed."""
    from esswatch.engine.slq_stopping import SLQ_GIVE_UP, Checks

    assert SLQ_GIVE_UP == 6.0
    c = Checks(1.0, 12)
    t = lambda *x: torch.tensor(x, dtype=F64)
    zero = t(0.0, 0.0, 0.0)
    assert not c.due(3) and c.due(4)
    assert not c.update(4, t(10.0, 11.0, 12.0), t(0.5, 2.0, 7.0), zero)  # 0 accepted, 2 given up
    assert c.accepted.tolist() == [True, False, False]
    assert not c.due(5)  # 2 (4/5)^2 = 1.28 > 1
    assert c.due(6)  # 2 (4/6)^2 = 0.89
    # entry 1: rate log(2/1.5)/log(6/4) = 0.71, 1.5 (6/12)^0.71 = 0.92: still open
    assert not c.update(6, t(20.0, 21.0, 22.0), t(0.4, 1.5, 6.5), zero)  # entry 0 passes again: step 6's values
    # entry 1: rate log(1.5/1.4)/log(7/6) = 0.45, 1.4 (7/12)^0.45 = 1.1 > 1: given up, so all are done
    assert c.update(7, t(30.0, 31.0, 32.0), t(1.2, 1.4, 6.4), zero)  # entry 0 fails now: keeps step 6's
    est, half_gap, _ = c.result()
    assert est.tolist() == [20.0, 31.0, 32.0] and half_gap.tolist() == [0.4, 1.4, 6.4]
    assert c.accepted.tolist() == [True, False, False]
    nan = Checks(1.0, 12)
    assert nan.update(4, t(1.0), t(float("nan")), t(0.0))  # a NaN criterion is given up at once


def _pilot_deflated_slq(seed, noise, d):
    """``(op, h, run)``: a flat-tail block ``h`` (L = 640, i = 320, 4 heads) and ``run(**kw)``, the
    quadrature deflated by a rank-16 pilot's basis as the adaptive estimator runs it (fixed seed)."""
    from esswatch.engine.randomized import sketch_singular_values

    op = _flat_tail_attention(640, seed=seed, noise=noise, d=d)
    h = op.dense()[..., 320:, :320]

    def run(**kw):
        g = torch.Generator().manual_seed(7)
        _, basis = sketch_singular_values(
            lambda v: h @ v, lambda w: h.mT @ w, 320, h.shape[:-2], 16, 0, h.dtype, h.device, g, return_basis=True
        )
        return slq_entropy(h, 16, g, basis=basis, **kw)

    return op, h, run


@pytest.mark.parametrize(
    "seed, noise, d, steps, accepted",
    [
        (3, 0.02, 16, 4, [True] * 4),  # every head passes the first check
        (4, 0.05, 16, 7, [True] * 4),
        (1, 0.05, 32, 10, [True] * 4),  # past 8 steps (the earlier limit)
        (6, 0.07, 16, 11, [True, True, False, True]),  # head 2 given up by its power law
        (5, 0.08, 16, 11, [False] * 4),  # all given up by the power law (at the check after step 11)
        (0, 0.2, 16, 4, [False] * 4),  # all given up at the first check
    ],
)
def test_slq_early_stop_keeps_each_heads_last_passing_check(seed, noise, d, steps, accepted):
    """With ``stop``, the output is bit-identical to a run of the number of steps at which every
    head was accepted or given up (same probes), and an accepted estimate is within rtol of a
    float64 SVD. The cases cover every way the runs end (a head that passes a check and fails a
    later one keeps the earlier values: ``test_slq_checks_follow_the_stated_rule``)."""
    op, h, run = _pilot_deflated_slq(seed, noise, d)
    stop = math.log1p(0.02)

    stopped = run(stop=stop)
    for a, b in zip(stopped, run(steps=steps)):
        assert torch.equal(a, b)
    assert ((stopped[1] + 2 * stopped[2]) <= stop).tolist() == accepted
    ex = entropy_ess_ref(op.dense().numpy(), [320])[..., 0]
    err = np.abs(stopped[0].numpy() - ex) / ex
    assert (err[np.array(accepted)] < 0.02).all(), err


@pytest.mark.parametrize("seed, noise, d", [(4, 0.05, 16), (1, 0.05, 32), (6, 0.07, 16), (5, 0.08, 16)])
def test_slq_chunks_of_one_head_stop_each_head_at_its_own_check(monkeypatch, seed, noise, d):
    """With chunks of one entry (the CPU path for blocks that just fit the chunk size), each head runs until its own
    check accepts or gives it up: its output is bit-identical to a fixed-step run of that many
    steps (same probes), the heads stop at different steps, the top values and ``||h||_F^2`` are
    those of the batched run, and an accepted head is within rtol of a float64 SVD."""
    from esswatch.engine import golub_kahan

    op, h, run = _pilot_deflated_slq(seed, noise, d)
    stop = math.log1p(0.02)

    batched = run(stop=stop)
    per_head = h.shape[-1] * h.shape[-2] * h.element_size()
    monkeypatch.setattr(golub_kahan, "SLQ_CPU_CHUNK_BYTES", per_head)
    assert golub_kahan.chunk_size(h, 4) == 1
    chunked = run(stop=stop)
    fixed = {s: run(steps=s) for s in range(4, 13)}
    stopped_at = []
    for j in range(4):
        at = [s for s, out in fixed.items() if all(torch.equal(a[j], b[j]) for a, b in zip(chunked[:3], out[:3]))]
        assert at, f"head {j}: no fixed-step run matches"
        stopped_at.append(at[0])
    assert len(set(stopped_at)) > 1, stopped_at  # the heads did stop at different steps
    for a, b in zip(chunked[3:], batched[3:]):
        assert torch.equal(a, b)
    accepted = ((chunked[1] + 2 * chunked[2]) <= stop).numpy()
    ex = entropy_ess_ref(op.dense().numpy(), [320])[..., 0]
    err = np.abs(chunked[0].numpy() - ex) / ex
    assert (err[accepted] < 0.02).all(), err


def test_chunk_size_rule():
    """On CPU: as many entries as fit in SLQ_CPU_CHUNK_BYTES (4 MiB); a block of one entry larger
    than that, or a block off CPU, runs batched."""
    from esswatch.engine.golub_kahan import SLQ_CPU_CHUNK_BYTES, chunk_size

    assert SLQ_CPU_CHUNK_BYTES == 4 * 2**20
    block = lambda m, n, dtype=torch.float32, device="cpu": torch.zeros(1, 1, 1, dtype=dtype, device=device).expand(
        24, m, n
    )
    assert chunk_size(block(1024, 1024), 24) == 1  # 4 MiB: the largest block at L = 2048
    assert chunk_size(block(1024, 512), 24) == 2
    assert chunk_size(block(256, 256), 24) == 16
    assert chunk_size(block(64, 64), 24) == 24
    assert chunk_size(block(1025, 1024), 24) == 24  # over 4 MiB: batched
    assert chunk_size(block(1024, 1024, torch.float64), 24) == 24
    assert chunk_size(block(1024, 1024, device="meta"), 24) == 24  # off CPU: batched


def test_slq_checks_keep_frozen_entries():
    """An entry whose chunk stopped (``frozen``) keeps its values and status at later checks."""
    from esswatch.engine.slq_stopping import Checks

    c = Checks(1.0, 12)
    t = lambda *x: torch.tensor(x, dtype=F64)
    zero = t(0.0, 0.0, 0.0)
    assert not c.update(4, t(10.0, 11.0, 12.0), t(0.5, 3.0, 7.0), zero)  # 0 accepted, 2 given up
    assert c.finished == [True, False, True]
    frozen = torch.tensor([True, False, True])
    # stale criteria of frozen entries: 0 would fail now, 2 would pass; neither changes
    assert c.update(6, t(20.0, 21.0, 22.0), t(5.0, 0.5, 0.5), zero, frozen=frozen)
    est, half_gap, _ = c.result()
    assert est.tolist() == [10.0, 21.0, 12.0] and half_gap.tolist() == [0.5, 0.5, 7.0]
    assert c.accepted.tolist() == [True, True, False] and c.finished == [True, True, True]


def _golub_kahan_ref(h, V, v0, steps):
    """Golub-Kahan of ``A = h (I - V V^T)`` from each right start vector ``v0[p]``, NumPy float64,
    with full reorthogonalization of both sides: ``(alpha, beta)``, ``probes x steps``."""
    A = h - (h @ V) @ V.T
    out = np.zeros((2, len(v0), steps))
    for p, v in enumerate(v0):
        us, vs = [], [v / np.linalg.norm(v)]
        for j in range(steps):
            u = A @ vs[-1] - (out[1, p, j - 1] * us[-1] if j else 0)
            for x in us:
                u -= (x @ u) * x
            out[0, p, j] = np.linalg.norm(u)
            us.append(u / out[0, p, j])
            w = A.T @ us[-1] - out[0, p, j] * vs[-1]
            for x in [*V.T, *vs]:
                w -= (x @ w) * x
            out[1, p, j] = np.linalg.norm(w)
            vs.append(w / out[1, p, j])
    return out


@pytest.mark.parametrize("block", ["flat tail", "at initialisation"])
def test_golub_kahan_runs_match_a_reorthogonalized_float64_reference(monkeypatch, block):
    """The quadrature's float32 runs (one projection off ``V`` per step, no reorthogonalization
    against earlier vectors, the ``1 / ||h||_F`` scaling folded into the coefficients, chunks of
    one head) give the estimates, half gaps and standard errors of a float64 run with full
    reorthogonalization of both sides, over all ``SLQ_STEPS`` steps (12; the test follows the
    constant). The coefficients themselves drift apart in the later steps (about 1e-4 of the
    largest on the flat tail, with or without the reorthogonalization in float32); the quadrature
    does not (plain Lanczos quadrature is stable)."""
    from esswatch.engine import golub_kahan, slq

    if block == "flat tail":
        T = _flat_tail_attention(640, seed=4).dense()
    else:
        T = _attention_at_init(640, 64, 0.5, seed=2).dense()
    h = T[..., 320:, :320].to(torch.float32)
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(h @ torch.randn(4, 320, 16, generator=g)).Q
    V = torch.linalg.qr(h.mT @ Q).Q  # the pilot's kind of rank-16 right basis
    z = torch.randn(4, 320, 16, generator=g)
    z = z - V @ (V.mT @ z)
    v0 = z / z.norm(dim=-2, keepdim=True)
    fro = h.double().square().sum((-1, -2)).sqrt()
    monkeypatch.setattr(golub_kahan, "SLQ_CPU_CHUNK_BYTES", 320 * 320 * 4)  # chunks of one head
    steps = slq.SLQ_STEPS
    runs = golub_kahan.GolubKahanRuns(h, V, (h @ v0).mT, v0.mT, (1 / fro).to(torch.float32), steps)
    assert len(runs.chunks) == 4
    runs.run(0, steps)
    alpha, beta = (x.double() for x in runs.coefficients(steps))
    ref = [
        _golub_kahan_ref((h[e].double() / fro[e]).numpy(), V[e].double().numpy(), v0[e].mT.double().numpy(), steps)
        for e in range(4)
    ]
    ref_alpha, ref_beta = (torch.from_numpy(np.stack([r[i] for r in ref])) for i in (0, 1))
    np.testing.assert_allclose(alpha[..., :3].numpy(), ref_alpha[..., :3].numpy(), rtol=1e-4)
    np.testing.assert_allclose(beta[..., :3].numpy(), ref_beta[..., :3].numpy(), rtol=1e-4)
    # the estimates from both coefficient sets (the same top values and tail energy)
    t = torch.linalg.svdvals((h @ V).double()) / fro[:, None]
    energy = 1 - (t * t).sum(-1)
    for ell in (4, 7, steps):
        got = slq._estimate(alpha[..., :ell], beta[..., :ell], t, 320 - 16, energy, fro**2)
        want = slq._estimate(ref_alpha[..., :ell], ref_beta[..., :ell], t, 320 - 16, energy, fro**2)
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=2e-6)  # the estimate
        np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), atol=1e-6)  # half the Gauss/Radau gap
        np.testing.assert_allclose(got[2].numpy(), want[2].numpy(), atol=1e-6)  # the standard error


def test_hankel_frobenius2_matches_each_block(monkeypatch):
    """``||T[..., i:, :i]||_F^2`` of many indices from one pass (unsorted, repeated, first and
    last) equals a float64 sum over each block; the functional API's randomized estimates and
    bounds with it equal those from each block's own norm (to 1e-4), and the exact values lie in the bounds."""
    from esswatch.engine.slq import hankel_frobenius2
    from esswatch.ess.blocks import BlockCache

    t = torch.rand(3, 2, 300, 300, generator=torch.Generator().manual_seed(0)).tril()
    t[..., 40:55, :] = 0  # zero rows (padding)
    idx = [299, 7, 150, 1, 150, 64, 255]
    got = hankel_frobenius2(t, idx)
    assert sorted(got) == sorted(set(idx))
    for i in idx:
        want = (t[..., i:, :i].double() ** 2).sum((-1, -2))
        np.testing.assert_allclose(got[i].numpy(), want.numpy(), rtol=1e-6)
        assert got[i].dtype == F64 and got[i].shape == (3, 2)

    op = _flat_tail_attention(768, d=32).to(dtype=torch.float32)
    idx = [200, 384, 500]
    run = lambda: ew.entropy_ess(
        op, idx, estimator="randomized", rtol=0.02, return_bounds=True, generator=torch.Generator().manual_seed(0)
    )
    assert BlockCache(op).frobenius2(idx)  # this operator's blocks take the one-pass norms
    shared = run()
    monkeypatch.setattr(BlockCache, "frobenius2", lambda self, indices: {})
    per_block = run()
    for a, b in zip(shared, per_block):  # the norms differ by float32 round-off; the quadrature's tail energy
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4)  # (a difference) by more: 1.2e-5 here
    ref = entropy_ess_ref(op.dense().double().numpy(), idx)
    assert (np.abs(shared[0].numpy() - ref) / ref < 0.02).all()
    assert (shared[1].numpy() <= ref * (1 + 1e-5)).all() and (ref <= shared[2].numpy() * (1 + 1e-5)).all()
