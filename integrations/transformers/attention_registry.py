"""Listening to transformers' attention-function registry without changing the kernel.

Hugging Face attention modules look their kernel up at every call::

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask,
                                                    scaling=..., dropout=..., **kwargs)

While at least one listener is registered, :class:`AttentionInterface`'s ``get_interface``
and ``__getitem__`` return a thin wrapper around the function they would have returned
(sdpa, flash, flex, a user kernel, or the model's own eager function). The wrapper calls
``listener.on_attention(query, key, value, attention_mask, kwargs)`` for the listeners of
the module passed as first argument that want the call (``listener.wants_call()``), then
calls the original function with the original arguments, unchanged. When the last listener is removed the two class
attributes are restored exactly (deleted again where they were inherited).

Nothing is set on modules or configs; listeners are held in a weak-keyed table.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Tuple

__all__ = ["listen", "is_installed", "original_function"]

_MISSING = object()
_PATCHED = ("get_interface", "__getitem__")

_lock = threading.RLock()
# id(module) -> (weak reference to the module, its listeners); any object may be passed as `module`
_listeners: Dict[int, Tuple["weakref.ref", List[Any]]] = {}
_wrappers: Dict[Callable, Callable] = {}
_count = 0
_saved: Dict[str, Any] = {}
_installed: Dict[str, Callable] = {}


def _attention_interface_class():
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface


def original_function(fn: Callable) -> Callable:
    """The function a recording wrapper stands for (``fn`` itself when it is not a wrapper)."""
    return getattr(fn, "__esswatch_original__", fn)


def _split_args(args, kwargs):
    """``(query, key, value, attention_mask)`` from an attention-function call (after ``module``)."""
    names = ("query", "key", "value", "attention_mask")
    vals = list(args[:4]) + [kwargs.get(n) for n in names[len(args[:4]) :]]
    return vals


def _recording(fn):
    """The (cached) recording wrapper of an attention function; non-callables pass through."""
    if not callable(fn) or hasattr(fn, "__esswatch_original__"):
        return fn
    w = _wrappers.get(fn)
    if w is not None:
        return w

    @functools.wraps(fn)
    def wrapper(module, *args, **kwargs):
        entry = _listeners.get(id(module))
        if entry is not None and entry[0]() is module:
            for listener in entry[1]:
                if listener.wants_call():
                    q, k, v, mask = _split_args(args, kwargs)
                    listener.on_attention(q, k, v, mask, kwargs)
        return fn(module, *args, **kwargs)

    wrapper.__esswatch_original__ = fn
    _wrappers[fn] = wrapper
    return wrapper


def _install() -> None:
    cls = _attention_interface_class()
    orig_get_interface = cls.get_interface
    orig_getitem = cls.__getitem__

    def get_interface(self, attn_implementation, default):
        return _recording(orig_get_interface(self, attn_implementation, default))

    def __getitem__(self, key):
        return _recording(orig_getitem(self, key))

    new = {"get_interface": get_interface, "__getitem__": __getitem__}
    for name in _PATCHED:
        _saved[name] = cls.__dict__.get(name, _MISSING)
        setattr(cls, name, new[name])
        _installed[name] = new[name]


def _uninstall() -> None:
    cls = _attention_interface_class()
    for name in _PATCHED:
        current = cls.__dict__.get(name, _MISSING)
        if current is not _installed.get(name):
            warnings.warn(
                f"esswatch: transformers.AttentionInterface.{name} was replaced by someone else while "
                "esswatch was capturing; leaving the new one in place",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        saved = _saved.get(name, _MISSING)
        if saved is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, saved)
    _saved.clear()
    _installed.clear()
    _wrappers.clear()


def is_installed() -> bool:
    """True while the registry is wrapped (some listener is registered)."""
    return _count > 0


class _Handle:
    """Removes one listener; the last removal restores the registry. Safe to call twice."""

    def __init__(self, key: int, listener) -> None:
        self._key = key
        self._listener = listener
        self._removed = False

    def remove(self) -> None:
        global _count
        with _lock:
            if self._removed:
                return
            self._removed = True
            entry = _listeners.get(self._key)
            if entry is not None:
                entry[1][:] = [x for x in entry[1] if x is not self._listener]
                if not entry[1]:
                    del _listeners[self._key]
            self._listener = None
            _count -= 1
            if _count == 0:
                _uninstall()


def listen(module, listener) -> _Handle:
    """Call ``listener.on_attention(...)`` when ``module`` calls a registry attention function.

    ``listener`` has ``wants_call() -> bool`` (checked first, on every call) and
    ``on_attention(query, key, value, attention_mask, kwargs)``. Returns a handle
    whose ``remove()`` unregisters it (reference-counted across listeners).
    """
    global _count
    with _lock:
        if _count == 0:
            _install()
        _count += 1
        key = id(module)
        entry = _listeners.get(key)
        if entry is None or entry[0]() is not module:  # new, or a dead module's id reused
            entry = (weakref.ref(module), [])
            _listeners[key] = entry
        entry[1].append(listener)
        return _Handle(key, listener)
