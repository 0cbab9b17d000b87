"""Recovery point thinning (ASR's retention): which points to keep.

Ages are measured from the NEWEST point's ``created_at``, not from the wall clock: when
replication stops and no new points arrive, nothing expires, so the last good points survive an
outage of any length. With ``age = newest.created_at - point.created_at``:

=======================  ======================================
age                      kept
=======================  ======================================
0 .. 2h                  every point
over 2h .. 24h           one per 1-hour bucket
over 24h .. 7d           one per 2-hour bucket
over 7d .. retention     one per 4-hour bucket
over retention           none
=======================  ======================================

Buckets are aligned to absolute time (``floor(created_at / bucket)``), not to the newest point,
so a point chosen once stays chosen as time advances within its band, and thinning an already
thinned set keeps all of it. A bucket that straddles a band edge is split: each band keeps at
most one point of it. Within a bucket the newest app-consistent point wins, else the newest
point (ties on ``created_at`` are broken by ``point_id`` so that the result is deterministic).

Also always kept: the newest point (age 0), and the newest app-consistent point when it lies
within the retention window (this is already implied by the bucket preference; it is checked
explicitly because failover relies on it). Never kept: a point older than the retention window.

Properties (tested with Hypothesis): the newest point is kept; every point within 2 h is kept;
at most one point per bucket per band; idempotent; nothing older than the retention is kept;
monotone in the retention (a longer retention keeps a superset).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from siterecovery.domain.durations import DAY, HOUR


@dataclass(frozen=True)
class PointStamp:
    """What thinning needs to know about a recovery point."""

    point_id: str
    created_at: float
    app_consistent: bool


KEEP_ALL_S = 2 * HOUR


@dataclass(frozen=True)
class Band:
    """Points whose age is in ``(min_age_s, max_age_s]`` keep one per ``bucket_s`` bucket."""

    min_age_s: float
    max_age_s: float
    bucket_s: float


#: The thinning bands after the first 2 hours, youngest first; the last extends to the
#: retention window.
BANDS: tuple[Band, ...] = (
    Band(KEEP_ALL_S, 1 * DAY, 1 * HOUR),
    Band(1 * DAY, 7 * DAY, 2 * HOUR),
    Band(7 * DAY, math.inf, 4 * HOUR),
)


def _band_index(age: float) -> int:
    """-1 for the keep-everything band, else the index into :data:`BANDS`."""
    if age <= KEEP_ALL_S:
        return -1
    for index, band in enumerate(BANDS):
        if age <= band.max_age_s:
            return index
    raise AssertionError("the last band is unbounded")


def _rank(point: PointStamp) -> tuple[bool, float, str]:
    # Higher is better: app-consistent first, then newer, then a stable tie-break.
    return (point.app_consistent, point.created_at, point.point_id)


def _newest(points: Iterable[PointStamp]) -> PointStamp | None:
    return max(points, key=lambda p: (p.created_at, p.point_id), default=None)


def points_to_keep(points: Sequence[PointStamp], retention_s: float) -> set[str]:
    """The ``point_id`` of every point to keep under the rules of the module docstring."""
    newest = _newest(points)
    if newest is None:
        return set()
    now = newest.created_at
    keep = {newest.point_id}
    best: dict[tuple[int, int], PointStamp] = {}
    for point in points:
        age = now - point.created_at
        if age > retention_s:
            continue
        band = _band_index(age)
        if band < 0:
            keep.add(point.point_id)
            continue
        key = (band, math.floor(point.created_at / BANDS[band].bucket_s))
        current = best.get(key)
        if current is None or _rank(point) > _rank(current):
            best[key] = point
    keep.update(p.point_id for p in best.values())
    newest_app = _newest(p for p in points if p.app_consistent and now - p.created_at <= retention_s)
    if newest_app is not None:
        keep.add(newest_app.point_id)
    return keep


def points_to_expire(points: Sequence[PointStamp], retention_s: float) -> set[str]:
    """The ``point_id`` of every point that thinning drops (the complement of the kept set)."""
    keep = points_to_keep(points, retention_s)
    return {p.point_id for p in points if p.point_id not in keep}
