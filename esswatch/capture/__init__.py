"""Capture: hooks that realize operators from modules during a forward pass."""
from .probe import CaptureError, CaptureWarning, Probe
from .registry import add_provider, probe_for, register_probe, supported_types, unregister_probe
from .session import Capture, capture
from . import torch_probes  # noqa: F401  (registers the nn.MultiheadAttention probe)

__all__ = ["Capture", "capture", "Probe", "CaptureError", "CaptureWarning", "register_probe", "unregister_probe",
           "add_provider", "probe_for", "supported_types"]
