"""Integrity check of TensorBoard event files (for ``esswatch report``).

TensorBoard's readers stop silently at the first damaged record of an event file (they
treat it like a record still being written). :func:`check_event_file` reads every record
with TensorBoard's own record reader and ``Event`` proto and says what is wrong, so the
report can name a corrupt file and still show what could be read before the damage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["event_files", "check_event_file"]


def event_files(run: str | os.PathLike) -> List[Path]:
    """The event files directly in ``run``, in TensorBoard's reading order (by name)."""
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
                why = "incomplete last record (cut off, or still being written)" if "truncated" in msg else \
                    "checksum mismatch (damaged record)"
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
