"""esswatch: live effective state-size (ESS) of sequence-mixing layers.

Layers, each depending only on the ones before it:

- :mod:`esswatch.engine` - pure math on tensors (spectra, Gramians, sketches);
- :mod:`esswatch.operators` - structured causal operators and their products;
- :mod:`esswatch.ess` - the functional API (:func:`entropy_ess`, :func:`tolerance_ess`);
- :mod:`esswatch.capture` - hooks that realize operators from modules;
- :mod:`esswatch.watch` - schedule, budget, aggregation, sinks (:class:`ESSWatch`);
- :mod:`esswatch.integrations` - thin framework adapters (imported lazily).
"""
from . import operators
from .engine.memory import ESSMemoryError
from .ess import entropy_ess, tolerance_ess

__version__ = "0.1.0"

__all__ = ["entropy_ess", "tolerance_ess", "ESSMemoryError", "operators", "capture", "ESSWatch", "Regularizer", "__version__"]


def __getattr__(name):  # lazy: keep `import esswatch` light
    if name == "capture":
        from .capture import capture
        return capture
    if name == "ESSWatch":
        from .watch import ESSWatch
        return ESSWatch
    if name == "Regularizer":
        from .watch.regularizer import Regularizer
        return Regularizer
    raise AttributeError(f"module 'esswatch' has no attribute {name!r}")
