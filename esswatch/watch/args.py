"""Validation of :class:`~esswatch.ESSWatch` arguments that no other component checks
(``ValueError`` naming the argument and what is allowed; raised before anything is attached)."""
from __future__ import annotations

import os
from typing import Any

__all__ = ["check_watch_args"]


def check_watch_args(*, logdir: Any, images: Any, histograms: Any) -> None:
    if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
        raise ValueError(f"logdir must be a path (str or os.PathLike) or None, got {type(logdir).__name__}")
    if not isinstance(histograms, bool):
        raise ValueError(f"histograms must be a bool, got {histograms!r}")
    if not isinstance(images, (bool, int)) or (not isinstance(images, bool) and images < 0):
        raise ValueError(f"images must be a bool or an int >= 0 (every n-th sampled step), got {images!r}")
