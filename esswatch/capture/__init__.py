"""Capture: hooks that realize operators from modules during a forward pass."""
import sys as _sys
import types as _types

from .probe import CaptureError, CaptureWarning, Probe
from .registry import add_provider, probe_for, register_probe, supported_types, unregister_probe
from .session import Capture, capture
from .unsupported import UnsupportedModelError, UnsupportedProbe
from . import torch_probes  # noqa: F401  (registers the nn.MultiheadAttention probe)

__all__ = ["Capture", "capture", "Probe", "CaptureError", "CaptureWarning", "register_probe", "unregister_probe",
           "add_provider", "probe_for", "supported_types", "UnsupportedModelError", "UnsupportedProbe"]


class _CallableModule(_types.ModuleType):
    """``esswatch.capture`` is both this package and the function: importing any
    ``esswatch.capture.*`` submodule rebinds ``esswatch.capture`` to the package, so the
    package itself forwards calls to :func:`capture`."""

    def __call__(self, *args, **kwargs) -> Capture:
        return capture(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
