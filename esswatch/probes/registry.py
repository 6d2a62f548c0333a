"""Which probe captures which module.

Three ways, tried in this order:

1. :func:`register_probe` keyed by module type (subclasses match too);
2. the module defines ``esswatch_operator(self, args, kwargs, output)`` returning an
   operator: a generic forward-hook probe calls it (see :mod:`.protocol`);
3. providers added by integrations (:func:`add_provider`), e.g. Hugging Face
   attention. An integration announces itself in the ``esswatch.providers`` entry-point
   group (``pyproject.toml``): the entry point's *name* is the framework module it serves
   and its value the module that calls :func:`add_provider` on import. It is loaded only
   once that framework is imported, so ``import esswatch`` never imports ``transformers``,
   and this layer never names an integration.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Callable, Dict, List, Optional, Type

import torch

from .probe import Probe

__all__ = ["register_probe", "unregister_probe", "probe_for", "add_provider", "supported_types"]

_REGISTRY: Dict[type, Type[Probe]] = {}
_PROVIDERS: List[Callable[[torch.nn.Module], Optional[Type[Probe]]]] = []
#: the entry-point group in which integrations announce their providers
PROVIDER_GROUP = "esswatch.providers"
_LOADED_PROVIDERS: set = set()


def register_probe(module_type: type, probe_cls: Optional[Type[Probe]] = None):
    """Register ``probe_cls`` for ``module_type`` (usable as a class decorator on the probe)."""
    if probe_cls is None:

        def deco(cls):
            register_probe(module_type, cls)
            return cls

        return deco
    if not (isinstance(module_type, type) and issubclass(module_type, torch.nn.Module)):
        raise ValueError(f"register_probe: {module_type!r} is not an nn.Module subclass")
    if not (isinstance(probe_cls, type) and issubclass(probe_cls, Probe)):
        raise ValueError(f"register_probe: {probe_cls!r} is not a esswatch.probes.Probe subclass")
    _REGISTRY[module_type] = probe_cls
    return probe_cls


def unregister_probe(module_type: type) -> None:
    _REGISTRY.pop(module_type, None)


def add_provider(fn: Callable[[torch.nn.Module], Optional[Type[Probe]]]) -> None:
    """Add a function ``module -> probe class or None`` consulted after the type registry."""
    if fn not in _PROVIDERS:
        _PROVIDERS.append(fn)


def _load_lazy_providers() -> None:
    """Import every announced provider whose framework is already imported (once each)."""
    for ep in metadata.entry_points(group=PROVIDER_GROUP):
        key = (ep.name, ep.value)
        if ep.name in sys.modules and key not in _LOADED_PROVIDERS:
            _LOADED_PROVIDERS.add(key)
            ep.load()


def probe_for(module: torch.nn.Module) -> Optional[Type[Probe]]:
    """The probe class for ``module``, or ``None`` if it is not a supported sequence mixer."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    if callable(getattr(type(module), "esswatch_operator", None)):
        from .protocol import ProtocolProbe

        return ProtocolProbe
    _load_lazy_providers()
    for fn in _PROVIDERS:
        p = fn(module)
        if p is not None:
            return p
    return None


def supported_types() -> List[str]:
    """Names of the registered module types (for error messages and the README)."""
    _load_lazy_providers()
    return sorted({f"{t.__module__}.{t.__qualname__}" for t in _REGISTRY})
