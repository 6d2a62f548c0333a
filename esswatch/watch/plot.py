"""The ESS-versus-index profile as an RGB image (needs matplotlib; optional).

Renders with matplotlib's object-oriented API and the Agg canvas: pyplot is never
imported, so the user's backend and global figure state are untouched. A
:class:`ProfilePlot` keeps its figure and only updates the lines' data between
samples (about half the cost of building a new figure).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["matplotlib_available", "ProfilePlot"]

_AVAILABLE: Optional[bool] = None


def matplotlib_available() -> bool:
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import matplotlib.figure  # noqa: F401
            from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
            _AVAILABLE = True
        except Exception:  # ImportError, or a broken installation
            _AVAILABLE = False
    return _AVAILABLE


class ProfilePlot:
    """Per-layer ``metric``-ESS (mean over rows and heads) against the index, with the
    geometric bound ``min(i, L - i)`` dashed, as ``(H, W, 3)`` uint8 images."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self._key: Optional[Tuple] = None
        self._fig = self._canvas = self._ax = self._title = None
        self._lines: Dict[str, Any] = {}

    def _build(self, layers: Dict[str, Dict[str, Any]], seq_len: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 3.6), dpi=80)
        self._canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        self._lines = {name: ax.plot(lay["indices"], lay[self.metric]["per_index"], marker=".", linewidth=1.2,
                                     label=name or "root")[0] for name, lay in layers.items()}
        i = np.arange(1, seq_len)
        ax.plot(i, np.minimum(i, seq_len - i), linestyle="--", color="0.6", linewidth=0.8, label="min(i, L-i)")
        ax.set_xlabel("index i")
        ax.set_ylabel(f"{self.metric}-ESS (mean over heads)")
        ax.grid(alpha=0.3)
        if len(layers) <= 12:
            ax.legend(fontsize=6, loc="upper right")
        self._title = ax.set_title("", fontsize=9)
        fig.subplots_adjust(left=0.1, right=0.98, top=0.92, bottom=0.13)
        self._fig, self._ax = fig, ax

    def render(self, result: Dict[str, Any]) -> Optional[np.ndarray]:
        """The image for one result; ``None`` without matplotlib or when no layer has the metric."""
        layers = {n: lay for n, lay in result.get("layers", {}).items()
                  if self.metric in lay and "per_index" in lay[self.metric]}
        if not layers or not matplotlib_available():
            return None
        seq_len = max(lay["seq_len"] for lay in layers.values())
        key = (tuple(layers), seq_len)
        if key != self._key:
            self._build(layers, seq_len)
            self._key = key
        else:
            for name, lay in layers.items():
                self._lines[name].set_data(lay["indices"], lay[self.metric]["per_index"])
            self._ax.relim()
            self._ax.autoscale_view()
        self._title.set_text(f"step {result.get('step')}")
        self._canvas.draw()
        return np.asarray(self._canvas.buffer_rgba())[..., :3].copy()
