"""esswatch: live effective state-size (ESS) of sequence-mixing layers.

Layers, each depending only on the ones before it (``tests/test_layering.py``; CONTRIBUTING.md); beside
them :mod:`esswatch.layers` (reference mixers, at the level of ``watch``), then :mod:`esswatch.tools` and
:mod:`esswatch.demo`, then :mod:`esswatch.cli`:

- :mod:`esswatch.engine` - pure math on tensors (spectra, Gramians, sketches);
- :mod:`esswatch.operators` - structured causal operators and their products;
- :mod:`esswatch.ess` - the functional API (:func:`entropy_ess`, :func:`tolerance_ess`);
- :mod:`esswatch.probes` - hooks that realize operators from modules;
- :mod:`esswatch.watch` - schedule, budget, aggregation, sinks (:class:`ESSWatch`);
- :mod:`esswatch.integrations` - thin framework adapters (imported lazily).
"""

from typing import TYPE_CHECKING

from . import operators
from ._version import __version__
from .engine.memory import ESSMemoryError
from .ess import entropy_ess, tolerance_ess

if TYPE_CHECKING:  # the lazily exported names, visible to type checkers
    from .probes import capture
    from .watch import ESSMeasurementError, ESSWarning, ESSWatch
    from .watch.regularizer import Regularizer

__all__ = [
    "entropy_ess",
    "tolerance_ess",
    "ESSMemoryError",
    "operators",
    "capture",
    "ESSWatch",
    "ESSWarning",
    "ESSMeasurementError",
    "Regularizer",
    "__version__",
]


def __getattr__(name):  # lazy: keep `import esswatch` light
    if name == "capture":
        from .probes import capture

        return capture
    if name in ("ESSWatch", "ESSWarning", "ESSMeasurementError"):
        from . import watch

        return getattr(watch, name)
    if name == "Regularizer":
        from .watch.regularizer import Regularizer

        return Regularizer
    raise AttributeError(f"module 'esswatch' has no attribute {name!r}")
