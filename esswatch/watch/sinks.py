"""Where results go: a :class:`Sink` receives the watch's configuration once and every
result (the plain-data dict of :meth:`ESSWatch.latest`) on rank 0.

- :class:`TensorBoardSink` writes the tags of :mod:`esswatch.watch.tags`;
- :class:`CallableSink` hands each result to a function (any other logger);
- framework adapters subclass :class:`Sink` to log through the framework's loggers.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from . import tags
from .plot import ProfilePlot, matplotlib_available

__all__ = ["Sink", "CallableSink", "TensorBoardSink", "as_sink", "as_sinks", "build_sinks"]


class Sink:
    """Base class. ``start`` is called once before the first ``write``; all three are called
    on rank 0 only."""

    def start(self, config: Dict[str, Any]) -> None:
        """Receive the watch's configuration (plain data)."""

    def write(self, result: Dict[str, Any]) -> None:
        """Receive one result; ``result["step"]`` is the global step, ``result["scalars"]``
        the flat ``{tag: value}`` dict. ``result["layers"]`` and ``result["model"]`` are empty in
        the penalty-only result of a sample ``background=True`` skipped (:mod:`.result`)."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release resources."""


class CallableSink(Sink):
    """Calls ``fn(result)`` with each result (a plain dict; see :meth:`ESSWatch.latest`)."""

    def __init__(self, fn: Callable[[Dict[str, Any]], Any]) -> None:
        if not callable(fn):
            raise ValueError(f"CallableSink needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def write(self, result: Dict[str, Any]) -> None:
        self.fn(result)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"CallableSink({self.fn!r})"


def as_sink(x: Any) -> Sink:
    """A :class:`Sink` passes through; a callable is wrapped in :class:`CallableSink`."""
    if isinstance(x, Sink):
        return x
    if callable(x):
        return CallableSink(x)
    raise ValueError(f"sinks: expected a esswatch.watch.Sink or a callable, got {type(x).__name__}")


def as_sinks(sinks: Any) -> List[Sink]:
    """The ``sinks=`` option of the watch and the framework adapters: one sink or callable, or
    an iterable of them, as a list of :class:`Sink` objects."""
    if isinstance(sinks, Sink) or callable(sinks):
        sinks = [sinks]
    return [as_sink(s) for s in sinks]


def _config_markdown(config: Dict[str, Any]) -> str:
    rows = ["| setting | value |", "|---|---|"]
    for k, v in config.items():
        if k == "layers":
            v = ", ".join(f"`{n or 'root'}` ({t})" for n, t in v.items())
        rows.append(f"| {k} | {v} |")
    return "\n".join(rows)


class TensorBoardSink(Sink):
    """Writes scalars (``add_scalar`` at the global step), per-head histograms, the
    ESS-versus-index profile image (when matplotlib is installed), a custom-scalars layout
    with all layers of one metric on one chart, and the configuration as text.

    Args:
        logdir: directory for a new ``SummaryWriter`` (created lazily, on rank 0, on the
            first write; closed by :meth:`close`).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` (flushed, not closed).
        histograms, layout: switch those parts off.
        images: the profile image on every ``images``-th sampled step (``True`` = every one,
            ``False`` or 0 = none; default 10: rendering costs about as much as measuring).
            Sampled step ``s`` gets one when ``((s - step_base) // every_n_steps) % images == 0`` (``step_base``
            of the config: 1 for the Trainer's steps), so the first sample has one, and the steps with images do
            not depend on restarts.
    """

    def __init__(
        self,
        logdir: Optional[str] = None,
        writer: Any = None,
        *,
        histograms: bool = True,
        images: Union[bool, int] = 10,
        layout: bool = True,
    ) -> None:
        if (logdir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of logdir= or writer=")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}")
        self.logdir = logdir
        self._writer = writer
        self._owned = writer is None
        if isinstance(images, bool):
            images = 1 if images else 0
        if not isinstance(images, int) or images < 0:
            raise ValueError(f"images must be a bool or a non-negative int, got {images!r}")
        self.histograms = histograms
        self.images = images
        self._every, self._base = 1, 0
        self.layout = layout
        self._plots: Dict[str, ProfilePlot] = {}

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.logdir)
        return self._writer

    def start(self, config: Dict[str, Any]) -> None:
        self._every = int(config.get("every_n_steps", 1))
        self._base = int(config.get("step_base", 0))
        w = self.writer
        w.add_text(tags.CONFIG_TAG, _config_markdown(config), global_step=config.get("start_step", 0))
        if self.layout:
            w.add_custom_scalars(tags.custom_scalars_layout(config["metrics"]))

    def write(self, result: Dict[str, Any]) -> None:
        w = self.writer
        step = result["step"]
        for tag, value in result["scalars"].items():
            w.add_scalar(tag, value, global_step=step)
        for metric in result.get("metrics", ()):
            if self.histograms:
                for name, lay in result["layers"].items():
                    if metric in lay and "per_head" in lay[metric]:
                        w.add_histogram(
                            tags.histogram_tag(metric, name),
                            np.asarray(lay[metric]["per_head"], dtype=np.float64),
                            global_step=step,
                        )
            if self.images and ((step - self._base) // self._every) % self.images == 0 and matplotlib_available():
                img = self._plots.setdefault(metric, ProfilePlot(metric)).render(result)
                if img is not None:
                    w.add_image(tags.profile_tag(metric), img, global_step=step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is None:
            return
        if self._owned:
            self._writer.close()
            self._writer = None
        else:
            self._writer.flush()


def build_sinks(
    sinks: Any, *, logdir: Any = None, writer: Any = None, histograms: bool = True, images: Any = 10
) -> List[Sink]:
    """The sinks of a watch: a :class:`TensorBoardSink` when ``logdir`` or ``writer`` is given,
    then :func:`as_sinks` of ``sinks``."""
    out: List[Sink] = []
    if logdir is not None or writer is not None:
        out.append(TensorBoardSink(logdir=logdir, writer=writer, histograms=histograms, images=images))
    return out + as_sinks(sinks)
