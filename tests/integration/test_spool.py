"""The process server's spool on real files: durability, replay after a crash (torn tails
included), draining in order, backpressure, and a datastore that goes away and comes back."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from siterecovery.adapters.chunk_stores import MemoryChunkStore
from siterecovery.dataplane.spool import (
    RECORD_HEADER,
    DatastoreUnavailable,
    Spool,
    SpoolBusy,
    SpoolError,
    encode_record,
)
from siterecovery.errors import ChunkMissing, DatastoreError

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


class OutageStore(MemoryChunkStore):
    """A real in-memory chunk store that can be switched off (a datastore outage) and that
    records the order of inserts."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.order: list[bytes] = []
        self.flushes = 0

    def _check(self) -> None:
        if self.down.is_set():
            raise DatastoreError("connection refused by the S3 endpoint")

    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        self._check()
        self.order.append(chunk_id)
        return super().insert(chunk_id, blob)

    def missing(self, chunk_ids):  # type: ignore[no-untyped-def]
        self._check()
        return super().missing(chunk_ids)

    def flush(self) -> None:
        self._check()
        self.flushes += 1


def chunk(i: int, size: int = 1000) -> tuple[bytes, bytes]:
    return i.to_bytes(32, "big"), bytes([i % 251]) * size


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.spool"))


def open_spool(path: Path, store: OutageStore, **kw: object) -> Spool:
    kw.setdefault("flush_interval", 0.05)
    kw.setdefault("retry_max", 0.2)
    return Spool(path, store, kw.pop("limit_bytes", 64 * MIB), **kw)  # type: ignore[arg-type]


def test_acknowledged_chunks_reach_the_store_in_order_and_segments_go(tmp_path: Path) -> None:
    store = OutageStore()
    with open_spool(tmp_path / "spool", store) as spool:
        items = [chunk(i) for i in range(1, 301)]
        for k in range(0, 300, 50):
            assert spool.put_many(items[k : k + 50]) == [True] * 50
        spool.flush(timeout=10)
        assert store.order == [cid for cid, _ in items]
        assert all(store.get(cid) == blob for cid, blob in items)
        assert store.flushes >= 1
        st = spool.status()
        assert st["backlog_chunks"] == 0 and st["backlog_bytes"] == 0 and st["state"] == "ok"
        deadline = time.monotonic() + 5
        while segments(tmp_path / "spool") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert segments(tmp_path / "spool") == []


def test_duplicates_are_spooled_once_and_reported_as_not_new(tmp_path: Path) -> None:
    store = OutageStore()
    store.down.set()  # keep everything in the spool
    with open_spool(tmp_path / "spool", store) as spool:
        a, b = chunk(1), chunk(2)
        assert spool.put_many([a, b, a]) == [True, True, False]
        assert spool.put_many([b]) == [False]
        assert spool.status()["backlog_chunks"] == 2


def test_a_restart_replays_everything_acknowledged(tmp_path: Path) -> None:
    store = OutageStore()
    spool = open_spool(tmp_path / "spool", store, start=False)  # nothing drains: a crash right after acks
    items = [chunk(i, 5000) for i in range(1, 41)]
    spool.put_many(items[:20])
    spool.put_many(items[20:])
    spool.close()
    assert store.order == []

    with open_spool(tmp_path / "spool", store, start=False) as again:
        st = again.status()
        assert st["backlog_chunks"] == 40 and st["backlog_bytes"] == 40 * 5000
        assert again.missing([cid for cid, _ in items]) == set()  # spooled counts as present
        assert store.order == []
        again.start()
        again.flush(timeout=10)
        assert store.order == [cid for cid, _ in items]


def test_a_torn_tail_is_cut_off_and_everything_before_it_kept(tmp_path: Path) -> None:
    store = OutageStore()
    spool = open_spool(tmp_path / "spool", store, start=False)
    items = [chunk(i, 3000) for i in range(1, 11)]
    spool.put_many(items)
    spool.close()
    (seg,) = segments(tmp_path / "spool")
    good_size = seg.stat().st_size
    # A crash in the middle of appending the next batch: half a record, never acknowledged.
    torn = encode_record(*chunk(99, 3000))
    with open(seg, "ab") as f:
        f.write(torn[: RECORD_HEADER.size + 1000])

    with open_spool(tmp_path / "spool", store, start=False) as again:
        assert seg.stat().st_size == good_size
        st = again.status()
        assert st["backlog_chunks"] == 10 and st["problems"] == []
        again.start()
        # Appends after the repair land after the good records.
        again.put_many([chunk(11, 3000)])
        again.flush(timeout=10)
        assert store.order == [cid for cid, _ in items] + [chunk(11)[0]]


def test_a_record_failing_its_crc_in_the_tail_is_treated_as_torn(tmp_path: Path) -> None:
    store = OutageStore()
    spool = open_spool(tmp_path / "spool", store, start=False)
    spool.put_many([chunk(1)])
    spool.put_many([chunk(2)])
    spool.close()
    (seg,) = segments(tmp_path / "spool")
    with open(seg, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")  # the last record's blob no longer matches its CRC
    with open_spool(tmp_path / "spool", store) as again:
        again.flush(timeout=10)
        assert store.order == [chunk(1)[0]]


def test_damage_in_an_older_segment_is_reported(tmp_path: Path) -> None:
    store = OutageStore()
    spool = open_spool(tmp_path / "spool", store, start=False, segment_bytes=4096)
    for i in range(1, 5):
        spool.put_many([chunk(i, 3000)])  # one record per segment
    spool.close()
    first = segments(tmp_path / "spool")[0]
    with open(first, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\0" * 10)
    with open_spool(tmp_path / "spool", store) as again:
        problems = again.status()["problems"]
        assert len(problems) == 1 and first.name in problems[0] and "lost" in problems[0]
        again.flush(timeout=10)
        assert store.order == [chunk(i)[0] for i in (2, 3, 4)]


def test_datastore_outage_is_absorbed_reported_and_drained_when_it_returns(tmp_path: Path) -> None:
    store = OutageStore()
    with open_spool(tmp_path / "spool", store) as spool:
        store.down.set()
        items = [chunk(i, 4000) for i in range(1, 101)]
        # The dedup question cannot be answered by the datastore: everything not spooled is lacking.
        assert spool.missing([cid for cid, _ in items[:5]]) == {cid for cid, _ in items[:5]}
        for k in range(0, 100, 10):
            spool.put_many(items[k : k + 10])  # still acknowledged: the spool absorbs it
        with pytest.raises(DatastoreUnavailable, match="Nothing is lost") as err:
            spool.flush(timeout=0.5)
        assert "connection refused" in str(err.value)
        st = spool.status()
        assert st["state"] == "datastore-unavailable"
        assert "connection refused" in st["datastore_error"]
        assert st["backlog_chunks"] == 100 and st["oldest_age_s"] > 0.4

        store.down.clear()
        spool.flush(timeout=10)
        assert store.order[-100:] == [cid for cid, _ in items]  # in order, none dropped
        st = spool.status()
        assert st["state"] == "ok" and st["datastore_error"] is None and st["backlog_chunks"] == 0


def test_a_full_spool_tells_agents_to_slow_down_until_it_drains(tmp_path: Path) -> None:
    store = OutageStore()
    store.down.set()
    limit = 2 * MIB
    with open_spool(
        tmp_path / "spool", store, limit_bytes=limit, high_watermark=0.5, low_watermark=0.25
    ) as spool:
        accepted = 0
        with pytest.raises(SpoolBusy) as busy:
            for i in range(1, 1000):
                spool.put_many([chunk(i, 64 * 1024)])
                accepted += 1
        assert 0.4 * limit <= accepted * 64 * 1024 <= 0.6 * limit
        assert busy.value.retry_after > 0 and "datastore" in busy.value.reason
        assert spool.status()["throttling"]
        assert spool.status()["busy_replies"] == 1

        store.down.clear()
        spool.flush(timeout=10)
        deadline = time.monotonic() + 5
        while spool.status()["throttling"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not spool.status()["throttling"]
        assert spool.put_many([chunk(5000, 64 * 1024)]) == [True]
        spool.flush(timeout=10)
        assert len(set(store.order)) == accepted + 1


def test_get_serves_spooled_chunks_then_the_datastore(tmp_path: Path) -> None:
    store = OutageStore()
    store.down.set()
    with open_spool(tmp_path / "spool", store) as spool:
        cid, blob = chunk(7, 10_000)
        spool.put_many([(cid, blob)])
        assert spool.get(cid) == blob  # still only in the spool
        store.down.clear()
        spool.flush(timeout=10)
        assert spool.get(cid) == blob  # now from the datastore
        with pytest.raises(ChunkMissing):
            spool.get(chunk(8)[0])


def test_one_spool_directory_serves_one_process_server(tmp_path: Path) -> None:
    store = OutageStore()
    with open_spool(tmp_path / "spool", store), pytest.raises(SpoolError, match="in use"):
        open_spool(tmp_path / "spool", store)
