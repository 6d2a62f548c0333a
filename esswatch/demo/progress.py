"""``Progress``: a one-line progress bar on stderr (no dependency).

On a terminal the line is redrawn in place (``\\r``); when stderr is not a terminal
(CI logs, pipes) it prints a plain line every ``10%`` instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Optional

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
    """``with Progress(total, "training") as bar: ... bar.update(1, loss=0.5)``.

    Args:
        total: the number of units (steps).
        label: printed before the bar.
        stream: where to write (default ``sys.stderr``).
        enabled: ``False`` writes nothing.
    """

    def __init__(
        self, total: int, label: str = "", stream: Optional[IO[str]] = None, enabled: bool = True, width: int = 28
    ) -> None:
        self.total = max(1, int(total))
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.count = 0
        self._t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int = 1, **info: float) -> None:
        """Advance by ``n`` units; ``info`` (e.g. ``loss=...``) is shown after the bar."""
        self.count = min(self.total, self.count + n)
        if not self.enabled:
            return
        now = time.perf_counter()
        done = self.count >= self.total
        if self._tty:
            if done or now - self._last_draw >= 0.2:
                self._last_draw = now
                self.stream.write("\r" + self._line(now, info))
                self.stream.flush()
        else:
            decile = (10 * self.count) // self.total
            if decile != self._last_decile and (decile > self._last_decile):
                self._last_decile = decile
                self.stream.write(self._line(now, info) + "\n")
                self.stream.flush()

    def _line(self, now: float, info) -> str:
        frac = self.count / self.total
        filled = int(round(self.width * frac))
        elapsed = now - self._t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        extra = " ".join(f"{k} {v:.3g}" for k, v in info.items())
        return (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total} "
            f"{_clock(elapsed)}<{_clock(eta)} {extra}"
        ).rstrip()

    def close(self) -> None:
        """End the line (terminal mode)."""
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
