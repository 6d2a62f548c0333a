"""Large CPU buffers backed by transparent huge pages where Linux offers them.

A fresh ``L x L`` operator is tens of MB (4 heads at L = 2048 in float32: 64 MiB). On Linux its
pages are mapped on first touch, one 4 KiB page fault at a time; on the virtual machines this
project measures on, that first touch cost more than the product that fills it (a fresh
``q @ k^T`` of that size: about 51 ms, into a touched buffer: 17 ms, a throwaway script).
Advising the kernel that the range may use huge pages (``madvise(MADV_HUGEPAGE)``: 2 MiB pages,
512 times fewer faults) brought that product to about 21 ms, and ``SoftmaxAttention.dense()``
from 0.065 s to 0.042 s (``examples/benchmarks/materialize.py``). PyTorch's own switch for this,
the environment variable ``THP_MEM_ALLOC_ENABLE``, is read once per process, so a library cannot
set it for its users.

:func:`empty` is ``torch.empty`` plus that advice for CPU buffers of at least ``HUGE_MIN_BYTES``
on Linux. It changes no value, only how the kernel backs the memory; it is skipped where the
kernel disables transparent huge pages (``never``) or the call fails, and does nothing on other
platforms and devices.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional, Sequence

import torch

__all__ = ["HUGE_MIN_BYTES", "empty"]

#: CPU buffers at least this large get the huge-page advice (a huge page is 2 MiB)
HUGE_MIN_BYTES = 4 * 2**20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_PAGE = 4096


@functools.lru_cache(maxsize=1)
def _madvise() -> Optional[object]:
    """libc's ``madvise`` (``None`` off Linux, where libc lacks it, or where THP is ``never``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; a large CPU buffer is advised to use
    transparent huge pages before anything touches it (module doc). Never raises for the advice."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if out.device.type != "cpu" or nbytes < HUGE_MIN_BYTES:
        return out
    madvise = _madvise()
    if madvise is not None:
        start = out.data_ptr()
        first, end = (start + _PAGE - 1) // _PAGE * _PAGE, (start + nbytes) // _PAGE * _PAGE
        madvise(first, end - first, _MADV_HUGEPAGE)  # a failure (e.g. EINVAL) leaves plain pages
    return out
