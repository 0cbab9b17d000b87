"""Recovery point thinning: band edges by example, the invariants by Hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.domain.retention import (
    BANDS,
    KEEP_ALL_S,
    PointStamp,
    points_to_expire,
    points_to_keep,
)

H = 3600.0
D = 86400.0
# A base time aligned to 4 hours so that example buckets are easy to reason about.
T0 = 1_700_006_400.0
assert T0 % (4 * H) == 0


def pt(pid: str, t: float, app: bool = False) -> PointStamp:
    return PointStamp(point_id=pid, created_at=t, app_consistent=app)


def test_empty() -> None:
    assert points_to_keep([], 24 * H) == set()


def test_single_point_is_kept_even_with_tiny_retention() -> None:
    assert points_to_keep([pt("a", T0)], 0) == {"a"}


def test_every_point_within_two_hours_is_kept_edge_inclusive() -> None:
    newest = T0 + 10 * H
    points = [pt(f"p{i}", newest - i * 60) for i in range(121)]  # ages 0 .. exactly 2h
    assert points_to_keep(points, 24 * H) == {p.point_id for p in points}


def test_hourly_band_keeps_newest_per_hour_bucket() -> None:
    newest = T0 + 20 * H
    # Three points in the hour bucket [T0+10h, T0+11h), all between 9h and 10h old.
    points = [
        pt("new", newest),
        pt("a", T0 + 10 * H + 60),
        pt("b", T0 + 10 * H + 1800),
        pt("c", T0 + 10 * H + 3000),
    ]
    assert points_to_keep(points, 24 * H) == {"new", "c"}


def test_bucket_prefers_app_consistent_point() -> None:
    newest = T0 + 20 * H
    points = [
        pt("new", newest),
        pt("a", T0 + 10 * H + 60),
        pt("app-old", T0 + 10 * H + 600, app=True),
        pt("app", T0 + 10 * H + 1800, app=True),
        pt("c", T0 + 10 * H + 3000),
    ]
    assert points_to_keep(points, 24 * H) == {"new", "app"}


def test_point_just_over_two_hours_is_thinned() -> None:
    newest = T0 + 10 * H + 1800  # bucket [T0+8h, T0+9h) straddles the 2h edge at T0+8h30m
    inside = pt("inside", newest - KEEP_ALL_S)  # exactly 2h old: kept
    older = [pt("o1", newest - KEEP_ALL_S - 1), pt("o2", newest - KEEP_ALL_S - 600)]
    keep = points_to_keep([pt("new", newest), inside, *older], 24 * H)
    # The straddling bucket is split: the keep-all side keeps 'inside', the hourly side keeps o1.
    assert keep == {"new", "inside", "o1"}


@pytest.mark.parametrize(
    ("age_h", "bucket_h"),
    [(3, 1), (23.5, 1), (24.5, 2), (6 * 24, 2), (7 * 24 + 0.5, 4), (14 * 24, 4)],
)
def test_band_bucket_sizes(age_h: float, bucket_h: float) -> None:
    newest = T0 + 15 * D
    # Many points spread over one bucket-sized window fully inside the band, aligned to it.
    start = math.floor((newest - age_h * H) / (bucket_h * H)) * bucket_h * H
    points = [pt(f"p{i}", start + i * 300) for i in range(int(bucket_h * 12))]
    keep = points_to_keep([pt("new", newest), *points], 15 * D)
    assert keep == {"new", points[-1].point_id}


def test_bands_edges() -> None:
    assert [(b.min_age_s, b.max_age_s, b.bucket_s) for b in BANDS] == [
        (2 * H, 1 * D, 1 * H),
        (1 * D, 7 * D, 2 * H),
        (7 * D, math.inf, 4 * H),
    ]


def test_points_older_than_retention_are_dropped_edge_inclusive() -> None:
    newest = T0 + 30 * D
    points = [
        pt("new", newest),
        pt("at-edge", newest - 3 * D),
        pt("too-old", newest - 3 * D - 1, app=True),
    ]
    assert points_to_keep(points, 3 * D) == {"new", "at-edge"}
    assert points_to_expire(points, 3 * D) == {"too-old"}


def test_nothing_expires_when_replication_stops() -> None:
    """Ages count from the newest point, not the wall clock: thinning again later, with no new
    points, keeps everything that was kept, including the oldest point inside the retention."""
    points = [pt(f"p{i}", T0 + i * H) for i in range(24)]  # one point per hour bucket, 23h span
    first = points_to_keep(points, 24 * H)
    assert first == {p.point_id for p in points}
    kept = [p for p in points if p.point_id in first]
    assert points_to_keep(kept, 24 * H) == first


def test_newest_app_consistent_point_is_kept() -> None:
    newest = T0 + 20 * H
    points = [pt("new", newest), pt("app", T0 + 5 * H, app=True), pt("later", T0 + 5 * H + 60)]
    assert "app" in points_to_keep(points, 24 * H)
    assert "later" not in points_to_keep(points, 24 * H)


def test_ties_on_time_are_deterministic() -> None:
    newest = T0 + 20 * H
    points = [pt("new", newest), pt("b", T0 + 5 * H), pt("a", T0 + 5 * H)]
    assert points_to_keep(points, 24 * H) == {"new", "b"}
    assert points_to_keep(list(reversed(points)), 24 * H) == {"new", "b"}


# --- properties ---------------------------------------------------------------------------------

MAX_SPAN = 20 * D


@st.composite
def point_sets(draw: st.DrawFn) -> list[PointStamp]:
    base = T0 + draw(st.integers(min_value=0, max_value=4 * 3600 - 1))
    offsets = draw(
        st.lists(
            st.one_of(
                st.integers(min_value=0, max_value=int(MAX_SPAN)),
                # Cluster many points near the newest end and near band edges.
                st.integers(min_value=int(MAX_SPAN - 3 * H), max_value=int(MAX_SPAN)),
            ),
            min_size=1,
            max_size=150,
        )
    )
    apps = draw(st.lists(st.booleans(), min_size=len(offsets), max_size=len(offsets)))
    return [pt(f"p{i}", base + off, app) for i, (off, app) in enumerate(zip(offsets, apps, strict=True))]


retentions = st.one_of(
    st.sampled_from([H, 2 * H, 24 * H, 3 * D, 7 * D, 15 * D]),
    st.floats(min_value=H, max_value=15 * D),
)


def _newest_time(points: list[PointStamp]) -> float:
    return max(p.created_at for p in points)


@given(point_sets(), retentions)
def test_prop_newest_kept(points: list[PointStamp], retention: float) -> None:
    keep = points_to_keep(points, retention)
    newest = max(points, key=lambda p: (p.created_at, p.point_id))
    assert newest.point_id in keep


@given(point_sets(), retentions)
def test_prop_all_within_two_hours_kept(points: list[PointStamp], retention: float) -> None:
    keep = points_to_keep(points, retention)
    now = _newest_time(points)
    window = min(KEEP_ALL_S, retention)
    assert {p.point_id for p in points if now - p.created_at <= window} <= keep


@given(point_sets(), retentions)
def test_prop_at_most_one_per_bucket_per_band(points: list[PointStamp], retention: float) -> None:
    keep = points_to_keep(points, retention)
    now = _newest_time(points)
    seen: set[tuple[int, int]] = set()
    for p in points:
        if p.point_id not in keep:
            continue
        age = now - p.created_at
        for index, band in enumerate(BANDS):
            if band.min_age_s < age <= band.max_age_s:
                key = (index, math.floor(p.created_at / band.bucket_s))
                assert key not in seen
                seen.add(key)


@given(point_sets(), retentions)
def test_prop_idempotent(points: list[PointStamp], retention: float) -> None:
    keep = points_to_keep(points, retention)
    kept = [p for p in points if p.point_id in keep]
    assert points_to_keep(kept, retention) == keep


@given(point_sets(), retentions)
def test_prop_never_keeps_older_than_retention(points: list[PointStamp], retention: float) -> None:
    keep = points_to_keep(points, retention)
    now = _newest_time(points)
    assert all(now - p.created_at <= retention for p in points if p.point_id in keep)


@given(point_sets(), retentions, retentions)
def test_prop_monotone_in_retention(points: list[PointStamp], r1: float, r2: float) -> None:
    short, long = sorted((r1, r2))
    assert points_to_keep(points, short) <= points_to_keep(points, long)


@given(point_sets(), retentions)
def test_prop_bucket_choice_prefers_app_consistent(points: list[PointStamp], retention: float) -> None:
    """A thinned bucket that had an app-consistent point keeps an app-consistent point."""
    keep = points_to_keep(points, retention)
    now = _newest_time(points)
    groups: dict[tuple[int, int], list[PointStamp]] = {}
    for p in points:
        age = now - p.created_at
        if age > retention:
            continue
        for index, band in enumerate(BANDS):
            if band.min_age_s < age <= band.max_age_s:
                groups.setdefault((index, math.floor(p.created_at / band.bucket_s)), []).append(p)
    for members in groups.values():
        if any(m.app_consistent for m in members):
            assert any(m.app_consistent and m.point_id in keep for m in members)


@settings(max_examples=10, deadline=None)
@given(st.integers(min_value=0, max_value=4 * 3600 - 1), st.integers(min_value=5, max_value=60))
def test_prop_stable_as_time_advances(start_offset: int, step_min: int) -> None:
    """Replicate every ``step`` and thin after each new point, as the service does: every point
    dropped on the way is out of retention or has a survivor in its band bucket."""
    step = step_min * 60.0
    retention = 1 * D
    base = T0 + start_offset
    kept: list[PointStamp] = []
    for i in range(int(1.5 * D / step)):
        kept.append(pt(f"p{i}", base + i * step))
        keep = points_to_keep(kept, retention)
        now = kept[-1].created_at
        survivors = [p for p in kept if p.point_id in keep]
        for p in kept:
            if p.point_id in keep:
                continue
            # A dropped point is either too old, or another point of its band bucket was kept.
            age = now - p.created_at
            if age > retention:
                continue
            index = next(j for j, b in enumerate(BANDS) if b.min_age_s < age <= b.max_age_s)
            bucket = math.floor(p.created_at / BANDS[index].bucket_s)
            assert any(
                math.floor(s.created_at / BANDS[index].bucket_s) == bucket
                and BANDS[index].min_age_s < now - s.created_at <= BANDS[index].max_age_s
                for s in survivors
            )
        kept = survivors
