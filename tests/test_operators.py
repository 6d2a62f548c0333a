"""The operators against naive loops: ``.dense()``, ``hankel(i)``/``hankel_fro2``, ``block()`` and
``hankel_support`` against the dense matrix, and validation of their arguments."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from operator_cases import F64
from operator_cases import ops as _ops
from operator_cases import rand as _rand
from reference import convolution_loop, gated_recurrence_loop, softmax_attention_loop

from esswatch.operators import Convolution, DeltaRule, Dense, GatedRecurrence, SoftmaxAttention

# -- operators' dense() against naive loops -----------------------------------------------


def test_dense_matches_naive_loops():
    L = 9
    q, k = _rand(2, L, 3, seed=1), _rand(2, L, 3, seed=2)
    ld = -torch.rand(2, L, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    np.testing.assert_allclose(
        SoftmaxAttention(q, k, scale=0.7).dense().numpy(), softmax_attention_loop(q.numpy(), k.numpy(), 0.7), atol=1e-12
    )
    np.testing.assert_allclose(
        SoftmaxAttention(q, k, window=3).dense().numpy(),
        softmax_attention_loop(q.numpy(), k.numpy(), 1 / math.sqrt(3), window=3),
        atol=1e-12,
    )
    add = _rand(L, L, seed=5)
    np.testing.assert_allclose(
        SoftmaxAttention(q, k, mask=add).dense().numpy(),
        softmax_attention_loop(q.numpy(), k.numpy(), 1 / math.sqrt(3), mask=add.numpy()),
        atol=1e-12,
    )
    bmask = torch.rand(L, L, generator=torch.Generator().manual_seed(6)) > 0.4
    np.testing.assert_allclose(
        SoftmaxAttention(q, k, mask=bmask).dense().numpy(),
        softmax_attention_loop(q.numpy(), k.numpy(), 1 / math.sqrt(3), mask=bmask.numpy()),
        atol=1e-12,
    )
    for decay in (None, ld, ld[..., :1]):
        ref = gated_recurrence_loop(q.numpy(), k.numpy(), None if decay is None else decay.numpy())
        np.testing.assert_allclose(GatedRecurrence(q, k, decay).dense().numpy(), ref, atol=1e-12)
    h = _rand(2, L, seed=7)
    np.testing.assert_allclose(Convolution(h).dense().numpy(), convolution_loop(h.numpy()), atol=0)


def test_hankel_blocks_and_fro2():
    for name, op in _ops(L=16).items():
        T = op.dense()
        idx = torch.arange(1, 16)
        fro2 = op.hankel_fro2(idx)
        ref = np.stack([(T[..., i:, :i].numpy() ** 2).sum((-1, -2)) for i in range(1, 16)], -1)
        np.testing.assert_allclose(fro2.numpy(), ref, rtol=1e-12, atol=1e-14, err_msg=name)
        for i in (1, 7, 15):
            np.testing.assert_allclose(op.hankel(i).numpy(), T[..., i:, :i].numpy(), atol=1e-12, err_msg=name)


# -- block() and hankel_support() against the dense matrix ----------------------------------


def test_block_matches_dense_slices():
    for name, op in _ops(L=16).items():
        T = op.dense()
        for rows, cols in ((slice(3, 11), slice(0, 7)), (slice(None), slice(2, 5)), (slice(12, None), slice(None))):
            np.testing.assert_allclose(
                op.block(rows, cols).numpy(), T[..., rows, cols].numpy(), atol=1e-12, err_msg=f"{name} {rows} {cols}"
            )


def test_hankel_support_holds_every_nonzero():
    L = 16
    cases = dict(_ops(L=L))
    cases["conv_short"] = Convolution(torch.cat([_rand(2, 3, seed=8), torch.zeros(2, L - 3, dtype=F64)], -1))
    for name, op in cases.items():
        T = op.dense()
        for i in range(1, L):
            rows, cols = op.hankel_support(i)
            H = T[..., i:, :i]
            inside = torch.zeros(L, L, dtype=torch.bool)
            inside[rows, cols] = True
            assert not bool((H * ~inside[i:, :i]).any()), (name, i)
    w = 5
    assert cases["softmax_window"].hankel_support(8) == (slice(8, 8 + w - 1), slice(8 - w + 1, 8))
    assert cases["conv_short"].hankel_support(8) == (slice(8, 10), slice(6, 8))
    assert cases["dense"].hankel_support(8) == (slice(8, L), slice(0, 8))


# -- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: GatedRecurrence(torch.randn(5, 3), torch.randn(5, 2)), "agree"),
        (lambda: GatedRecurrence(torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 2)), "log_decay"),
        (lambda: SoftmaxAttention(torch.randn(5, 3), torch.randn(5, 3), window=0), "window"),
        (lambda: SoftmaxAttention(torch.randn(5, 3), torch.randn(5, 3), mask=torch.ones(4, 4)), "mask"),
        (lambda: Convolution(torch.arange(5)), "floating"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- the gated delta rule ------------------------------------------------------------------------------
def _delta_inputs(seed=0, shape=(2, 3), L=24, N=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, L, N, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(*shape, L, N, generator=g, dtype=dtype), dim=-1)
    beta = torch.rand(*shape, L, generator=g, dtype=dtype)
    log_decay = -0.2 * torch.rand(*shape, L, generator=g, dtype=dtype)
    return q, k, beta, log_decay


def test_delta_rule_matches_its_recurrence_and_numpy_svds():
    """``DeltaRule.dense()`` equals the literal recurrence run on one-hot values (``reference.delta_rule_loop``),
    its past-to-future blocks have rank at most ``N``, and entropy-ESS matches NumPy SVDs."""
    from reference import delta_rule_loop, entropy_ess_ref, hankel_sv

    import esswatch
    from esswatch.operators.delta import delta_rule_dense

    q, k, beta, log_decay = _delta_inputs()
    op = DeltaRule(q, k, beta, log_decay, value_dim=4)
    ref = delta_rule_loop(q, k, beta, log_decay)
    np.testing.assert_allclose(op.dense().numpy(), ref, rtol=1e-12, atol=1e-13)
    for chunk in (1, 5, 24):  # chunk boundaries anywhere, and a chunk the length of the sequence
        got = delta_rule_dense(q, k, beta, log_decay, chunk=chunk).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert op.state_size == 6 and op.value_dim == 4 and op.batch_shape == (2, 3)
    s = hankel_sv(ref, 12)
    assert (s[..., 6:] < 1e-10 * s[..., :1]).all() and (s[..., 5] > 1e-6 * s[..., 0]).all()  # rank N = 6
    got = esswatch.entropy_ess(op, indices=[4, 12, 20], estimator="exact")
    np.testing.assert_allclose(got.numpy(), entropy_ess_ref(ref, [4, 12, 20]), rtol=1e-9)
    # float32 input computes in float32; beta = 0 everywhere is the zero operator
    assert DeltaRule(*(x.float() for x in (q, k, beta, log_decay))).dense().dtype == torch.float32
    assert not DeltaRule(q, k, torch.zeros_like(beta), log_decay).dense().any()


def _recurrence_inputs(case, B=2, L=150, N=4):
    g = torch.Generator().manual_seed(17)
    q, k = (torch.randn(B, L, N, generator=g, dtype=F64) for _ in range(2))
    u = torch.rand(B, L, N, generator=g, dtype=F64)
    ld = {
        "gates near 1": torch.nn.functional.logsigmoid(4 * u + 2),
        "one gate per head": -0.3 * u[..., :1],
        "fast gates": -30 * u,  # most entries underflow
        "a reset": torch.where(torch.arange(L)[:, None] == 70, -1e6, -0.05 * u),
        "growth": 0.02 * u - 0.01,  # some log_decay > 0: the direct sum everywhere
        "no decay": None,
    }[case]
    return q, k, ld


RECURRENCE_CASES = ("gates near 1", "one gate per head", "fast gates", "a reset", "growth", "no decay")


@pytest.mark.parametrize("case", RECURRENCE_CASES)
def test_gated_recurrence_blocks_as_factor_products(case, monkeypatch):
    """``GatedRecurrence`` cuts its blocks as products of two width-``N`` factors where every ``log_decay <= 0``
    (``H_i`` and its windows in one product, blocks that cross the diagonal by tiles of 64 rows), and by the direct
    sum over the state where a ``log_decay`` is positive. Against the literal recurrence in float64: ``dense()``,
    ``hankel(i)``, a window and a block across the diagonal, within ``1e-12`` in float64 and float32 round-off of
    the largest entry in float32. ``hankel(i)`` never takes the direct sum when the gates decay."""
    q, k, ld = _recurrence_inputs(case)
    ref = gated_recurrence_loop(q.numpy(), k.numpy(), None if ld is None else ld.numpy())
    scale = np.abs(ref).max()
    calls, direct = [], GatedRecurrence._direct
    monkeypatch.setattr(GatedRecurrence, "_direct", lambda self, *a, **kw: calls.append(1) or direct(self, *a, **kw))
    for dt, tol in ((F64, 1e-12), (torch.float32, 2e-6)):
        op = GatedRecurrence(q.to(dt), k.to(dt), None if ld is None else ld.to(dt))
        calls.clear()
        got = {
            "hankel 37": (op.hankel(37), ref[..., 37:, :37]),
            "hankel 120": (op.hankel(120), ref[..., 120:, :120]),
            "window": (op.hankel_window(90, 11, 23), ref[..., 90:101, 67:90]),
        }
        assert bool(calls) == (case == "growth"), "H_i by the direct sum"
        got["dense"] = (op.dense(), ref)
        got["across"] = (op.block(slice(30, 140), slice(10, 100)), ref[..., 30:140, 10:100])
        for name, (x, want) in got.items():
            assert x.dtype == dt, name
            np.testing.assert_allclose(
                x.double().numpy(), want, rtol=0, atol=tol * scale, err_msg=f"{case}, {name}, {dt}"
            )


def test_gated_recurrence_factor_products_gradients_match_finite_differences(monkeypatch):
    """The factored blocks' backward pass (``gradcheck``, float64), with tiles of 4 rows so that ``dense()`` crosses
    several tiles at L = 11, per channel and per head."""
    import esswatch.operators.recurrence as rec

    monkeypatch.setattr(rec, "_TILE", 4)
    g = torch.Generator().manual_seed(5)
    L, N = 11, 3
    for width in (N, 1):
        x = [torch.randn(2, L, N, generator=g, dtype=F64) for _ in range(2)]
        x.append(-torch.rand(2, L, width, generator=g, dtype=F64) - 0.05)
        x = [t.requires_grad_() for t in x]
        assert torch.autograd.gradcheck(lambda *a: GatedRecurrence(*a).dense(), x)
        assert torch.autograd.gradcheck(lambda *a: GatedRecurrence(*a).hankel(6), x)


@pytest.mark.parametrize("chunk", [64, 7])
def test_delta_rule_dense_in_float32_across_input_families(chunk):
    """The closed form in float32 (``delta_rule_dense``, the default chunk and short ones) against the literal
    recurrence in float64, on the delta-rule input families nobody tuned it for (``beta`` up to 2, unnormalized
    keys, resets, fast gates, padding): within float32 round-off of the largest entry."""
    from reference import delta_rule_loop
    from test_delta_gram import CASES, _inputs

    from esswatch.operators.delta import delta_rule_dense

    for case in CASES:
        x = _inputs(case, L=150, N=16)
        ref = delta_rule_loop(*x)
        got = delta_rule_dense(*(t.float() for t in x), chunk=chunk)
        assert got.dtype == torch.float32
        assert np.abs(got.double().numpy() - ref).max() <= 4e-6 * np.abs(ref).max(), case


def test_delta_rule_dense_gradients_match_finite_differences():
    """``delta_rule_dense``'s backward pass against central finite differences (``torch.autograd.gradcheck``,
    float64), with chunks that split the sequence unevenly, ``beta`` up to 2 and a gate at the floor."""
    from esswatch.operators.delta import delta_rule_dense

    g = torch.Generator().manual_seed(3)
    L, N = 11, 3
    q = torch.randn(2, L, N, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(2, L, N, generator=g, dtype=torch.float64), dim=-1)
    beta = 2 * torch.rand(2, L, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(2, L, generator=g, dtype=torch.float64)
    log_decay[0, 5] = -2000.0  # below the floor: the state is erased there, in the values and the gradients
    x = [t.requires_grad_() for t in (q, k, beta, log_decay)]
    assert torch.autograd.gradcheck(lambda *a: delta_rule_dense(*a, chunk=4), x)


def test_delta_rule_is_differentiable():
    q, k, beta, log_decay = (x.requires_grad_() for x in _delta_inputs(L=10))
    import esswatch

    esswatch.entropy_ess(DeltaRule(q, k, beta, log_decay), indices=[5], estimator="exact").sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, beta, log_decay))


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda q, k, b, g: (q, k[..., :-1], b, g), "one shape"),
        (lambda q, k, b, g: (q, k, b[..., :-1], g), "must have shape"),
        (lambda q, k, b, g: (q, k, b, g[..., None]), "must have shape"),
        (lambda q, k, b, g: (q.long(), k, b, g), "floating tensor"),
        (lambda q, k, b, g: (q, k, b, None), "floating tensor"),
    ],
)
def test_delta_rule_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        DeltaRule(*args(*_delta_inputs(L=5)))


def test_matrix_scale_is_the_largest_magnitude_per_matrix():
    """``matrix_scale`` (max of ``max x`` and ``-min x``) against ``|x|.amax`` per matrix: a matrix dominated by a
    negative entry, one of zeros (scale 1), tiny float32 values, and float64; ``None`` when all are in range."""
    from esswatch.operators.base import matrix_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 30, 6, generator=g) * 1e-30
    x[1] = 0
    x[2, 5, 3] = -7e-28  # the largest magnitude is negative
    s = matrix_scale(x, (-2, -1))
    ref = x.abs().amax(dim=(-2, -1), keepdim=True)
    ref = torch.where(ref > 0, ref, torch.ones_like(ref))
    assert s is not None and torch.equal(s, ref)
    assert matrix_scale(torch.randn(3, 8, 8, generator=g), (-2, -1)) is None
    y = torch.randn(2, 5, 5, generator=g, dtype=torch.float64) * 1e-200
    y[0, 0, 0] = -1e-190
    assert torch.equal(matrix_scale(y, (-2, -1)), y.abs().amax(dim=(-2, -1), keepdim=True))


def test_narrowed_keeps_the_first_rows_and_heads_of_every_operator():
    """``Operator.narrowed(rows, heads)`` (used to measure a budget's or heads= cut of the regularizer's
    operators) equals slicing the dense T, also where an operand broadcasts along a batch dim."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.zeros(1, 3, 6, 6, dtype=torch.float64).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    ops = [
        SoftmaxAttention(r(4, 3, 6, 2), r(4, 3, 6, 2), mask=mask),
        SoftmaxAttention(r(4, 3, 6, 2), r(4, 3, 6, 2), window=3),
        GatedRecurrence(r(4, 3, 6, 2), r(4, 3, 6, 2), -r(1, 3, 6, 1).abs()),
        GatedRecurrence(r(4, 3, 6, 2), r(1, 1, 6, 2)),
        DeltaRule(
            r(4, 3, 6, 2), r(4, 3, 6, 2) / 2, torch.rand(4, 3, 6, generator=g, dtype=torch.float64), -r(4, 3, 6).abs()
        ),  # fmt: skip
        Convolution(r(4, 3, 6)),
        Dense(r(4, 3, 6, 6).tril()),
    ]
    for op in ops:
        full = op.dense()
        for rows, heads in ((2, None), (None, 1), (1, 2), (9, 9)):
            cut = op.narrowed(rows, heads)
            assert tuple(cut.batch_shape) == (min(rows or 4, 4), min(heads or 3, 3)), type(op).__name__
            assert torch.equal(cut.dense(), full[: rows or 4, : heads or 3]), (type(op).__name__, rows, heads)
        assert op.narrowed(None, None) is op and op.narrowed(4, 3) is op
        # selected_rows (rows that are all padding left out): any rows, in the order given, like indexing dense T
        pick = torch.tensor([3, 1])
        assert torch.equal(op.selected_rows(pick).dense(), full[pick]), type(op).__name__
    # a state size given to an operator without one of its own (a probe's TSS) survives both rebuilds (review)
    conv = copy.copy(Convolution(r(4, 3, 6)))
    conv.state_size = 5
    assert conv.narrowed(2, 1).state_size == 5 and conv.selected_rows(torch.tensor([0, 2])).state_size == 5
