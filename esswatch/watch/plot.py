"""The ESS-versus-index profile as an RGB image (needs matplotlib; optional).

Renders with matplotlib's object-oriented API and the Agg canvas: pyplot is never
imported, so the user's backend and global figure state are untouched.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

__all__ = ["matplotlib_available", "render_profile"]

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


def render_profile(result: Dict[str, Any], metric: str) -> Optional[np.ndarray]:
    """``(H, W, 3)`` uint8: per-layer ``metric``-ESS (mean over rows and heads) against the
    index, with the geometric bound ``min(i, L - i)`` dashed. ``None`` without matplotlib
    or when no layer has the metric."""
    layers = {n: lay for n, lay in result.get("layers", {}).items() if metric in lay}
    if not layers or not matplotlib_available():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bound_len = None
    for name, lay in layers.items():
        ax.plot(lay["indices"], lay[metric]["per_index"], marker=".", linewidth=1.2, label=name or "root")
        bound_len = max(bound_len or 0, lay["seq_len"])
    if bound_len:
        i = np.arange(1, bound_len)
        ax.plot(i, np.minimum(i, bound_len - i), linestyle="--", color="0.6", linewidth=0.8,
                label="min(i, L-i)")
    ax.set_xlabel("index i")
    ax.set_ylabel(f"{metric}-ESS (mean over heads)")
    ax.set_title(f"step {result.get('step')}", fontsize=9)
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
