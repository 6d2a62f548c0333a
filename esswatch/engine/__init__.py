"""The engine: pure math on tensors (no modules, no operators, no hooks).

- :mod:`.spectral`: entropy-ESS and tolerance-ESS of singular values, with
  finite gradients at zero, repeated and tiny singular values.
- :mod:`.hankel`: exact singular values and Frobenius norms of the Hankel
  blocks ``H_i = T[i:, :i]`` of dense causal matrices.
- :mod:`.gram`: exact singular values of ``H_i`` for diagonal recurrences via
  factored Gramians, direct for a few indices, chunked for many (``docs/ess.md`` section 4).
- :mod:`.exact`: trimmed (all-zero rows/columns dropped), tall-oriented, batched SVDs.
- :mod:`.randomized`: matrix-free randomized sketches of ``H_i`` with
  deterministic bounds on the entropy-ESS of the whole spectrum.
- :mod:`.slq`: deflated stochastic Lanczos quadrature for blocks with a flat tail.
- :mod:`.adaptive`: the adaptive randomized estimators built from the two above.
"""
from .spectral import compute_dtype, entropy_from_singular_values, tolerance_from_singular_values
from .validation import check_finite

__all__ = [
    "entropy_from_singular_values",
    "tolerance_from_singular_values",
    "compute_dtype",
    "check_finite",
]
