"""Structured causal operators (``docs/ess.md`` section 1) and their products.

Every operator is a batch of causal ``L x L`` matrices with ``.dense()``, slices
``block(rows, cols)`` and ``hankel(i)`` (computed from the structure where it allows, without
materializing ``T``), ``hankel_support(i)`` (the rows and columns that can hold a non-zero of
``H_i``), the exact ``hankel_fro2(indices)`` and the natural state size per index
``tss(indices)``. The estimators of :mod:`esswatch.ess` work on the blocks these return
(the randomized one multiplies the materialized block; see :mod:`esswatch.operators.base`).
"""

from .attention import SoftmaxAttention
from .base import Operator
from .convolution import Convolution
from .delta import DeltaRule
from .dense import Dense
from .recurrence import GatedRecurrence

__all__ = ["Operator", "Dense", "SoftmaxAttention", "GatedRecurrence", "Convolution", "DeltaRule"]
