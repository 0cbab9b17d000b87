"""Bandwidth limits for an agent's sender: a token bucket whose rate follows a daily schedule.

Schedule syntax (``--bandwidth``; rates in MB/s, 1 MB = 1,000,000 bytes, ``unlimited`` allowed)::

    RATE                              one rate all day
    RATE,HH:MM-HH:MM=RATE,...         a default rate, and windows (local time) with their own
    HH:MM-HH:MM=RATE,...              windows only: unlimited outside them

A window ``22:00-06:00`` wraps past midnight. Where windows overlap the first listed wins.
Examples: ``50`` (50 MB/s), ``100,08:00-18:00=10`` (10 MB/s during office hours, 100 otherwise).

The bucket holds at most one second of tokens (a burst of at most one second's worth), so the
rate over any few seconds stays within the limit; a request larger than that waits for the
debt to be paid instead of being refused, so a large batch is never stuck.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from siterecovery.errors import InvalidInput

MB = 1_000_000
_WINDOW_RE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})=(.+)$")


def _rate(text: str, spec: str) -> float | None:
    text = text.strip().lower()
    if text == "unlimited":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise InvalidInput(
            f"bandwidth {text!r} in {spec!r} is not allowed: use a number of MB/s above 0, or 'unlimited'."
        )
    return value * MB


@dataclass(frozen=True)
class Window:
    start: int  # minutes after midnight
    end: int  # minutes after midnight (end < start: the window wraps past midnight)
    rate: float | None  # bytes per second, None = unlimited

    def covers(self, minute: int) -> bool:
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


@dataclass(frozen=True)
class BandwidthSchedule:
    default: float | None
    windows: tuple[Window, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> BandwidthSchedule:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise InvalidInput("an empty bandwidth limit is not allowed: give e.g. '50' or '08:00-18:00=10'.")
        default: float | None = None
        windows: list[Window] = []
        for i, part in enumerate(parts):
            m = _WINDOW_RE.match(part)
            if m is None:
                if i != 0:
                    raise InvalidInput(
                        f"bandwidth part {part!r} of {spec!r} is not a window: use HH:MM-HH:MM=MB/s "
                        "(a plain rate may only come first)."
                    )
                default = _rate(part, spec)
                continue
            h1, m1, h2, m2 = (int(m.group(k)) for k in range(1, 5))
            if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
                raise InvalidInput(f"window {part!r} of {spec!r} has an invalid time; use 00:00..24:00.")
            start, end = h1 * 60 + m1, h2 * 60 + m2
            if start == end:
                raise InvalidInput(f"window {part!r} of {spec!r} is empty; its start equals its end.")
            windows.append(Window(start, end, _rate(m.group(5), spec)))
        return cls(default, tuple(windows))

    def rate_at(self, when: datetime.datetime) -> float | None:
        """Bytes per second allowed at local time ``when`` (None: unlimited)."""
        minute = when.hour * 60 + when.minute
        for w in self.windows:
            if w.covers(minute):
                return w.rate
        return self.default


class TokenBucket:
    """Blocks senders so that bytes sent follow a :class:`BandwidthSchedule` (thread safe)."""

    def __init__(
        self,
        schedule: BandwidthSchedule,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], datetime.datetime] = datetime.datetime.now,
    ) -> None:
        self.schedule = schedule
        self._clock = clock
        self._sleep = sleep
        self._now = now
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._last = clock()

    def take(self, n: int) -> float:
        """Wait until ``n`` bytes may be sent; return the seconds waited."""
        waited = 0.0
        with self._lock:
            rate = self.schedule.rate_at(self._now())
            t = self._clock()
            if rate is None:
                self._tokens, self._last = 0.0, t
                return 0.0
            self._tokens = min(rate, self._tokens + (t - self._last) * rate)
            self._last = t
            self._tokens -= n
            if self._tokens < 0:
                # Pay the debt while holding the lock: senders queue up behind it in order.
                waited = -self._tokens / rate
                self._sleep(waited)
                self._tokens = 0.0
                self._last = self._clock()
        return waited
