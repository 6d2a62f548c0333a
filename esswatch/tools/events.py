"""Integrity check of TensorBoard event files (for ``esswatch report``).

TensorBoard's readers stop silently at the first damaged record of an event file (they
treat it like a record still being written, and only log it at debug level).
:func:`loader_stops` collects those debug records while TensorBoard loads a run (no extra
reading), and :func:`check_event_file` then reads each such file with TensorBoard's own
record reader and ``Event`` proto and says what is wrong and where, so the report can name
a corrupt file and still show what could be read before the damage.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional

__all__ = ["event_files", "check_event_file", "loader_stops"]

#: the message TensorBoard's event_file_loader logs (debug) when it stops at a damaged record
_STOP_MESSAGE = "Truncated record in"


class _Stops(logging.Handler):
    """Collects the files TensorBoard's loader stopped in; passes every other record on as
    the ``tensorboard`` logger would have."""

    def __init__(self, passthrough_level: int) -> None:
        super().__init__(logging.DEBUG)
        self.files: Dict[str, str] = {}
        self.passthrough_level = passthrough_level

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(_STOP_MESSAGE) and record.args:
            self.files[os.path.realpath(str(record.args[0]))] = str(record.args[1])
        elif record.levelno >= self.passthrough_level:
            logging.getLogger().handle(record)


@contextlib.contextmanager
def loader_stops() -> Iterator[Dict[str, str]]:
    """While the block runs, ``{realpath: error}`` of every event file TensorBoard's loader
    stopped reading early (a damaged or incomplete record)."""
    logger = logging.getLogger("tensorboard")
    handler = _Stops(logger.getEffectiveLevel())
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler.files
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def event_files(run: str | os.PathLike) -> List[Path]:
    """The event files directly in ``run``, in TensorBoard's reading order (by name); ``run`` itself when it is one."""
    if Path(run).is_file():
        return [Path(run)]
    return sorted(p for p in Path(run).iterdir() if p.name.startswith("events.out.tfevents") and p.is_file())


def check_event_file(path: str | os.PathLike) -> Optional[Dict[str, object]]:
    """``None`` for a sound file, else ``{"file", "error", "events_before"}``: what is wrong
    (a failed checksum, a record that is not an ``Event``, an incomplete last record, an
    unreadable file) and how many events precede the damage."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    n = 0
    reader = None
    try:
        reader = PyRecordReader_New(str(path))
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                return None
            except errors.DataLossError as e:
                msg = str(e.message if hasattr(e, "message") else e)
                why = (
                    "incomplete last record (cut off, or still being written)"
                    if "truncated" in msg
                    else "checksum mismatch (damaged record)"
                )
                return {"file": str(path), "error": why, "events_before": n}
            event = event_pb2.Event()
            try:
                event.ParseFromString(reader.record())
            except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
                return {"file": str(path), "error": "a record is not a TensorBoard event", "events_before": n}
            n += 1
    except (OSError, errors.OpError) as e:
        return {"file": str(path), "error": f"cannot read it ({type(e).__name__}: {e})", "events_before": n}
    finally:
        if reader is not None:
            reader.file_handle.close()
