"""Input validation shared by the functional API and the operators (raises ``ValueError``)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

__all__ = [
    "check_finite",
    "check_indices",
    "check_positive_int",
    "check_finite_number",
    "check_not_meta",
    "broadcast_batch",
]


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or Inf (one host sync). A finite sum in ``t``'s dtype proves it (one
    pass without a buffer the size of ``t``: on one CPU thread about 15x faster than ``isfinite``); a sum that
    is not finite (NaN or Inf entries, or an overflow) is checked entry by entry."""
    if t.is_floating_point() and bool(torch.isfinite(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} Inf); ESS is undefined")


def check_not_meta(t: Any, what: str) -> None:
    if isinstance(t, torch.Tensor) and t.device.type == "meta":
        raise ValueError(f"{what} is a meta-device tensor (shape only, no values); ESS needs real values")


def check_positive_int(name: str, v: Any, *, allow_none: bool = False, minimum: int = 1) -> Optional[int]:
    """``v`` as an int ``>= minimum`` (bools rejected), or ``None`` when allowed."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {v!r}")
    return int(v)


def check_finite_number(name: str, v: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``v`` as a finite float (bools rejected), optionally ``> 0`` / ``>= 0``."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok and positive:
        ok = v > 0
    if ok and nonnegative:
        ok = v >= 0
    if not ok:
        kind = (
            "a finite positive number"
            if positive
            else "a finite non-negative number"
            if nonnegative
            else "a finite number"
        )
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    return float(v)


_INDEX_HELP = "None (all), an int, or a sequence of ints in 1..L-1 (list, tuple, NumPy array or int tensor)"


def check_indices(indices, seq_len: int) -> torch.Tensor:
    """Normalize ``indices`` to a 1-D int64 CPU tensor in ``1..L-1`` (order as given)."""
    if seq_len < 2:
        raise ValueError(f"ESS needs a sequence length of at least 2, got L={seq_len}")
    if indices is None:
        return torch.arange(1, seq_len, dtype=torch.int64)
    if isinstance(indices, torch.Tensor) or hasattr(indices, "__array__"):
        if isinstance(indices, torch.Tensor):
            check_not_meta(indices, "indices")
            idx = indices
        else:
            try:
                idx = torch.as_tensor(indices)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"indices must be {_INDEX_HELP}; got {indices!r}") from e
        if idx.numel() == 0:
            raise ValueError(f"indices is empty: pass {_INDEX_HELP}")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.dim() > 1:  # the result's last dim has one entry per index: a nested shape has no place there
            raise ValueError(f"indices must be 0-d or 1-D, got shape {tuple(idx.shape)}")
        items = idx.to(device="cpu", dtype=torch.int64).reshape(-1).tolist()
    elif isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        items = [indices]
    elif isinstance(indices, (list, tuple, range)):
        items = list(indices)
        if not items:
            raise ValueError(f"indices is empty: pass {_INDEX_HELP}")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"indices must be integers; got {v!r} ({type(v).__name__}) in {list(indices)[:8]!r}")
    else:
        raise ValueError(f"indices must be {_INDEX_HELP}; got {type(indices).__name__} {indices!r:.80}")
    bad = [int(v) for v in items if not 1 <= v <= seq_len - 1]
    if bad:
        raise ValueError(
            f"indices must lie in 1..L-1 = 1..{seq_len - 1} (0-based position of the first "
            f"future output); got {bad[:8]}"
        )
    return torch.tensor([int(v) for v in items], dtype=torch.int64)


def broadcast_batch(*shapes) -> torch.Size:
    """The broadcast of leading (batch) shapes, in plain Python.

    ``torch.broadcast_shapes`` imports ``torch.fx.experimental.symbolic_shapes`` (and with it
    SymPy, seconds and tens of MB) on its first call; operators are built on every sampled
    step, so they use this instead. Raises ``RuntimeError`` like torch when shapes clash.
    """
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        for j, d in enumerate(s, start=ndim - len(s)):
            d = int(d)
            if d == out[j] or d == 1:
                continue
            if out[j] != 1:
                raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
            out[j] = d
    return torch.Size(out)
