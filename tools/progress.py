"""A rate limit and a one-line progress display for the command-line tools (no dependency)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressLine", "RateLimiter", "human_bytes"]


class RateLimiter:
    """Token bucket: at most ``rate`` units a second on average, bursts of up to ``burst`` units.

    :meth:`acquire` of more units than are banked sleeps until the debt is paid, so a
    message of many rows (Arrow) is allowed and the long-run rate still holds.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()

    def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` units, sleeping as needed; returns the seconds slept."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        self._sleep(wait)
        return wait


class ProgressLine:
    """A status line rewritten in place with ``\\r`` on a terminal, at most every ``every_s``."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None, every_s: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.every_s = every_s
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self, text: str | None = None) -> None:
        """Draw ``text`` one last time and end the line."""
        if not self.enabled:
            return
        if text is not None:
            self.update(text, force=True)
        if self._width:
            self.stream.write("\n")
            self.stream.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
