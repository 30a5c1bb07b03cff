"""A plain-text progress bar on stderr for comparisons that take more than a second.

Nothing is drawn for a comparison that ends within ``delay`` seconds, nor when stderr is not a
terminal (a CI log, a pipe), nor with ``progress=False`` (``--quiet`` on the command line). The
line is redrawn in place with a carriage return, at most a few times a second, and erased when
the comparison ends, so the report that follows starts on a clean line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Callable, Optional

__all__ = ["Progress", "progress_enabled"]


def progress_enabled(progress: Optional[bool], stream: Optional[IO[str]] = None) -> bool:
    """``progress`` as given, or when ``None``: stderr is a terminal and ``REPROD_PROGRESS`` is not 0.

    >>> progress_enabled(False)
    False
    """
    if progress is not None:
        return bool(progress)
    if os.environ.get("REPROD_PROGRESS", "") == "0":
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


class Progress:
    """Keys and bytes done out of a known total; thread-safe ``advance``.

    >>> bar = Progress(total_keys=2, total_bytes=16, enabled=True, delay=0.0)
    >>> bar.advance(8); bar.key_done(); bar.close()
    """

    def __init__(self, *, total_keys: int, total_bytes: int, enabled: bool = True,
                 stream: Optional[IO[str]] = None, delay: float = 1.0, interval: float = 0.2,
                 label: str = "comparing") -> None:
        self.total_keys = total_keys
        self.total_bytes = total_bytes
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.interval = interval
        self.label = label
        self.keys = 0
        self.bytes = 0
        self._start = time.monotonic()
        self._next = self._start + delay
        self._width = 0  # characters of the last line drawn (0: nothing on screen)
        self._lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more of the data compared (called by worker threads too)."""
        if not self.enabled:
            return
        with self._lock:
            self.bytes += nbytes
            self._maybe_draw()

    def per_element(self, nbytes: int) -> Callable[[int], None]:
        """A hook for ``compute_stats(on_progress=...)``: elements done, ``nbytes`` each."""
        return lambda n: self.advance(n * nbytes)

    def key_done(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.keys += 1
            self._maybe_draw()

    def _maybe_draw(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        self._draw(now)

    def _fraction(self) -> float:
        if self.total_bytes > 0:
            return min(1.0, self.bytes / self.total_bytes)
        return min(1.0, self.keys / self.total_keys) if self.total_keys else 0.0

    def line(self, now: Optional[float] = None) -> str:
        """The text of the bar as it would be drawn now."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        frac = self._fraction()
        eta = ""
        if 0.0 < frac < 1.0 and elapsed > 0.0:
            eta = f", ~{max(0.0, elapsed / frac - elapsed):.0f} s left"
        size = f"  {_size(self.bytes)}/{_size(self.total_bytes)}" if self.total_bytes else ""
        head = f"{self.label} {self.keys:,}/{self.total_keys:,} keys "
        tail = f" {100 * frac:3.0f}%{size}  {elapsed:.0f} s{eta}"
        cells = max(10, min(30, self._columns() - len(head) - len(tail) - 3))
        done = int(cells * frac)
        return f"{head}[{'#' * done}{'.' * (cells - done)}]{tail}"

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return 80

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = " " * max(0, self._width - len(text))
        try:
            self.stream.write("\r" + text + pad)
            self.stream.flush()
        except (OSError, ValueError):  # stderr went away: stop drawing, keep comparing
            self.enabled = False
            return
        self._width = len(text)

    def close(self) -> None:
        """Erase the bar if it was drawn."""
        with self._lock:
            if self._width:
                try:
                    self.stream.write("\r" + " " * self._width + "\r")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass
                self._width = 0
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
