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
