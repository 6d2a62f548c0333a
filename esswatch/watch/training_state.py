"""Save and restore what a forward pass may change, for the probe-batch measurement.

:func:`preserved` restores on exit: every module's train/eval flag, the CPU and
(initialized) CUDA RNG states, and every buffer (BatchNorm running statistics,
counters) by value, also when a module replaced a buffer object.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch

__all__ = ["preserved"]


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    modes: List[Tuple[torch.nn.Module, bool]] = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_rng = torch.cuda.get_rng_state_all()
    with torch.no_grad():
        buffers = [(m, name, b, b.clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, ref, saved in buffers:
                if m._buffers.get(name) is not ref:
                    m._buffers[name] = ref
                ref.copy_(saved)
        for m, flag in modes:
            m.training = flag
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
