"""Replication health of a protected item: Normal, Warning or Critical, with reasons.

:func:`assess` applies these rules and returns the worst level found, with one actionable
sentence per finding (Critical findings first, then Warning, then Normal ones):

================================================  ========  ==========================================
condition                                         level     applies in
================================================  ========  ==========================================
current RPO above the policy's RPO threshold      Critical  states that replicate and have a point
3 or more consecutive failed replication attempts Critical  any state
1 or 2 consecutive failed attempts                Warning   any state
the last freeze hook failed                       Warning   any state
no app-consistent point within 2x the app-        Warning   states that replicate and have a point,
consistent frequency (app-consistency on)                   once an app-consistent point has existed
change tracking lost (a hash resync runs)         Warning   any state
no recovery point although Protected              Warning   states that replicate and have a point
initial replication in progress                   Normal    InitialReplication, Reprotecting
replication stopped by a failover                 Normal    FailedOver, FailoverCommitted
================================================  ========  ==========================================

The current RPO is ``now - last_point_at`` (how much would be lost by failing over now), never
negative (clock skew between hosts must not make it so). When the crash-consistent frequency
is longer than the threshold, the RPO reason says so: the policy, not replication, is at fault.
``last_app_point_at is None`` means there has been no app-consistent point yet; the
freeze-failure rule covers that case, since the item's age is not known here.

Pure: the caller gathers the facts (``HealthInput``) from the store and passes ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from siterecovery.domain.durations import format_duration
from siterecovery.domain.states import ItemState

S = ItemState

FAILURES_CRITICAL = 3
APP_POINT_GRACE_FACTOR = 2.0

#: States in which replication runs and recovery points are expected to keep arriving.
REPLICATING_STATES = frozenset(
    {
        S.PROTECTED,
        S.RESYNCHRONIZING,
        S.TEST_FAILOVER,
        S.STARTING_TEST_FAILOVER,
        S.CLEANING_UP_TEST_FAILOVER,
    }
)
INITIAL_STATES = frozenset({S.INITIAL_REPLICATION, S.REPROTECTING})


class HealthLevel(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"
    CRITICAL = "Critical"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {HealthLevel.NORMAL: 0, HealthLevel.WARNING: 1, HealthLevel.CRITICAL: 2}


@dataclass(frozen=True)
class HealthInput:
    """The facts health is judged from; times are epoch seconds, intervals seconds."""

    state: ItemState
    now: float
    rpo_threshold_s: float
    crash_interval_s: float
    app_interval_s: float
    """0 when app-consistent points are off."""
    last_point_at: float | None = None
    last_app_point_at: float | None = None
    initial_progress: float | None = None
    """Fraction 0..1 of initial replication done, or None when not known."""
    consecutive_failures: int = 0
    last_error: str | None = None
    last_freeze_failed: bool = False
    tracking_lost: bool = False


@dataclass(frozen=True)
class Health:
    level: HealthLevel
    reasons: tuple[str, ...]


def current_rpo_s(h: HealthInput) -> float | None:
    """Seconds since the newest recovery point (0 if it is in the future), or None if none."""
    if h.last_point_at is None:
        return None
    return max(0.0, h.now - h.last_point_at)


def _failure_reason(h: HealthInput) -> str:
    times = "once" if h.consecutive_failures == 1 else f"{h.consecutive_failures} times in a row"
    error = f"; last error: {h.last_error}" if h.last_error else ""
    if h.consecutive_failures >= FAILURES_CRITICAL:
        action = "fix the cause and check the job list; no new recovery points are being made"
    else:
        action = "it will be retried; see the job list if it keeps failing"
    return f"replication failed {times}{error} ({action})"


def assess(h: HealthInput) -> Health:
    """Judge ``h`` by the rules of the module docstring."""
    findings: list[tuple[HealthLevel, str]] = []

    def add(level: HealthLevel, reason: str) -> None:
        findings.append((level, reason))

    replicating = h.state in REPLICATING_STATES
    rpo = current_rpo_s(h)
    if replicating and rpo is not None and rpo > h.rpo_threshold_s:
        reason = (
            f"RPO {format_duration(round(rpo))} exceeds the threshold "
            f"{format_duration(h.rpo_threshold_s)}: replication is behind; see job list"
        )
        if h.crash_interval_s > h.rpo_threshold_s:
            # Not behind at all, just configured so: say so rather than send people hunting.
            reason += (
                f" (the crash-consistent frequency {format_duration(h.crash_interval_s)} is longer "
                "than the threshold: raise the threshold or the frequency in the policy)"
            )
        add(HealthLevel.CRITICAL, reason)
    if replicating and rpo is None:
        add(
            HealthLevel.WARNING,
            f"no recovery point exists although the item is {h.state.value}: check the replication "
            "jobs and run resync if none are running",
        )

    if h.consecutive_failures >= FAILURES_CRITICAL:
        add(HealthLevel.CRITICAL, _failure_reason(h))
    elif h.consecutive_failures > 0:
        add(HealthLevel.WARNING, _failure_reason(h))

    if h.last_freeze_failed:
        add(
            HealthLevel.WARNING,
            "app-consistent point fell back to crash-consistent: freeze hook failed",
        )

    if replicating and h.app_interval_s > 0 and h.last_app_point_at is not None:
        since_app = max(0.0, h.now - h.last_app_point_at)
        if since_app > APP_POINT_GRACE_FACTOR * h.app_interval_s:
            add(
                HealthLevel.WARNING,
                f"no app-consistent recovery point for {format_duration(round(since_app))} "
                f"(app-consistent frequency {format_duration(h.app_interval_s)}): check the "
                "freeze hook and the guest agent",
            )

    if h.tracking_lost:
        add(HealthLevel.WARNING, "change tracking was lost; a hash resync is running")

    if h.state in INITIAL_STATES:
        what = "initial replication" if h.state is S.INITIAL_REPLICATION else "reprotect replication"
        if h.initial_progress is None:
            add(HealthLevel.NORMAL, f"{what} is starting")
        else:
            done = min(1.0, max(0.0, h.initial_progress))
            # Floor, so that 99.9% does not read as complete.
            add(HealthLevel.NORMAL, f"{what} is {math.floor(done * 100)}% complete")
    elif h.state is S.FAILED_OVER:
        add(
            HealthLevel.NORMAL,
            "replication is stopped while failed over: commit (or change the recovery point) "
            "and then reprotect to protect the item again",
        )
    elif h.state is S.FAILOVER_COMMITTED:
        add(
            HealthLevel.NORMAL,
            "the item is not replicating since the failover was committed: reprotect to "
            "replicate in the reverse direction",
        )

    findings.sort(key=lambda f: -f[0].severity)
    level = findings[0][0] if findings else HealthLevel.NORMAL
    return Health(level=level, reasons=tuple(reason for _, reason in findings))
