"""The engine: pure math on tensors (no modules, no operators, no hooks).

- :mod:`.spectral`: entropy-ESS and tolerance-ESS of singular values, with
  finite gradients at zero, repeated and tiny singular values; ``compute_dtype``.
- :mod:`.hankel`: exact ``||H_i||_F^2`` of the Hankel blocks ``H_i = T[i:, :i]`` of
  dense causal matrices, for all indices at once.
- :mod:`.gram`: exact singular values of ``H_i`` for diagonal recurrences via
  factored Gramians, direct for a few indices, chunked for many (``docs/ess.md`` section 4).
- :mod:`.exact`: trimmed (all-zero rows/columns dropped), tall-oriented, batched SVDs.
- :mod:`.randomized`: subspace-iteration sketches of a block through products only, and
  deterministic bounds on the entropy-ESS of the whole spectrum.
- :mod:`.slq`: deflated stochastic Lanczos quadrature for blocks with a flat tail.
- :mod:`.adaptive`: the adaptive randomized estimators of one block built from
  :mod:`.randomized`, :mod:`.slq` and :mod:`.exact`, with their constants.
- :mod:`.memory`: the memory estimate of one call and its limit.
- :mod:`.validation`: input checks raising ``ValueError``.
"""

from .spectral import compute_dtype, entropy_from_singular_values, tolerance_from_singular_values
from .validation import check_finite

__all__ = [
    "entropy_from_singular_values",
    "tolerance_from_singular_values",
    "compute_dtype",
    "check_finite",
]
