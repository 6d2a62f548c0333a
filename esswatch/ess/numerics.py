"""The numerical environment of one functional-API call: autocast off, denormals flushed on
CPU, and a private random generator (the global RNG stream is never drawn from)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["flush_denormal_enabled", "numerics", "default_generator"]

#: the seed of the private generator used when the caller passes none
DEFAULT_SEED = 0x5EED


def flush_denormal_enabled() -> bool:
    """Read the CPU flush-to-zero state (torch has a setter, no getter)."""
    tiny = torch.tensor([torch.finfo(torch.float32).tiny], dtype=torch.float32)
    return bool((tiny / 4 == 0).item())


@contextlib.contextmanager
def numerics(device: torch.device):
    """Autocast off (spectral code never runs in half precision) and, on CPU, denormals
    flushed to zero for the duration: LAPACK's SVD creates denormal intermediates on
    peaked operators (trained attention) and runs up to 50x slower on them. Values below
    1e-38 do not move an entropy-ESS. The previous flush-to-zero state is restored.
    """
    kinds = {"cpu", device.type} if device.type in ("cuda", "cpu", "xpu", "mps") else {"cpu"}
    was_ftz = flush_denormal_enabled()
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            try:
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
            except RuntimeError:  # pragma: no cover - device without autocast support
                pass
        if not was_ftz:
            torch.set_flush_denormal(True)
        try:
            yield
        finally:
            if not was_ftz:
                torch.set_flush_denormal(False)


def default_generator(device: torch.device) -> torch.Generator:
    """A private, fixed-seed generator: the estimator never draws from (or advances) the global
    RNG stream."""
    g = torch.Generator(device=device)
    g.manual_seed(DEFAULT_SEED)
    return g
