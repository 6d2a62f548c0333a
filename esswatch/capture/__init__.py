"""Capture: hooks that realize operators from modules during a forward pass."""
from .probe import CaptureError, Probe
from .registry import add_provider, probe_for, register_probe, supported_types, unregister_probe
from .session import Capture, capture

__all__ = ["Capture", "capture", "Probe", "CaptureError", "register_probe", "unregister_probe",
           "add_provider", "probe_for", "supported_types"]
