"""Input validation shared by the functional API (raises ``ValueError``)."""
from __future__ import annotations

import torch


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or Inf (one host sync)."""
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} Inf); ESS is undefined")


def check_indices(indices, seq_len: int) -> torch.Tensor:
    """Normalize ``indices`` to a sorted-as-given 1-D int64 CPU tensor in ``1..L-1``."""
    if seq_len < 2:
        raise ValueError(f"ESS needs a sequence length of at least 2, got L={seq_len}")
    if indices is None:
        return torch.arange(1, seq_len, dtype=torch.int64)
    if isinstance(indices, int):
        indices = [indices]
    idx = torch.as_tensor(indices)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.to(device="cpu", dtype=torch.int64).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("indices is empty")
    bad = (idx < 1) | (idx > seq_len - 1)
    if bool(bad.any()):
        raise ValueError(
            f"indices must lie in 1..L-1 = 1..{seq_len - 1} (0-based position of the first "
            f"future output); got {idx[bad].tolist()[:8]}")
    return idx
