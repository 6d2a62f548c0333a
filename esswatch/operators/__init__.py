"""Structured causal operators (``docs/ess.md`` section 1) and their products.

Every operator is a batch of causal ``L x L`` matrices with ``.dense()``, the
Hankel products the randomized estimator needs, exact ``||H_i||_F^2`` and its
theoretical state size.
"""
from .attention import SoftmaxAttention
from .base import Operator
from .convolution import Convolution
from .dense import Dense
from .recurrence import GatedRecurrence

__all__ = ["Operator", "Dense", "SoftmaxAttention", "GatedRecurrence", "Convolution"]
