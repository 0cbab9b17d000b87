"""Bandwidth schedules and the token bucket (fake clock: no sleeping, no I/O)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.adapters.transport.bandwidth import MB, BandwidthSchedule, TokenBucket
from siterecovery.errors import InvalidInput


def at(hh: int, mm: int = 0) -> datetime.datetime:
    return datetime.datetime(2024, 5, 1, hh, mm)


def test_a_plain_rate_applies_all_day() -> None:
    s = BandwidthSchedule.parse("50")
    assert s.rate_at(at(3)) == s.rate_at(at(15)) == 50 * MB


def test_windows_override_the_default_and_may_wrap_past_midnight() -> None:
    s = BandwidthSchedule.parse("100, 08:00-18:00=10, 22:00-06:00=unlimited")
    assert s.rate_at(at(7, 59)) == 100 * MB
    assert s.rate_at(at(8)) == 10 * MB
    assert s.rate_at(at(17, 59)) == 10 * MB
    assert s.rate_at(at(18)) == 100 * MB
    assert s.rate_at(at(23)) is None
    assert s.rate_at(at(5, 59)) is None


def test_windows_only_means_unlimited_outside_them() -> None:
    s = BandwidthSchedule.parse("09:30-17:00=2.5")
    assert s.rate_at(at(9, 29)) is None
    assert s.rate_at(at(9, 30)) == 2.5 * MB


@pytest.mark.parametrize(
    "spec",
    ["", "0", "-3", "fast", "08:00-18:00=10,50", "25:00-01:00=1", "08:00-08:00=1", "08:00-09:60=1", "nan"],
)
def test_invalid_schedules_are_refused(spec: str) -> None:
    with pytest.raises(InvalidInput):
        BandwidthSchedule.parse(spec)


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.slept += s


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 5 * MB), min_size=1, max_size=30), st.floats(0.5, 50))
def test_the_bucket_never_exceeds_its_rate_beyond_one_second_of_burst(
    sizes: list[int], rate_mb: float
) -> None:
    ft = FakeTime()
    bucket = TokenBucket(
        BandwidthSchedule.parse(f"{rate_mb}"), clock=ft.clock, sleep=ft.sleep, now=lambda: at(12)
    )
    start = ft.t
    for n in sizes:
        bucket.take(n)
    elapsed = ft.t - start
    # Sent bytes <= rate * (elapsed + 1 s of burst), and nothing waits longer than it must.
    assert sum(sizes) <= rate_mb * MB * (elapsed + 1) + 1
    assert elapsed <= sum(sizes) / (rate_mb * MB) + 1e-6


def test_an_unlimited_window_never_waits() -> None:
    ft = FakeTime()
    bucket = TokenBucket(
        BandwidthSchedule.parse("1,00:00-24:00=unlimited"), clock=ft.clock, sleep=ft.sleep, now=lambda: at(1)
    )
    assert bucket.take(100 * MB) == 0.0 and ft.slept == 0.0
