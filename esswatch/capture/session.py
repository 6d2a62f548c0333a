"""``Capture``: owns the probes and hooks of one model.

``with esswatch.capture(model) as cap: model(x)`` attaches every probe on entry,
arms them for the duration, and removes every hook on exit (also on exceptions).
The training-time watch uses the same object long-lived: :meth:`Capture.attach`
once, set ``armed`` only on sampled steps (the hooks are then a flag check), and
:meth:`Capture.detach` at the end. Removal is safe to repeat.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch

from ..engine.validation import check_positive_int
from ..operators import Operator
from .hooks import EssHook, adopt
from .probe import Probe
from .registry import probe_for, supported_types

__all__ = ["Capture", "capture"]

# models with an attached Capture (weak: never keeps a model alive, never touches its attributes)
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, Capture]" = weakref.WeakKeyDictionary()
# the "already attached" check and the attach happen under this lock (two threads never both attach)
_ATTACH_LOCK = threading.RLock()

LayerSpec = Union[None, str, Iterable[str], Callable[[str, torch.nn.Module], bool]]


def _unsupported_message(model: torch.nn.Module) -> str:
    return (
        f"esswatch found no supported sequence-mixing layer in {type(model).__name__}. Supported: "
        f"{', '.join(supported_types()) or '(none registered)'}; Hugging Face attention (through the "
        "attention-function registry) and Mamba/Mamba2 mixers once `transformers` is imported. "
        "To add your own layer, register a probe with esswatch.capture.register_probe(ModuleType, ProbeClass) "
        "or give the module a method `esswatch_operator(self, args, kwargs, output)` returning an "
        "esswatch.operators operator (see the README, 'Custom layers').")


class Capture:
    """Probes on the sequence-mixing layers of ``model``.

    Args:
        model: the model.
        layers: ``None`` = every supported layer; a qualified name or list of names
            (each must exist and be supported); or a predicate ``(name, module) -> bool``.
        batch_rows: keep only the first ``batch_rows`` batch rows (``None`` = all).
        heads: keep only the first ``heads`` heads / channels per layer (``None`` = all).
        keep_graph: keep captured tensors attached to the autograd graph (the regularizer);
            detached by default.
    """

    def __init__(self, model: torch.nn.Module, layers: LayerSpec = None, *, batch_rows: Optional[int] = None,
                 heads: Optional[int] = None, keep_graph: bool = False) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"capture expects an nn.Module, got {type(model).__name__}")
        for nm, v in (("batch_rows", batch_rows), ("heads", heads)):
            check_positive_int(nm, v, allow_none=True)
        if not isinstance(keep_graph, bool):
            raise ValueError(f"keep_graph must be a bool, got {keep_graph!r}")
        if not (layers is None or callable(layers) or isinstance(layers, str)
                or (isinstance(layers, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in layers))):
            raise ValueError("layers must be None, a qualified module name, a list of names or a predicate "
                             f"(name, module) -> bool, got {layers!r}")
        self._model = weakref.ref(model)
        self.batch_rows = batch_rows
        self.heads = heads
        self.keep_graph = keep_graph
        self.armed = False
        self._handles: List = []
        self._hooks: List[EssHook] = []
        self.probes: Dict[str, Probe] = self._select(model, layers)

    # -- selection ---------------------------------------------------------------
    def _select(self, model, layers) -> Dict[str, Probe]:
        named = dict(model.named_modules())
        probes: Dict[str, Probe] = {}
        if layers is None or callable(layers):
            for name, mod in named.items():
                if callable(layers) and not layers(name, mod):
                    continue
                cls = probe_for(mod)
                if cls is not None:
                    probes[name] = cls(name, mod, self)
            if not probes:
                if layers is None:
                    raise ValueError(_unsupported_message(model))
                raise ValueError("the `layers` predicate selected no supported layer. " + _unsupported_message(model))
        else:
            names = [layers] if isinstance(layers, str) else list(layers)
            for name in names:
                if name not in named:
                    raise ValueError(f"layers: {type(model).__name__} has no submodule named {name!r}")
                cls = probe_for(named[name])
                if cls is None:
                    raise ValueError(
                        f"layers: {name!r} is a {type(named[name]).__name__}, which esswatch cannot capture. "
                        + _unsupported_message(model))
                probes[name] = cls(name, named[name], self)
        return probes

    # -- hooks -----------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "Capture":
        model = self._model()
        if model is None:
            raise ValueError("the model of this Capture no longer exists")
        with _ATTACH_LOCK:
            if model in _ACTIVE:
                raise RuntimeError(
                    f"esswatch capture is already attached to this {type(model).__name__}; exit the other "
                    "`esswatch.capture(...)` block (or close the other ESSWatch) first")
            handles = []
            try:
                for probe in self.probes.values():
                    handles.extend(probe.attach())
                self._hooks = adopt(handles, model)
            except Exception:
                for h in handles:
                    h.remove()
                raise
            self._handles = handles
            _ACTIVE[model] = self
        return self

    def _remove_hooks(self) -> None:
        """Disarm and remove every hook (idempotent), also the inert ones of deep copies; records are kept."""
        self.armed = False
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook.remove_from_copies()
        model = self._model()
        with _ATTACH_LOCK:
            if model is not None and _ACTIVE.get(model) is self:
                del _ACTIVE[model]

    def detach(self) -> None:
        """Remove every hook (idempotent) and drop all records."""
        self._remove_hooks()
        self.clear()

    def clear(self) -> None:
        for p in self.probes.values():
            p.clear()

    # -- results ---------------------------------------------------------------------
    @property
    def operators(self) -> Dict[str, Operator]:
        """Qualified name -> operator, for every probed layer that ran while armed."""
        return {n: p.operator() for n, p in self.probes.items() if p.has_record}

    @property
    def tss(self) -> Dict[str, Optional[int]]:
        """Qualified name -> theoretical state size per channel (``None`` = grows / unbounded)."""
        return {n: p.tss() for n, p in self.probes.items()}

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "Capture":
        self.attach()
        self.clear()
        self.armed = True
        return self

    def __exit__(self, *exc) -> None:
        self._remove_hooks()
        # records stay readable after the block (cap.operators); they are dropped with `cap`.


def capture(model: torch.nn.Module, layers: LayerSpec = None, **kwargs) -> Capture:
    """``with esswatch.capture(model, layers=None) as cap: model(batch)``; then ``cap.operators``."""
    return Capture(model, layers, **kwargs)
