"""The tag scheme: one place that names every value ESSWatch logs.

============================================  =================================================
``ess/<metric>/<stat>/<layer>``               per layer; ``metric`` in ``entropy``, ``tolerance``;
                                              ``stat`` in ``avg``, ``max``, ``total``, ``utilization``;
                                              ``layer`` = qualified module name (``root`` for the
                                              model itself)
``ess/<metric>/<stat>/model``                 the same over the whole model (avg, utilization:
                                              mean over layers; max: max; total: sum)
``ess/failures``                              layer measurements skipped so far (cumulative)
``ess/measure_seconds``                       wall time of this step's measurement
``ess/skipped``                               samples skipped so far because the background
                                              worker was still busy (cumulative; 0 when blocking)
``ess_heads/<metric>/<layer>``                histogram: per-head ESS (mean over rows and indices)
``ess_profile/<metric>``                      image: ESS versus index for every layer (matplotlib)
``esswatch/config``                           text: the watch's configuration
============================================  =================================================
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .measure import STATS

__all__ = ["MODEL", "layer_tag_name", "scalar_tags", "histogram_tag", "profile_tag", "CONFIG_TAG",
           "FAILURES_TAG", "SECONDS_TAG", "SKIPPED_TAG", "custom_scalars_layout"]

MODEL = "model"
CONFIG_TAG = "esswatch/config"
FAILURES_TAG = "ess/failures"
SECONDS_TAG = "ess/measure_seconds"
SKIPPED_TAG = "ess/skipped"


def layer_tag_name(name: str) -> str:
    """The tag component of a layer: its qualified name (``root`` for the model itself,
    ``model.self`` for a layer named ``model`` so that it cannot shadow the model-wide tag)."""
    if name == "":
        return "root"
    if name == MODEL:
        return "model.self"
    return name


def scalar_tags(result: Dict[str, Any]) -> Dict[str, float]:
    """Flatten a result (see :meth:`ESSWatch.latest`) into ``{tag: value}``, in a stable order."""
    out: Dict[str, float] = {}
    metrics: List[str] = list(result.get("metrics", ()))
    for m in metrics:
        for stat in STATS:
            for name, lay in result.get("layers", {}).items():
                if m in lay:
                    out[f"ess/{m}/{stat}/{layer_tag_name(name)}"] = lay[m][stat]
            if m in result.get("model", {}):
                out[f"ess/{m}/{stat}/{MODEL}"] = result["model"][m][stat]
    out[FAILURES_TAG] = float(result.get("failures", 0))
    if "seconds" in result:
        out[SECONDS_TAG] = float(result["seconds"])
    if "skipped_samples" in result:
        out[SKIPPED_TAG] = float(result["skipped_samples"])
    return out


def histogram_tag(metric: str, name: str) -> str:
    return f"ess_heads/{metric}/{layer_tag_name(name)}"


def profile_tag(metric: str) -> str:
    return f"ess_profile/{metric}"


def custom_scalars_layout(metrics: Sequence[str]) -> Dict[str, Dict[str, list]]:
    """TensorBoard custom-scalars layout: one multi-line chart per metric and statistic,
    holding every layer and the model-wide line (tags given as regular expressions)."""
    charts: Dict[str, list] = {}
    for m in metrics:
        for stat in STATS:
            charts[f"{m}-ESS {stat}, all layers"] = ["Multiline", [rf"^ess/{m}/{stat}/"]]
    charts["failures"] = ["Multiline", [rf"^{FAILURES_TAG}$"]]
    return {"esswatch": charts}
