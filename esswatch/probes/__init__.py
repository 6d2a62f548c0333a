"""The capture layer: probes and hooks that realize operators from modules during a forward pass.

- :func:`capture` (also ``esswatch.capture``) and :class:`Capture` (:mod:`.session`): the
  probes and hooks of one model, attached for a ``with`` block or for a training run;
- :class:`Probe` (:mod:`.probe`): realizes one module's operator from what it computed;
- :mod:`.registry`: which probe captures which module (:func:`register_probe`, providers);
- :mod:`.hooks`: the picklable hook objects; :mod:`.unsupported`: what cannot be captured
  and why; :mod:`.torch_probes`: ``nn.MultiheadAttention``; :mod:`.protocol`: modules with
  an ``esswatch_operator`` method.
"""

from . import torch_probes  # noqa: F401  (registers the nn.MultiheadAttention probe)
from .probe import PADDING_WARNING, CaptureError, CaptureWarning, NothingToMeasure, Probe
from .registry import add_provider, probe_for, register_probe, supported_types, unregister_probe
from .session import Capture, capture
from .unsupported import UnsupportedModelError, UnsupportedProbe

__all__ = [
    "Capture",
    "capture",
    "Probe",
    "CaptureError",
    "CaptureWarning",
    "NothingToMeasure",
    "PADDING_WARNING",
    "register_probe",
    "unregister_probe",
    "add_provider",
    "probe_for",
    "supported_types",
    "UnsupportedModelError",
    "UnsupportedProbe",
]
