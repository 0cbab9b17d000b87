"""Replication policy: defaults, ranges, cross-field rules, changes, failback twin."""

from __future__ import annotations

import dataclasses

import pytest

from siterecovery.domain.policy import (
    APP_INTERVAL_MAX_S,
    CRASH_INTERVAL_MIN_S,
    RANGES,
    RETENTION_MAX_S,
    RETENTION_MIN_S,
    RPO_THRESHOLD_MIN_S,
    PolicySpec,
    describe_range,
)
from siterecovery.errors import InvalidInput, OutOfRange


def test_defaults() -> None:
    policy = PolicySpec.create("default")
    assert policy.rpo_threshold_s == 15 * 60
    assert policy.retention_s == 24 * 3600
    assert policy.crash_interval_s == 5 * 60
    assert policy.app_interval_s == 4 * 3600
    assert policy.app_consistent
    assert policy.advice() == ()


def test_create_accepts_duration_strings_and_seconds() -> None:
    policy = PolicySpec.create(
        "gold", rpo_threshold="30s", retention="3d", crash_frequency=5, app_frequency="1h30m"
    )
    assert policy == PolicySpec("gold", 30.0, 3 * 86400.0, 5.0, 5400.0)


def test_app_consistency_off() -> None:
    policy = PolicySpec.create("crash-only", app_frequency="0")
    assert policy.app_interval_s == 0
    assert not policy.app_consistent


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retention": "20d"}, "retention 20d is out of range: allowed is 1h to 15d."),
        ({"retention": "59m"}, "retention 59m is out of range: allowed is 1h to 15d."),
        ({"rpo_threshold": "4s"}, "RPO threshold 4s is out of range: allowed is 5s to 1d."),
        ({"rpo_threshold": "25h"}, "RPO threshold 1d1h is out of range: allowed is 5s to 1d."),
        (
            {"crash_frequency": "2s"},
            "crash-consistent frequency 2s is out of range: allowed is 5s to 1h.",
        ),
        (
            {"crash_frequency": "2h"},
            "crash-consistent frequency 2h is out of range: allowed is 5s to 1h.",
        ),
        (
            {"app_frequency": "30m"},
            "app-consistent frequency 30m is out of range: allowed is 1h to 12h, or 0 (off).",
        ),
        (
            {"app_frequency": "13h", "retention": "2d"},
            "app-consistent frequency 13h is out of range: allowed is 1h to 12h, or 0 (off).",
        ),
    ],
)
def test_out_of_range_names_field_value_and_range(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(OutOfRange) as info:
        PolicySpec.create("p", **kwargs)
    assert str(info.value) == message
    assert info.value.exit_code == 2


def test_app_frequency_must_be_less_than_retention() -> None:
    with pytest.raises(OutOfRange, match=r"app-consistent frequency 4h .*less than the retention 4h"):
        PolicySpec.create("p", retention="4h", app_frequency="4h")
    assert PolicySpec.create("p", retention="4h", app_frequency="3h").app_interval_s == 3 * 3600
    assert PolicySpec.create("p", retention="1h", app_frequency=0).retention_s == 3600


def test_range_edges_are_inclusive() -> None:
    PolicySpec.create(
        "edges-low",
        rpo_threshold=RPO_THRESHOLD_MIN_S,
        retention=RETENTION_MIN_S,
        crash_frequency=CRASH_INTERVAL_MIN_S,
        app_frequency=0,
    )
    PolicySpec.create(
        "edges-high",
        rpo_threshold="24h",
        retention=RETENTION_MAX_S,
        crash_frequency="1h",
        app_frequency=APP_INTERVAL_MAX_S,
    )


def test_bad_duration_text_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="'soon'"):
        PolicySpec.create("p", retention="soon")


@pytest.mark.parametrize("name", ["", "has space", "slash/name", "ü", "x" * 65])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="policy name"):
        PolicySpec.create(name)


@pytest.mark.parametrize("name", ["a", "rep-policy", "gold_1.2", "x" * 64])
def test_good_names(name: str) -> None:
    assert PolicySpec.create(name).name == name


def test_direct_construction_is_validated() -> None:
    with pytest.raises(OutOfRange, match="retention"):
        PolicySpec("p", retention_s=10)
    with pytest.raises(InvalidInput, match="not a duration"):
        PolicySpec("p", retention_s="1d")  # type: ignore[arg-type]
    assert PolicySpec("p", retention_s=18000).retention_s == 18000.0


def test_with_changes_returns_validated_copy() -> None:
    policy = PolicySpec.create("p")
    changed = policy.with_changes(retention="48h", crash_frequency="30s")
    assert changed.retention_s == 48 * 3600
    assert changed.crash_interval_s == 30
    assert changed.name == "p"
    assert policy.retention_s == 24 * 3600
    assert policy.with_changes(retention_s=7200, app_frequency=0).retention_s == 7200
    assert policy.with_changes(name="q").name == "q"
    with pytest.raises(OutOfRange, match="retention 16d"):
        policy.with_changes(retention="16d")


def test_with_changes_unknown_setting() -> None:
    with pytest.raises(InvalidInput, match="'rpo' is not known.*rpo_threshold"):
        PolicySpec.create("p").with_changes(rpo="1m")


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PolicySpec.create("p").retention_s = 1.0  # type: ignore[misc]


def test_failback_twin() -> None:
    policy = PolicySpec.create("rep-policy", retention="3d", crash_frequency="1m")
    twin = policy.failback_twin()
    assert twin.name == "rep-policy-failback"
    assert dataclasses.replace(twin, name=policy.name) == policy


def test_failback_twin_of_longest_name() -> None:
    assert PolicySpec.create("x" * 64).failback_twin().name == "x" * 64 + "-failback"


def test_advice_when_threshold_below_crash_frequency() -> None:
    policy = PolicySpec.create("p", rpo_threshold="1m", crash_frequency="5m")
    (note,) = policy.advice()
    assert "RPO threshold 1m is below the crash-consistent frequency 5m" in note


def test_ranges_for_help() -> None:
    assert RANGES["retention"] == (RETENTION_MIN_S, RETENTION_MAX_S)
    assert describe_range(*RANGES["retention"]) == "1h to 15d"
    assert describe_range(*RANGES["app-frequency"]) == "1h to 12h"
