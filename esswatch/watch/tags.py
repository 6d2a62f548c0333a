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
                                              worker was still busy (cumulative, when the result
                                              is logged; 0 when blocking)
``ess/penalty/{total,<layer>}``               the regularizer's penalty (mean over the step's
                                              micro-batches), total and per layer
``ess_heads/<metric>/<layer>``                histogram: per-head ESS (mean over rows and indices)
``ess_profile/<metric>``                      image: ESS versus index for every layer (matplotlib)
``esswatch/config``                           text: the watch's configuration
============================================  =================================================

The prefix rule: esswatch writes these tags as they are (plain loops, Lightning's
loggers, the Hugging Face callback's TensorBoard writer and its log stream). A logger
may put its own namespace in front, ending in ``/`` (the Trainer's ``report_to``
integrations turn ``ess/...`` into ``train/ess/...``); everything that reads tags
(:func:`parse_tag`, ``esswatch report``, the custom-scalars layout) accepts
``<prefix>ess/...`` for any such prefix.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from .measure import STATS

__all__ = [
    "MODEL",
    "layer_tag_name",
    "scalar_tags",
    "histogram_tag",
    "profile_tag",
    "CONFIG_TAG",
    "FAILURES_TAG",
    "SECONDS_TAG",
    "PENALTY_PREFIX",
    "PENALTY_TAG",
    "penalty_tag",
    "STATS",
    "ParsedTag",
    "parse_tag",
    "SKIPPED_TAG",
    "custom_scalars_layout",
]

MODEL = "model"
CONFIG_TAG = "esswatch/config"
FAILURES_TAG = "ess/failures"
SECONDS_TAG = "ess/measure_seconds"
SKIPPED_TAG = "ess/skipped"
PENALTY_PREFIX = "ess/penalty/"
#: the scalar tag of the regularizer's penalty; per layer :func:`penalty_tag`
PENALTY_TAG = PENALTY_PREFIX + "total"

#: a logger's namespace in front of a tag: zero or more ``component/`` (regular expression)
_PREFIX = r"(?:[^/]+/)*"
_STAT_RE = "|".join(STATS)
_PARSE = re.compile(
    rf"^(?P<prefix>{_PREFIX}?)ess/(?:(?P<metric>[^/]+)/(?P<stat>{_STAT_RE})/(?P<layer>.+)"
    rf"|(?P<failures>failures)|(?P<skipped>skipped)|(?P<seconds>measure_seconds)"
    rf"|penalty/(?P<penalty>[^/]+))$"
)


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
    pen = result.get("penalty")
    if pen is not None:
        out[PENALTY_TAG] = pen["total"]
        for name, v in pen["layers"].items():
            out[penalty_tag(name)] = v
    return out


def penalty_tag(name: str) -> str:
    """The tag of layer ``name``'s regularizer term."""
    return f"{PENALTY_PREFIX}{layer_tag_name(name)}"


class ParsedTag(NamedTuple):
    """A scalar tag of ESSWatch, taken apart (see :func:`parse_tag`)."""

    prefix: str  # the logger's namespace ("" or e.g. "train/")
    kind: str  # "stat", "failures", "skipped", "seconds" or "penalty"
    metric: Optional[str] = None  # kind "stat": "entropy", "tolerance"
    stat: Optional[str] = None  # kind "stat": one of STATS
    layer: Optional[str] = None  # kind "stat": the layer component ("model" = whole model); "penalty": "total" or it


def parse_tag(tag: str) -> Optional[ParsedTag]:
    """The parts of a scalar tag this module builds, under any logger prefix (``None`` for
    any other tag)::

        parse_tag("train/ess/entropy/avg/model.layers.0.self_attn")
        -> ParsedTag(prefix="train/", kind="stat", metric="entropy", stat="avg",
                     layer="model.layers.0.self_attn")
    """
    m = _PARSE.match(tag)
    if m is None:
        return None
    prefix = m.group("prefix")
    if m.group("metric") is not None:
        return ParsedTag(prefix, "stat", m.group("metric"), m.group("stat"), m.group("layer"))
    if m.group("failures"):
        return ParsedTag(prefix, "failures")
    if m.group("skipped"):
        return ParsedTag(prefix, "skipped")
    if m.group("seconds"):
        return ParsedTag(prefix, "seconds")
    return ParsedTag(prefix, "penalty", layer=m.group("penalty"))


def histogram_tag(metric: str, name: str) -> str:
    return f"ess_heads/{metric}/{layer_tag_name(name)}"


def profile_tag(metric: str) -> str:
    return f"ess_profile/{metric}"


def custom_scalars_layout(metrics: Sequence[str]) -> Dict[str, Dict[str, list]]:
    """TensorBoard custom-scalars layout: one multi-line chart per metric and statistic,
    holding every layer and the model-wide line (tags given as regular expressions).

    The expressions accept any logger prefix (``^(?:[^/]+/)*ess/entropy/avg/`` matches
    ``ess/entropy/avg/...`` and ``train/ess/entropy/avg/...``; TensorBoard matches them
    from the start of the tag), so the same layout, written by every run, serves a logdir
    that mixes plain, Lightning and Trainer runs: TensorBoard merges identical charts."""
    charts: Dict[str, list] = {}
    for m in metrics:
        for stat in STATS:
            charts[f"{m}-ESS {stat}, all layers"] = ["Multiline", [rf"^{_PREFIX}ess/{m}/{stat}/"]]
    charts["failures"] = ["Multiline", [rf"^{_PREFIX}{FAILURES_TAG}$"]]
    return {"esswatch": charts}
