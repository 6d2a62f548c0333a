"""Hook objects esswatch puts into a model: picklable, and never carried into copies.

Every hook esswatch registers on a module is wrapped (:func:`adopt`) in an :class:`EssHook`,
a module-level callable class, so that:

- ``pickle`` / ``torch.save(model)`` / ``spawn`` workers work on a watched model: an
  ``EssHook`` pickles as an :class:`InertHook`, which does nothing and removes itself from
  its module on the loaded model's first forward (the loaded model is not watched);
- ``copy.deepcopy(model)`` (EMA, ``torch.optim.swa_utils.AveragedModel``) gives the copy
  inert hooks too (never measured), and the original's ``close()`` / ``detach()`` removes
  them from the copy as well (the copy is found through deepcopy's memo).

Removing an esswatch hook only ever touches the hook dicts of a module, by the hook's id.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, List, Optional

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["EssHook", "InertHook", "adopt", "remove_hook_id"]

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def remove_hook_id(module: torch.nn.Module, key: int) -> None:
    """Drop hook ``key`` from every hook dict of ``module`` (ids are unique process-wide)."""
    for name in _HOOK_DICTS:
        d = module.__dict__.get(name)
        if d is not None:
            d.pop(key, None)


class InertHook:
    """What an esswatch hook becomes in a pickled or deep-copied model: does nothing and
    removes itself from the module it is called on."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        self.key = key

    def __call__(self, module, *args, **kwargs):
        if isinstance(module, torch.nn.Module):
            remove_hook_id(module, self.key)
        return None

    def __reduce__(self):
        return (InertHook, (self.key,))

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"esswatch.InertHook({self.key})"


class EssHook:
    """A live esswatch hook (see the module doc)."""

    __slots__ = ("fn", "key", "guard", "_module", "_copies", "__weakref__")

    def __init__(self, fn, key: int, module: Optional[torch.nn.Module], guard=None) -> None:
        self.fn = fn
        self.key = key
        self.guard = guard  # called with the exception of a raising hook, which then returns None (a probe's hooks)
        self._module = None if module is None else weakref.ref(module)
        self._copies: List[Any] = []  # weak references to deep copies of the module carrying an InertHook

    def __call__(self, *args, **kwargs):
        if self.guard is None:
            return self.fn(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a probe's bug never stops the user's forward
            self.guard(e)
            return None

    def __reduce__(self):
        return (InertHook, (self.key,))

    def __deepcopy__(self, memo):
        mod = None if self._module is None else self._module()
        dup = memo.get(id(mod)) if mod is not None else None
        if isinstance(dup, torch.nn.Module) and dup is not mod:
            self._copies.append(weakref.ref(dup))
        return InertHook(self.key)

    def remove_from_copies(self) -> None:
        copies, self._copies = self._copies, []
        for ref in copies:
            m = ref()
            if m is not None:
                remove_hook_id(m, self.key)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"esswatch.EssHook({getattr(self.fn, '__qualname__', self.fn)!r})"


def _owner(d: dict, modules: Iterable[torch.nn.Module]) -> Optional[torch.nn.Module]:
    for m in modules:
        for name in _HOOK_DICTS:
            if m.__dict__.get(name) is d:
                return m
    return None


def adopt(handles: Iterable[Any], model: Optional[torch.nn.Module], guard=None) -> List[EssHook]:
    """Wrap the hook behind each :class:`RemovableHandle` in ``handles`` into an :class:`EssHook`
    (in place: the handle still removes it). Other handle types are left alone. ``guard(exception)``: what a
    raising hook calls instead of propagating (``None``: it propagates)."""
    modules = list(model.modules()) if model is not None else []
    out = []
    for h in handles:
        if not isinstance(h, RemovableHandle):
            continue
        d = h.hooks_dict_ref()
        if d is None or h.id not in d:
            continue
        fn = d[h.id]
        if isinstance(fn, EssHook):
            out.append(fn)
            continue
        hook = EssHook(fn, h.id, _owner(d, modules), guard)
        d[h.id] = hook
        out.append(hook)
    return out
