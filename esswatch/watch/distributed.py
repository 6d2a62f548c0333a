"""Rank detection and the opt-in cross-rank average of a result's scalars.

The reduction is one ``all_reduce`` (sum) of a fixed-length vector whose layout
depends only on the configuration and the layer names (identical on every rank),
so ranks never disagree on the collective; the schedule is step-deterministic, so
all ranks call it on the same steps.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from .measure import STATS

__all__ = ["rank", "world_size", "reduce_layers"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def _device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_layers(
    layers: Dict[str, Dict[str, Any]], names: Sequence[str], metrics: Sequence[str], failures: int
) -> tuple:
    """Average every layer's scalar statistics over the ranks that measured it.

    Returns ``(layers, failures)``: layers measured on at least one rank (scalar statistics
    replaced by the cross-rank mean; per-index and per-head lists stay this rank's, and are
    filled from nowhere on ranks that did not measure the layer: those get only scalars),
    and the failure count summed over ranks.
    """
    if not _initialized() or world_size() == 1:
        return layers, failures
    width = len(metrics) * len(STATS)
    vec: List[float] = []
    for name in names:
        lay = layers.get(name)
        if lay is None:
            vec.extend([0.0] * (width + 1))
        else:
            vec.extend(float(lay[m][s]) for m in metrics for s in STATS)
            vec.append(1.0)
    vec.append(float(failures))
    t = torch.tensor(vec, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    t = t.cpu().tolist()
    out: Dict[str, Dict[str, Any]] = {}
    for j, name in enumerate(names):
        chunk = t[j * (width + 1) : (j + 1) * (width + 1)]
        count = chunk[-1]
        if count == 0:
            continue
        lay = dict(layers.get(name) or {})
        for a, m in enumerate(metrics):
            stats = dict(lay.get(m) or {})
            for b, s in enumerate(STATS):
                stats[s] = chunk[a * len(STATS) + b] / count
            lay[m] = stats
        lay["ranks"] = int(count)
        out[name] = lay
    return out, int(t[-1])
