"""Structured causal operators (``docs/ess.md`` section 1) and their products.

Every operator is a batch of causal ``L x L`` matrices with ``.dense()``, the
Hankel products the randomized estimator needs, exact ``||H_i||_F^2`` and its
theoretical state size.
"""
from .base import Operator
from .dense import Dense
from .attention import SoftmaxAttention
from .recurrence import GatedRecurrence
from .convolution import Convolution

__all__ = ["Operator", "Dense", "SoftmaxAttention", "GatedRecurrence", "Convolution"]
