"""Layers esswatch recognises but cannot capture, and the one rule for them.

A probe says at selection time that its layer cannot be captured by returning a reason
from :meth:`~esswatch.probes.Probe.unsupported_reason` (:class:`UnsupportedProbe` always
does: providers return a subclass of it for a sequence-mixing layer they recognise but
cannot capture, e.g. bidirectional attention or attention that bypasses transformers'
attention registry). :class:`~esswatch.probes.Capture` never attaches such a probe; it
keeps the layer in ``Capture.unsupported`` and, on construction (so also when an
``ESSWatch`` or a framework callback is set up):

- if **no** layer of the model can be captured, raises :class:`UnsupportedModelError`
  naming each unsupported layer type found and why, and how to add a probe;
- if **some** can, warns once (:class:`~esswatch.probes.CaptureWarning`) listing the
  layers left out and why; the others are measured.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Tuple

import torch

from .probe import CaptureError, Probe

__all__ = [
    "UnsupportedModelError",
    "UnsupportedProbe",
    "HOW_TO_ADD",
    "describe_unsupported",
    "unsupported_model_message",
    "unsupported_layers_warning",
    "unprobed_mixers",
]

#: how a user adds a probe (every message about unsupported layers ends with it)
HOW_TO_ADD = (
    "To measure a layer type esswatch does not support, register a probe for it with "
    "esswatch.probes.register_probe(ModuleType, ProbeClass), or give the module a method "
    "`esswatch_operator(self, args, kwargs, output)` that returns an esswatch.operators operator "
    "(README.md, section 'Custom layers')."
)

#: class names that look like sequence mixers (only used to name candidates in an error message)
_MIXER_NAME = re.compile(r"(Attention|Attn|Mixer|SSM|Mamba|Retention|Recurren|RNN|LSTM|GRU|Hyena|RWKV)")
#: ... unless the name says it is a block's norm or feed-forward part (xLSTM's ``xLSTMRMSNorm``, ...)
_NOT_MIXER_NAME = re.compile(r"(Norm|FeedForward|MLP|FFN)$")


class UnsupportedModelError(ValueError):
    """No layer of the model can be captured. The message names each sequence-mixing layer
    type found that esswatch cannot capture, why, and how to add a probe."""


class UnsupportedProbe(Probe):
    """Stands for a recognised sequence-mixing layer that esswatch cannot capture.

    Subclasses set :attr:`reason` (or override :meth:`unsupported_reason`). Never attached,
    never records.
    """

    layer_type = "sequence-mixing layer esswatch cannot capture"
    reason = "esswatch cannot capture this layer"

    def unsupported_reason(self) -> str:
        return self.reason

    def attach(self) -> List[Any]:
        return []

    def build(self, record: Dict[str, Any]):  # pragma: no cover - never records
        raise CaptureError(f"{self.name}: {self.unsupported_reason()}")


def _type_name(t: type) -> str:
    return f"{t.__qualname__} ({t.__module__})"


def describe_unsupported(unsupported: Dict[str, Tuple[type, str]], limit: int = 4) -> str:
    """One line per (type, reason): ``- Type (module), n layers (a, b, ...): reason``."""
    groups: Dict[Tuple[type, str], List[str]] = {}
    for name, (t, reason) in unsupported.items():
        groups.setdefault((t, reason), []).append(name or "<model>")
    lines = []
    for (t, reason), names in groups.items():
        shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
        n = f"{len(names)} layer{'s' if len(names) != 1 else ''}"
        lines.append(f"  - {_type_name(t)}, {n} ({shown}): {reason}")
    return "\n".join(lines)


def unprobed_mixers(
    model: torch.nn.Module, has_probe: Callable[[torch.nn.Module], bool]
) -> Dict[str, Tuple[type, str]]:
    """Modules without a probe (``has_probe`` False) that look like sequence mixers
    (``torch.nn`` RNNs, class names such as ``...Attention`` / ``...Mixer``), innermost ones
    only: candidates to name in the error for a model with nothing capturable."""
    hits = {
        n: m
        for n, m in model.named_modules()
        if (
            isinstance(m, torch.nn.RNNBase)
            or (_MIXER_NAME.search(type(m).__name__) and not _NOT_MIXER_NAME.search(type(m).__name__))
        )
        and not has_probe(m)
    }
    out = {}
    for name, mod in hits.items():
        inner = any(o is not mod and any(o is s for s in mod.modules()) for o in hits.values())
        if not inner:
            out[name] = (type(mod), "no esswatch probe is registered for this module type")
    return out


def unsupported_model_message(
    model: torch.nn.Module, unsupported: Dict[str, Tuple[type, str]], supported: str, prefix: str = ""
) -> str:
    """The :class:`UnsupportedModelError` message."""
    head = f"{prefix}esswatch found no supported sequence-mixing layer in {type(model).__name__}"
    if unsupported:
        body = ". These sequence-mixing layers cannot be captured:\n" + describe_unsupported(unsupported) + "\n"
    else:
        body = " (and no module that looks like a sequence mixer). "
    return f"{head}{body}{HOW_TO_ADD} Supported: {supported}."


def unsupported_layers_warning(
    model: torch.nn.Module, unsupported: Dict[str, Tuple[type, str]], n_captured: int
) -> str:
    """The one warning for a model with some capturable and some unsupported layers."""
    return (
        f"esswatch: {len(unsupported)} sequence-mixing layer{'s' if len(unsupported) != 1 else ''} of "
        f"{type(model).__name__} cannot be captured and will not be measured (the other {n_captured} "
        f"will be):\n{describe_unsupported(unsupported)}\n{HOW_TO_ADD}"
    )
