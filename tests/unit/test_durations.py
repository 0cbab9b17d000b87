"""parse_duration / format_duration: accepted forms, errors, round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from siterecovery.domain.durations import format_duration, parse_duration
from siterecovery.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("4h", 14400.0),
        ("15d", 1296000.0),
        ("1h30m", 5400.0),
        ("1d12h", 129600.0),
        ("1h 30m", 5400.0),
        ("1H30M", 5400.0),
        ("1.5h", 5400.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("0s", 0.0),
        (" 45s ", 45.0),
        (90, 90.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "  ", "abc", "15x", "m", "30m1h", "1h1h", "-5", "-5m", "1e3", "5 minutes", "h30m", "1..5h"],
)
def test_parse_duration_rejects_with_accepted_forms(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert "1h30m" in message and "90s" in message


@pytest.mark.parametrize("value", [-1, -0.5, float("inf"), float("nan"), True])
def test_parse_duration_rejects_bad_numbers(value: float) -> None:
    with pytest.raises(InvalidInput):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (60, "1m"),
        (90, "1m30s"),
        (5400, "1h30m"),
        (86400, "1d"),
        (1296000, "15d"),
        (90061, "1d1h1m1s"),
        (1.5, "1.5s"),
        (0.25, "0.25s"),
        (3600.001, "1h0.001s"),
        (-90, "-1m30s"),
        (float("inf"), "inf"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**12))
def test_round_trip_whole_milliseconds(millis: int) -> None:
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


@given(st.integers(min_value=0, max_value=10**9))
def test_round_trip_whole_seconds_is_exact(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
