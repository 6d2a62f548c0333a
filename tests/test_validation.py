"""Shared argument checks of the engine (``esswatch.engine.validation``)."""

import subprocess
import sys

import pytest
import torch

from esswatch.engine.validation import broadcast_batch


@pytest.mark.parametrize(
    "shapes",
    [
        ((), ()),
        ((2,), ()),
        ((2, 3), (3,)),
        ((1, 3), (2, 1)),
        ((4, 1, 5), (2, 1)),
        ((2, 3), (2, 3), (1, 3)),
        ((0,), (1,)),
        ((2, 0), (0,)),
    ],
)
def test_broadcast_batch_matches_torch(shapes):
    sizes = [torch.Size(s) for s in shapes]
    assert broadcast_batch(*sizes) == torch.broadcast_shapes(*sizes)


@pytest.mark.parametrize("shapes", [((2,), (3,)), ((2, 3), (4, 3)), ((2, 1, 3), (4, 2))])
def test_broadcast_batch_rejects_what_torch_rejects(shapes):
    sizes = [torch.Size(s) for s in shapes]
    with pytest.raises(RuntimeError):
        torch.broadcast_shapes(*sizes)
    with pytest.raises(RuntimeError):
        broadcast_batch(*sizes)


def test_building_operators_does_not_import_sympy():
    """Regression: torch.broadcast_shapes imports torch.fx's symbolic shapes and SymPy on its
    first call (seconds, tens of MB), which happened on the first sampled step of a run."""
    code = (
        "import sys, torch, esswatch; from esswatch.operators import SoftmaxAttention, GatedRecurrence;"
        "q = torch.randn(2, 3, 8, 4); SoftmaxAttention(q, q, mask=torch.ones(8, 8, dtype=torch.bool).tril());"
        "GatedRecurrence(q, q, -torch.rand(2, 3, 8, 4)); print('sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_check_finite_by_one_sum_keeps_the_entry_by_entry_verdict():
    """``check_finite`` proves finiteness by one sum in the tensor's dtype: finite entries whose sum overflows
    must still pass, and Inf entries that a sum could hide (``inf - inf``) must still be counted."""
    from esswatch.engine.validation import check_finite

    big = torch.full((4, 1000), 3e38)  # finite in float32; their float32 sum is inf
    assert not torch.isfinite(big.sum()) and torch.isfinite(big).all()
    check_finite(big, "q")  # no error
    check_finite(torch.randn(3, 5, dtype=torch.float64), "k")
    cases = [(float("inf"), 0, 1), (float("nan"), 1, 0)]
    for value, n_nan, n_inf in cases:
        x = big.clone()
        x[1, 7] = value
        with pytest.raises(ValueError, match=f"q contains non-finite values \\({n_nan} NaN, {n_inf} Inf\\)"):
            check_finite(x, "q")
    x = torch.zeros(6)
    x[0], x[3] = float("inf"), -float("inf")  # the sum is NaN
    with pytest.raises(ValueError, match=r"\(0 NaN, 2 Inf\)"):
        check_finite(x, "k")
