"""The snapshot of a step's captured tensors that :mod:`esswatch.watch.background`'s worker measures.

Its :func:`snapshot` copies a step's records off the autograd graph (``detach`` + a
copy, so that neither the optimizer's in-place updates nor the allocator can change
what the worker reads). CUDA tensors are copied on a side stream that first waits for
the training stream (``"device"``: a ``clone`` on the side stream, and
``record_stream`` on the source so its memory is not reused before the copy ran) or
into pinned host memory with a non-blocking copy (``"host"``); either way the
training thread only enqueues work and never synchronizes. A CUDA event recorded on
the side stream after the copies marks them done.

:func:`make_copier` makes the copier (its side streams are reused from sample to sample).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

import torch

from ..operators import Operator

__all__ = ["TRANSFERS", "snapshot", "make_copier"]

#: how CUDA tensors are handed to the worker: kept on the GPU (side-stream clone) or pinned host memory
TRANSFERS = ("device", "host")


class _Copier:
    def __init__(self, transfer: str) -> None:
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
        self.transfer = transfer
        self.streams: Dict[torch.device, Any] = {}

    def stream(self, device: torch.device):
        s = self.streams.get(device)
        if s is None:
            s = self.streams[device] = torch.cuda.Stream(device=device)
        return s

    def tensor(self, t: torch.Tensor, used: Dict[torch.device, Any]) -> torch.Tensor:
        t = t.detach()
        if not t.is_cuda:
            return t.clone()
        side = self.stream(t.device)
        if t.device not in used:
            side.wait_stream(torch.cuda.current_stream(t.device))  # the producer's kernels first
            used[t.device] = side
        with torch.cuda.stream(side):
            if self.transfer == "host":
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                out.copy_(t, non_blocking=True)
            else:
                out = t.clone()
        t.record_stream(side)  # keep the source's memory until the side stream read it
        return out

    def copy(self, obj: Any, used: Dict[torch.device, Any]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, used)
        if isinstance(obj, dict):
            return {k: self.copy(v, used) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.copy(v, used) for v in obj)
        if isinstance(obj, Operator):
            new = copy.copy(obj)
            new.__dict__.update({k: self.copy(v, used) for k, v in obj.__dict__.items()})
            return new
        return obj


def snapshot(obj: Any, copier: _Copier) -> Tuple[Any, Any, Any]:
    """``(copy, ready_event, stream)``: ``obj`` (tensors, dicts, lists, operators) with every
    tensor detached and copied. ``ready_event``/``stream`` are ``None`` without CUDA tensors."""
    used: Dict[torch.device, Any] = {}
    out = copier.copy(obj, used)
    if not used:
        return out, None, None
    device, side = next(iter(used.items()))
    for other in list(used.values())[1:]:  # several devices: one event after all copies
        side.wait_stream(other)
    ev = torch.cuda.Event()
    ev.record(side)
    return out, ev, side


def make_copier(transfer: str = "device") -> _Copier:
    return _Copier(transfer)
