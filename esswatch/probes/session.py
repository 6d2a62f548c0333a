"""``Capture``: owns the probes and hooks of one model.

``with esswatch.capture(model) as cap: model(x)`` attaches every probe on entry,
arms them for the duration, and removes every hook on exit (also on exceptions).
The training-time watch uses the same object long-lived: :meth:`Capture.attach`
once, set ``armed`` only on sampled steps (the hooks are then a flag check), and
:meth:`Capture.detach` at the end. Removal is safe to repeat.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from ..engine.validation import check_positive_int
from ..operators import Operator
from .hooks import EssHook, adopt
from .probe import CaptureError, CaptureWarning, Probe
from .registry import probe_for, supported_types
from .unsupported import (
    HOW_TO_ADD,
    UnsupportedModelError,
    unprobed_mixers,
    unsupported_layers_warning,
    unsupported_model_message,
)

__all__ = ["Capture", "capture"]

# models with an attached Capture (weak: never keeps a model alive, never touches its attributes)
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, Capture]" = weakref.WeakKeyDictionary()
# the "already attached" check and the attach happen under this lock (two threads never both attach)
_ATTACH_LOCK = threading.RLock()

LayerSpec = Union[None, str, Iterable[str], Callable[[str, torch.nn.Module], bool]]


def _supported_text() -> str:
    return (
        f"{', '.join(supported_types()) or '(no registered types)'}; causal Hugging Face attention that "
        "calls transformers' attention-function registry, and MambaMixer / FalconMambaMixer / "
        "JambaMambaMixer / Mamba2Mixer (also the Mamba2 mixers of Bamba, Zamba2, GraniteMoeHybrid, NemotronH and "
        "FalconH1) and the Gated DeltaNet of Qwen3-Next and Qwen3.5, once `transformers` is imported"
    )


def _unsupported_message(model: torch.nn.Module, unsupported, prefix: str = "") -> str:
    """The error for a selection with nothing capturable: names the unsupported layers found
    or, when no provider recognised any, the modules that look like sequence mixers."""
    found = dict(unsupported) or unprobed_mixers(model, lambda m: probe_for(m) is not None)
    return unsupported_model_message(model, found, _supported_text(), prefix)


def _explicit_message(name: str, module: torch.nn.Module, reason: str) -> str:
    return (
        f"layers: {name!r} is a {type(module).__name__}, which esswatch cannot capture: {reason}. "
        f"{HOW_TO_ADD} Supported: {_supported_text()}."
    )


def _outermost(unsupported: Dict[str, Tuple[type, str]], probes: Dict[str, Probe]) -> Dict[str, Tuple[type, str]]:
    """``unsupported`` without the layers nested in another recognised layer (a recurrent layer's
    gate module inside its attention module is reported once, as that attention module)."""
    owners = [n for n in (*probes, *unsupported) if n]
    return {n: v for n, v in unsupported.items() if not any(n.startswith(o + ".") for o in owners)}


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

    Raises:
        UnsupportedModelError: (a ``ValueError``) no selected layer can be captured; names each
            sequence-mixing layer type found and why. When only some cannot, one
            ``CaptureWarning`` lists them, and ``unsupported`` holds
            ``{name: (module type, reason)}`` (see :mod:`esswatch.probes.unsupported`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: LayerSpec = None,
        *,
        batch_rows: Optional[int] = None,
        heads: Optional[int] = None,
        keep_graph: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"capture expects an nn.Module, got {type(model).__name__}")
        for nm, v in (("batch_rows", batch_rows), ("heads", heads)):
            check_positive_int(nm, v, allow_none=True)
        if not isinstance(keep_graph, bool):
            raise ValueError(f"keep_graph must be a bool, got {keep_graph!r}")
        if not (
            layers is None
            or callable(layers)
            or isinstance(layers, str)
            or (isinstance(layers, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in layers))
        ):
            raise ValueError(
                "layers must be None, a qualified module name, a list of names or a predicate "
                f"(name, module) -> bool, got {layers!r}"
            )
        self._model = weakref.ref(model)
        self.batch_rows = batch_rows
        self.heads = heads
        #: (rows, heads) kept instead while set: the watch's regularizer penalizes the rows the user kept
        #: and every head, whatever a budget or ``heads=`` cut from the measurement
        self.penalty_view: Optional[Tuple[Optional[int], Optional[int]]] = None
        self.keep_graph = keep_graph
        self.armed = False
        self._warned_cached = False
        self._handles: List = []
        self._hooks: List[EssHook] = []
        self.probes: Dict[str, Probe] = self._select(model, layers)

    # -- selection ---------------------------------------------------------------
    def _select(self, model, layers) -> Dict[str, Probe]:
        """Probes of the selected layers that can be captured; the others go to ``self.unsupported``
        (one rule: none capturable -> :class:`UnsupportedModelError`, some -> one warning)."""
        named = dict(model.named_modules())
        probes: Dict[str, Probe] = {}
        self.unsupported: Dict[str, Tuple[type, str]] = {}
        if layers is None or callable(layers):
            for name, mod in named.items():
                if callable(layers) and not layers(name, mod):
                    continue
                cls = probe_for(mod)
                if cls is None:
                    continue
                probe = cls(name, mod, self)
                reason = probe.unsupported_reason()
                if reason is None:
                    probes[name] = probe
                else:
                    self.unsupported[name] = (type(mod), reason)
            self.unsupported = _outermost(self.unsupported, probes)
            if not probes:
                prefix = "" if layers is None else "the `layers` predicate selected no supported layer: "
                raise UnsupportedModelError(_unsupported_message(model, self.unsupported, prefix))
        else:
            names = [layers] if isinstance(layers, str) else list(layers)
            if not names:
                raise ValueError("layers: an empty list selects nothing to watch (None selects every supported layer)")
            for name in names:
                if name not in named:
                    raise ValueError(f"layers: {type(model).__name__} has no submodule named {name!r}")
                cls = probe_for(named[name])
                if cls is None:
                    raise ValueError(
                        _explicit_message(name, named[name], "no esswatch probe is registered for its type")
                    )
                probe = cls(name, named[name], self)
                reason = probe.unsupported_reason()
                if reason is not None:
                    raise UnsupportedModelError(_explicit_message(name, named[name], reason))
                probes[name] = probe
        if self.unsupported:
            warnings.warn(
                unsupported_layers_warning(model, self.unsupported, len(probes)), CaptureWarning, stacklevel=4
            )
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
                    "`esswatch.capture(...)` block (or close the other ESSWatch) first"
                )
            handles, hooks = [], []
            try:
                for name, probe in self.probes.items():
                    try:
                        own = probe.attach()
                    except Exception as e:
                        raise CaptureError(
                            f"{name}: {type(probe).__name__}.attach() raised {type(e).__name__}: {e}"
                        ) from e
                    if not isinstance(own, (list, tuple)):
                        raise CaptureError(
                            f"{name}: {type(probe).__name__}.attach() must return a list of hook handles, got "
                            f"{type(own).__name__}"
                        )
                    handles.extend(own)
                    hooks += adopt(own, model, guard=probe.hook_failed)  # a raising hook never stops the forward
                self._hooks = hooks
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

    def note_cached_call(self, name: str) -> None:
        """Called by a probe when, while armed, its layer runs a call that continues a KV cache
        or cached state (a decoding step of ``generate()``): warns once per capture that only
        the prefill is measured. Host-side only (no device sync)."""
        if not self._warned_cached:
            self._warned_cached = True
            warnings.warn(
                f"esswatch: {name or '<model>'} ran a decoding step (a call that continues a KV cache or cached "
                "state, e.g. a step of generate()) while capture was armed: only the prefill (the first, "
                "full-sequence forward) is measured; decoding steps are not captured. Warned once.",
                CaptureWarning,
                stacklevel=4,
            )

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
