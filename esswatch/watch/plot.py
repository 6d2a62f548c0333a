"""The ESS-versus-index profile as an RGB image (needs matplotlib; optional).

Renders with matplotlib's object-oriented API and the Agg canvas: pyplot is never
imported, so the user's backend and global figure state are untouched. A
:class:`ProfilePlot` keeps its figure and only updates the lines' data between
samples (about half the cost of building a new figure).

What is drawn (``docs/ess.md`` section 3): one line per layer, the metric's
ESS at each measured index as a mean over batch rows and over the layer's heads
(attention, linear attention, Mamba2, GLA: operators shared by ``value_dim > 1``
value channels) or channels (Mamba, diagonal SSMs, long convolutions: one operator
per value channel, ``value_dim == 1``), and dashed, for each distinct state size
``TSS`` among the layers, the bound ``TSS_i = min(TSS, i, L - i)`` that the
``utilization`` tag divides by (``min(i, L - i)`` for layers without a finite
state size, such as softmax attention).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["matplotlib_available", "ProfilePlot", "bound_curves", "mean_over_label"]

_AVAILABLE: Optional[bool] = None

#: figure size in inches and resolution: 1000 x 600 pixels
FIGSIZE = (10.0, 6.0)
DPI = 100
#: the legend is drawn for at most this many layers (beyond, it would hide the axes)
MAX_LEGEND = 32


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


def _bound_label(state_size: Optional[int]) -> str:
    return "min(i, L-i)" if state_size is None else f"TSS_i = min({state_size}, i, L-i)"


def bound_curves(layers: Dict[str, Dict[str, Any]], seq_len: int) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The dashed bounds of a profile: for each distinct ``state_size`` among ``layers``
    (a layer's ``"state_size"`` entry of a :func:`~esswatch.watch.measure.measure_operator`
    result; ``None`` = no finite state size), ``label -> (i, min(TSS, i, L - i))`` over
    ``i = 1 .. L - 1``; the geometric bound ``min(i, L - i)`` is always included."""
    i = np.arange(1, seq_len)
    geo = np.minimum(i, seq_len - i).astype(np.float64)
    sizes = sorted({lay.get("state_size") for lay in layers.values() if lay.get("state_size") is not None})
    out = {_bound_label(None): (i, geo)}
    for s in sizes:
        out[_bound_label(s)] = (i, np.minimum(geo, float(s)))
    return out


def mean_over_label(layers: Dict[str, Dict[str, Any]]) -> str:
    """``"heads"`` when every layer's operator is shared by several value channels
    (``value_dim > 1``: attention-like heads), ``"channels"`` when each operator is one
    value channel (``value_dim == 1``: Mamba, diagonal SSMs, long convolutions), and
    ``"heads or channels"`` for a mix."""
    kinds = {"channels" if int(lay.get("value_dim", 1)) == 1 else "heads" for lay in layers.values()}
    return kinds.pop() if len(kinds) == 1 else "heads or channels"


class ProfilePlot:
    """Per-layer ``metric``-ESS (mean over rows and heads or channels) against the index,
    with the bounds ``TSS_i = min(TSS, i, L - i)`` dashed (module doc), as
    ``(H, W, 3)`` uint8 images of :data:`FIGSIZE` x :data:`DPI` pixels."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self._key: Optional[Tuple] = None
        self._fig = self._canvas = self._ax = self._title = None
        self._lines: Dict[str, Any] = {}

    @property
    def figure(self):
        """The matplotlib ``Figure`` of the last render (``None`` before the first)."""
        return self._fig

    def _build(self, layers: Dict[str, Dict[str, Any]], seq_len: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=FIGSIZE, dpi=DPI)
        self._canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        self._lines = {
            name: ax.plot(
                lay["indices"],
                lay[self.metric]["per_index"],
                marker=".",
                linewidth=1.5,
                markersize=6,
                label=name or "root",
            )[0]
            for name, lay in layers.items()
        }
        bounds = bound_curves(layers, seq_len)
        grays = iter(np.linspace(0.55, 0.2, len(bounds)))
        for label, (x, y) in bounds.items():
            ax.plot(x, y, linestyle="--", color=str(next(grays)), linewidth=1.2, label=label)
        ax.set_xlabel("index i", fontsize=11)
        ax.set_ylabel(f"{self.metric}-ESS (mean over {mean_over_label(layers)})", fontsize=11)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        self._title = ax.set_title("", fontsize=12)
        right = 0.97
        if len(layers) <= MAX_LEGEND:  # outside the axes, on the right, as wide as its longest name
            ncol = 1 if len(layers) + len(bounds) <= 16 else 2
            legend = ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, ncol=ncol)
            width = legend.get_window_extent(self._canvas.get_renderer()).width / fig.bbox.width
            right = max(0.45, 0.97 - width - 0.01)
        fig.subplots_adjust(left=0.08, right=right, top=0.93, bottom=0.1)
        self._fig, self._ax = fig, ax

    def render(self, result: Dict[str, Any]) -> Optional[np.ndarray]:
        """The image for one result; ``None`` without matplotlib or when no layer has the metric."""
        layers = {
            n: lay
            for n, lay in result.get("layers", {}).items()
            if self.metric in lay and "per_index" in lay[self.metric]
        }
        if not layers or not matplotlib_available():
            return None
        seq_len = max(lay["seq_len"] for lay in layers.values())
        key: Tuple = (
            tuple(layers),
            seq_len,
            tuple(lay.get("state_size") for lay in layers.values()),
            mean_over_label(layers),
        )
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
