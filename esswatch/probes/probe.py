"""``Probe``: realizes one module's operator from what it computed in a forward pass.

A probe owns the hooks it registers (returned by :meth:`Probe.attach` and removed
by the :class:`~esswatch.probes.Capture` that owns it) and stores the tensors
one forward call produced in a *record*. Its :meth:`build` turns a record into an
operator of :mod:`esswatch.operators`. Probes never set attributes on the module.

Hot-path contract (hooks run on every training step):

- a hook first checks :meth:`Probe.wants_record` (armed, and nothing recorded yet in this
  armed window) and returns immediately when it is False (nothing else runs);
- no host syncs (no ``.item()``, ``bool(tensor)``, ``.cpu()``, printing) inside
  hooks: only slicing, ``.detach()`` and storing references;
- :meth:`record` slices batch rows / heads as configured and detaches unless
  the session keeps the graph (the regularizer asks for that).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..engine.validation import check_positive_int
from ..operators import Operator

__all__ = ["Probe", "CaptureError", "CaptureWarning", "NothingToMeasure", "PADDING_WARNING"]

#: what a probe of an attention layer warns, once, when a captured batch is padded (after ``esswatch: <layer>: ``)
PADDING_WARNING = (
    "padded batch: padded positions are zero rows and columns of the operator, so ESS at index i mixes "
    "different token positions across differently padded rows (and the geometric bound min(i, L-i) is that "
    "of the full length)."
)

#: the key of a record that holds a hook's exception instead (:meth:`Probe.hook_failed`)
_HOOK_ERROR = "_esswatch_hook_error"

_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


class CaptureError(RuntimeError):
    """Raised when a layer cannot be captured faithfully (names the layer)."""


class CaptureWarning(UserWarning):
    """Warned when a layer is skipped because its call cannot be captured faithfully (names the layer)."""


class NothingToMeasure(Exception):
    """Every kept batch row of a record is padding (:meth:`Probe.realize_rows`): like a sequence of length 1, the
    watch skips the layer for that step silently (not a failure)."""


class Probe:
    """Base class; subclasses implement :meth:`attach` and :meth:`build`.

    Attributes:
        layer_type: a short human name of the layer family (README, messages).
        name: qualified module name in the model.
        session: the owning :class:`~esswatch.probes.Capture` (config + ``armed`` flag).
    """

    layer_type: str = "layer"
    #: what a raising hook is called in the layer's failure (``None``: "<probe class>'s hook")
    hook_what: Optional[str] = None

    def __init__(self, name: str, module: torch.nn.Module, session) -> None:
        self.name = name
        self._module = weakref.ref(module)
        self.session = session
        self._record: Optional[Dict[str, Any]] = None

    # -- to implement ----------------------------------------------------------
    def attach(self) -> List[Any]:
        """Register hooks on the module; return their handles (objects with ``.remove()``)."""
        raise NotImplementedError

    def build(self, record: Dict[str, Any]) -> Operator:
        """Turn one record into an operator with leading dims ``(batch, head or channel)``."""
        raise NotImplementedError

    def tss(self) -> Optional[int]:
        """The layer's theoretical state size per channel (``None`` = grows / unbounded)."""
        return None

    def unsupported_reason(self) -> Optional[str]:
        """Why this layer cannot be captured, decided from the module alone (``None`` = it can).

        Asked once when a :class:`~esswatch.probes.Capture` selects layers; a layer with a
        reason is not attached and is reported (see :mod:`esswatch.probes.unsupported`)."""
        return None

    # -- helpers for subclasses -----------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        m = self._module()
        if m is None:  # pragma: no cover - the model was garbage collected
            raise CaptureError(f"{self.name}: the module no longer exists")
        return m

    def wants_record(self) -> bool:
        """True when armed and no record was taken yet in this armed window (first call wins)."""
        return self.session.armed and self._record is None

    def view(self) -> Tuple[Optional[int], Optional[int]]:
        """The ``(batch rows, heads)`` a record keeps (``None``: all); the regularizer's forward keeps its own."""
        view = self.session.penalty_view
        return view if view is not None else (self.session.batch_rows, self.session.heads)

    def keep(self, x: Optional[torch.Tensor], head_dim: Optional[int] = None) -> Optional[torch.Tensor]:
        """Slice batch rows (dim 0) and heads/channels (``head_dim``), detach unless the graph is kept."""
        if x is None:
            return None
        rows, heads = self.view()
        if rows is not None and x.dim() > 0:
            x = x[:rows]
        if heads is not None and head_dim is not None:
            x = x.narrow(head_dim, 0, min(heads, x.shape[head_dim]))
        if not self.session.keep_graph:
            x = x.detach()
        elif _compiling():  # a view of an intermediate kept as a graph output trips AOTAutograd's alias replay
            x = x.clone()
        return x

    def record(self, **tensors: Any) -> None:
        """Store one forward call's tensors (already sliced with :meth:`keep`)."""
        self._record = tensors

    # -- used by Capture -------------------------------------------------------
    @property
    def has_record(self) -> bool:
        return self._record is not None

    @property
    def recorded(self) -> Optional[Dict[str, Any]]:
        """The record of the last armed forward (``None`` if none); :meth:`build` turns it into
        the operator (the watch copies it to build it on its worker thread)."""
        return self._record

    def operator(self) -> Optional[Operator]:
        """The operator of the last record (``None`` if none), see :meth:`realize`."""
        if self._record is None:
            return None
        return self.realize(self._record)

    def hook_failed(self, error: BaseException) -> None:
        """One of this probe's hooks raised ``error`` (a bug in the probe): the forward goes on, and the record
        holds the error instead, so that building the operator raises a :class:`CaptureError` naming the layer
        (inside the watch a layer failure: one warning, counted, ``strict=True`` raises)."""
        self._record = {_HOOK_ERROR: error}  # raised when the operator is built: a layer failure (counted, warned)

    def valid_rows(self, record: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Whether each kept batch row of ``record`` holds a real token (bool, one per row), or ``None``: all do, or
        the probe cannot tell. Probes of layers that see a padding mask override it."""
        return None

    def realize_rows(self, record: Dict[str, Any]) -> Optional[Operator]:
        """:meth:`realize`, without the batch rows that are all padding (:meth:`valid_rows`): what the watch
        measures and penalizes (such a row's operator is zero, so its ESS, 0, says nothing about the layer). Raises
        :class:`NothingToMeasure` when no row is left. One host sync where a mask is recorded (off the hooks)."""
        op = self.realize(record)
        valid = self.valid_rows(record)
        if op is None or valid is None:
            return op
        valid = valid.reshape(-1).to(torch.bool)
        if bool(valid.all()):
            return op
        if not bool(valid.any()):
            raise NothingToMeasure(f"{self.name}: every kept batch row is padding")
        return op.selected_rows(valid.nonzero().flatten())

    def realize(self, record: Dict[str, Any]) -> Optional[Operator]:
        """:meth:`build` the operator of ``record``; when the operator has no ``state_size`` of its own, it gets the
        layer's :meth:`tss` (a positive int, else a ``ValueError`` naming the layer). So the TSS has one source
        downstream, the operator's ``state_size`` (read by ``Operator.tss``, the logs and the regularizer)."""
        err = record.get(_HOOK_ERROR)
        if err is not None:
            what = self.hook_what or f"{type(self).__name__}'s hook"
            raise CaptureError(f"{self.name}: {what} raised {type(err).__name__}: {err}") from err
        op = self.build(record)
        tss = None if op is None else self.tss()
        if tss is not None:  # validated also where the operator's own state size wins
            tss = check_positive_int(f"{self.name}: the layer's theoretical state size (tss)", tss)
            if op.state_size is None:
                op = copy.copy(op)  # never change an operator a module handed us
                op.state_size = tss
        return op

    def clear(self) -> None:
        self._record = None
