"""The sink fan-out of an :class:`~esswatch.ESSWatch`: every result goes to every sink, on
rank 0 only; the configuration goes first, once. A failing sink warns once and is skipped
unless ``strict``: logging problems never stop training either."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List

from . import distributed as dist_utils
from .failures import ESSWarning
from .sinks import Sink

__all__ = ["Emitter"]


class Emitter:
    def __init__(self, sinks: List[Sink], strict: bool) -> None:
        self.sinks = sinks
        self.strict = strict
        self.started = False
        self.active = 0  # > 0 while sinks run (a sink that calls state_dict() must not emit from inside)
        self._failed: set = set()

    def emit(self, result: Dict[str, Any], config: Callable[[], Dict[str, Any]]) -> None:
        """Hand ``result`` to every sink; ``config()`` (plus ``start_step``) to each before the first."""
        if dist_utils.rank() != 0:
            return
        first = not self.started
        self.started = True
        cfg = dict(config(), start_step=result["step"]) if first else None
        self.active += 1
        try:
            self._write(result, first, cfg)
        finally:
            self.active -= 1

    def _write(self, result: Dict[str, Any], first: bool, cfg: Any) -> None:
        for sink in self.sinks:
            try:
                if first:
                    sink.start(cfg)
                sink.write(result)
            except Exception as e:  # noqa: BLE001
                if self.strict:
                    raise
                if id(sink) not in self._failed:
                    self._failed.add(id(sink))
                    warnings.warn(
                        f"esswatch: sink {sink!r} failed at step {result['step']}: "
                        f"{type(e).__name__}: {e}. Later failures of this sink are not reported.",
                        ESSWarning,
                        stacklevel=4,
                    )
