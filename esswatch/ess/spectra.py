"""The singular values of one call's exact entries, kept as the routes return them: whole groups of indices
stacked (``batch + (n, w)``, the Gramian route's one tensor for all its indices) and single indices
(``batch + (k,)``), so that a metric of all of them takes one batched pass per group, not a Python step per
index (``indices="all"`` at L = 2048 has 2,047 of them)."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

__all__ = ["Spectra"]


class Spectra:
    """Singular values by index (each index once): :meth:`add` one, :meth:`add_group` many stacked,
    :meth:`table` a metric of all of them."""

    def __init__(self):
        self._groups: List[Tuple[List[int], torch.Tensor]] = []
        self._single: Dict[int, torch.Tensor] = {}

    def add(self, i: int, sv: torch.Tensor) -> None:
        self._single[i] = sv

    def update(self, svs: Dict[int, torch.Tensor]) -> None:
        self._single.update(svs)

    def add_group(self, keys: List[int], sv: torch.Tensor) -> None:
        """``sv``: ``batch + (len(keys), w)``, row ``j`` the singular values of index ``keys[j]``."""
        if keys:
            self._groups.append((list(keys), sv))

    def __len__(self) -> int:
        return len(self._single) + sum(len(k) for k, _ in self._groups)

    def table(self, metric: Callable[[torch.Tensor], torch.Tensor], dtype) -> Tuple[List[int], torch.Tensor]:
        """``(keys, values)``: ``metric`` (a reduction over the last dim, unchanged by zero padding) of every entry,
        ``values[..., j]`` that of ``keys[j]``, computed once per group and once for the single entries (zero-padded
        to a common width)."""
        keys, parts = [], []
        for k, sv in self._groups:
            keys += k
            parts.append(metric(sv.to(dtype)))
        if self._single:
            width = max(sv.shape[-1] for sv in self._single.values())
            fit = lambda x: x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
            keys += list(self._single)
            parts.append(metric(torch.stack([fit(sv.to(dtype)) for sv in self._single.values()], dim=-2)))
        return keys, torch.cat(parts, dim=-1)
