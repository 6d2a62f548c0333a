"""How much memory an ESS call needs, checked before anything large is allocated.

:func:`estimate_bytes` is a deliberately simple upper-range model of the big buffers of one
call (the largest Hankel block and its SVD workspace, the float64 sketch copy, with gradients every
block's singular vectors; what materializing the blocks holds, the dense ``L x L`` operator, softmax scores
and, with gradients, their autograd graph, comes from the operator, ``Operator.materialize_bytes``, and so
do the Gramian route's buffers, ``Operator.gram_bytes``). :func:`check_memory`
compares it with the limit and raises :class:`ESSMemoryError` (a ``ValueError``) naming the
estimate, the limit and the knobs that shrink a call.

The limit: the environment variable ``ESSWATCH_MAX_BYTES`` (bytes, e.g. ``4e9``) when set;
otherwise half the memory available when the call starts (CPU: ``MemAvailable`` of
``/proc/meminfo``, or half the physical memory elsewhere; CUDA: the device's free memory).
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import torch

__all__ = ["ESSMemoryError", "ENV_VAR", "limit_bytes", "estimate_bytes", "check_memory"]

ENV_VAR = "ESSWATCH_MAX_BYTES"
#: fraction of the available memory one call may plan to use when ESSWATCH_MAX_BYTES is unset
DEFAULT_FRACTION = 0.5


class ESSMemoryError(ValueError):
    """An ESS call would need more memory than the limit (names the size, the limit, the knobs)."""


def _available_cpu() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return None


def limit_bytes(device: torch.device) -> Optional[int]:
    """The byte limit for a call on ``device`` (``None`` = unknown, no check)."""
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():
        try:
            v = float(env)
        except ValueError:
            v = float("nan")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{ENV_VAR} must be a positive number of bytes (e.g. 4e9), got {env!r}")
        return int(v)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except Exception:  # noqa: BLE001 - no limit rather than a failure
            return None
        return int(free * DEFAULT_FRACTION)
    if device.type == "cpu":
        avail = _available_cpu()
        return None if avail is None else int(avail * DEFAULT_FRACTION)
    return None


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e6:.3f} MB"


def estimate_bytes(
    batch: int,
    blocks: Iterable[int],
    itemsize: int,
    *,
    materialize: int = 0,
    sketch: bool = False,
    grad: bool = False,
) -> int:
    """Bytes of the big buffers of one call (see the module doc).

    Args:
        batch: matrices in the batch (product of the batch shape).
        blocks: the entries of each block that is cut and decomposed (its structural non-zero range: a window
            or a short kernel leaves most of ``H_i`` out; none on the Gramian route).
        itemsize: bytes per element of the compute dtype.
        materialize: what producing the blocks holds (``T``, the scores, their autograd graph: the operator's
            estimate, ``Operator.materialize_bytes``).
        sketch: the randomized estimator may run (a float64 copy of the block).
        grad: gradients flow: every block, its singular vectors and its gradient are kept until the backward
            pass (not only the largest block at a time).
    """
    blocks = list(blocks)
    total = int(materialize)
    if blocks:
        total += 2 * batch * max(blocks) * itemsize  # the block's copy + SVD workspace
        if sketch:
            total += batch * max(blocks) * 8
        if grad:
            total += 2 * batch * sum(blocks) * itemsize  # U and V of every block, kept for the backward pass
    return int(total)


def check_memory(nbytes: int, device: torch.device, what: str) -> None:
    """Raise :class:`ESSMemoryError` when ``nbytes`` exceeds :func:`limit_bytes`."""
    limit = limit_bytes(device)
    if limit is None or nbytes <= limit:
        return
    raise ESSMemoryError(
        f"{what} would need about {_mb(nbytes)} on {device}, more than the limit of {_mb(limit)} "
        f"({ENV_VAR} if set, else half the memory available). Measure fewer indices (indices=), fewer "
        "batch rows or heads (ESSWatch batch_rows= / heads=, or slice the operator), a shorter sequence or a "
        f"window, or raise the limit with {ENV_VAR}=<bytes>."
    )
