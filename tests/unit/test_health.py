"""Item health: one test per outcome."""

from __future__ import annotations

import dataclasses

from siterecovery.domain.health import Health, HealthInput, HealthLevel, assess, current_rpo_s
from siterecovery.domain.states import ItemState

NOW = 1_700_000_000.0


def healthy(**changes: object) -> HealthInput:
    base = HealthInput(
        state=ItemState.PROTECTED,
        now=NOW,
        rpo_threshold_s=60.0,
        crash_interval_s=30.0,
        app_interval_s=3600.0,
        last_point_at=NOW - 20,
        last_app_point_at=NOW - 1800,
        initial_progress=None,
        consecutive_failures=0,
        last_error=None,
        last_freeze_failed=False,
        tracking_lost=False,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_normal_when_all_is_well() -> None:
    assert assess(healthy()) == Health(level=HealthLevel.NORMAL, reasons=())
    assert assess(healthy()).level == "Normal"


def test_current_rpo() -> None:
    assert current_rpo_s(healthy()) == 20.0
    assert current_rpo_s(healthy(last_point_at=None)) is None
    assert current_rpo_s(healthy(last_point_at=NOW + 5)) == 0.0  # clock skew never goes negative


def test_rpo_over_threshold_is_critical() -> None:
    result = assess(healthy(last_point_at=NOW - 95))
    assert result.level == HealthLevel.CRITICAL
    assert result.reasons == ("RPO 1m35s exceeds the threshold 1m: replication is behind; see job list",)


def test_rpo_over_threshold_explains_a_policy_that_cannot_meet_it() -> None:
    result = assess(healthy(crash_interval_s=300.0, last_point_at=NOW - 200))
    assert result.level == HealthLevel.CRITICAL
    assert "crash-consistent frequency 5m is longer than the threshold" in result.reasons[0]


def test_rpo_at_threshold_is_normal() -> None:
    assert assess(healthy(last_point_at=NOW - 60)).level == HealthLevel.NORMAL


def test_rpo_counts_during_test_failover() -> None:
    result = assess(healthy(state=ItemState.TEST_FAILOVER, last_point_at=NOW - 600))
    assert result.level == HealthLevel.CRITICAL


def test_rpo_not_judged_after_failover() -> None:
    result = assess(healthy(state=ItemState.FAILED_OVER, last_point_at=NOW - 86400))
    assert result.level == HealthLevel.NORMAL
    assert "commit" in result.reasons[0] and "reprotect" in result.reasons[0]


def test_committed_failover_says_to_reprotect() -> None:
    result = assess(healthy(state=ItemState.FAILOVER_COMMITTED, last_point_at=NOW - 86400))
    assert result.level == HealthLevel.NORMAL
    assert "reprotect" in result.reasons[0]


def test_three_consecutive_failures_are_critical_with_last_error() -> None:
    result = assess(healthy(consecutive_failures=3, last_error="connection refused"))
    assert result.level == HealthLevel.CRITICAL
    (reason,) = result.reasons
    assert "failed 3 times in a row" in reason
    assert "last error: connection refused" in reason


def test_one_failure_is_warning() -> None:
    result = assess(healthy(consecutive_failures=1, last_error="timeout"))
    assert result.level == HealthLevel.WARNING
    (reason,) = result.reasons
    assert "failed once; last error: timeout" in reason
    assert "retried" in reason


def test_two_failures_are_warning() -> None:
    assert assess(healthy(consecutive_failures=2)).level == HealthLevel.WARNING


def test_freeze_failure_is_warning() -> None:
    result = assess(healthy(last_freeze_failed=True))
    assert result == Health(
        HealthLevel.WARNING,
        ("app-consistent point fell back to crash-consistent: freeze hook failed",),
    )


def test_no_recent_app_consistent_point_is_warning() -> None:
    result = assess(healthy(last_app_point_at=NOW - 2 * 3600 - 1))
    assert result.level == HealthLevel.WARNING
    (reason,) = result.reasons
    assert reason.startswith("no app-consistent recovery point for 2h1s")
    assert "freeze hook" in reason


def test_app_point_within_twice_the_interval_is_normal() -> None:
    assert assess(healthy(last_app_point_at=NOW - 2 * 3600)).level == HealthLevel.NORMAL


def test_old_app_point_ignored_when_app_consistency_off() -> None:
    assert assess(healthy(app_interval_s=0, last_app_point_at=NOW - 86400)).level == HealthLevel.NORMAL


def test_tracking_lost_is_warning() -> None:
    result = assess(healthy(tracking_lost=True))
    assert result == Health(HealthLevel.WARNING, ("change tracking was lost; a hash resync is running",))


def test_initial_replication_progress_is_normal_with_percentage() -> None:
    result = assess(
        healthy(
            state=ItemState.INITIAL_REPLICATION,
            last_point_at=None,
            last_app_point_at=None,
            initial_progress=0.425,
        )
    )
    assert result == Health(HealthLevel.NORMAL, ("initial replication is 42% complete",))


def test_initial_replication_not_started() -> None:
    result = assess(healthy(state=ItemState.INITIAL_REPLICATION, last_point_at=None, initial_progress=None))
    assert result == Health(HealthLevel.NORMAL, ("initial replication is starting",))


def test_initial_replication_almost_done_is_not_100() -> None:
    result = assess(healthy(state=ItemState.INITIAL_REPLICATION, last_point_at=None, initial_progress=0.999))
    assert result.reasons == ("initial replication is 99% complete",)


def test_protected_without_any_point_is_warning() -> None:
    result = assess(healthy(last_point_at=None))
    assert result.level == HealthLevel.WARNING
    assert "no recovery point exists" in result.reasons[0]


def test_worst_level_wins_and_critical_reasons_come_first() -> None:
    result = assess(healthy(last_point_at=NOW - 600, tracking_lost=True, last_freeze_failed=True))
    assert result.level == HealthLevel.CRITICAL
    assert result.reasons[0].startswith("RPO 10m exceeds")
    assert len(result.reasons) == 3
