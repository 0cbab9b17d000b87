"""QemuSource, MachineDaemon, QmpClient and the libnbd helpers against a real qemu-storage-daemon.

Disks are small (64 MiB qcow2); a workload writes through the daemon's writable NBD exports as
a guest would.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.adapters.sources import nbd as nbdio
from siterecovery.adapters.sources.qemu import QemuSource
from siterecovery.adapters.sources.qemu_daemon import MachineDaemon, create_qcow2
from siterecovery.adapters.sources.qmp import QmpClient
from siterecovery.errors import NotFound, SourceError
from siterecovery.ports.source import Extent

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon"),
]

MiB = 1024 * 1024
K64 = 65536
DISK_SIZE = 64 * MiB


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Short path on purpose: unix socket paths are limited to 107 bytes and pytest's tmp_path
    # grows with the test name.
    path = Path(tempfile.mkdtemp(prefix="sr-qemu-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(base_dir: Path) -> Iterator[MachineDaemon]:
    disks = {name: create_qcow2(base_dir / f"{name}.qcow2", DISK_SIZE) for name in ("disk0", "disk1")}
    d = MachineDaemon.start(base_dir / "run", disks)
    yield d
    try:
        d.stop(timeout=5)
    finally:
        d.kill()


@pytest.fixture
def source(daemon: MachineDaemon, base_dir: Path) -> Iterator[QemuSource]:
    src = QemuSource(daemon.qmp_socket, {"disk0": "disk0", "disk1": "disk1"}, base_dir / "work")
    yield src
    src.close()


@pytest.fixture
def writers(daemon: MachineDaemon) -> Iterator[dict[str, nbdio.HandlePool]]:
    pools = {name: nbdio.HandlePool(daemon.nbd_socket, name) for name in ("disk0", "disk1")}
    yield pools
    for pool in pools.values():
        pool.close()


def _write(pool: nbdio.HandlePool, offset: int, data: bytes) -> None:
    pool.pwrite(data, offset)
    pool.flush()


def _leftovers(daemon: MachineDaemon, work_dir: Path) -> dict[str, list[str]]:
    with QmpClient(daemon.qmp_socket) as qmp:
        jobs = [j["id"] for j in qmp.execute("query-jobs")]
        exports = [e["id"] for e in qmp.execute("query-block-exports") if not e["id"].startswith("export-")]
        nodes = [
            n["node-name"]
            for n in qmp.execute("query-named-block-nodes", flat=True)
            if n["node-name"].startswith("srf-")
        ]
    files = sorted(p.name for p in work_dir.glob("fleece-*")) if work_dir.exists() else []
    return {"jobs": jobs, "exports": exports, "nodes": nodes, "files": files}


NOTHING_LEFT: dict[str, list[str]] = {"jobs": [], "exports": [], "nodes": [], "files": []}


def test_first_snapshot_has_unknown_changes_then_exact_extents(
    source: QemuSource, writers: dict[str, nbdio.HandlePool]
) -> None:
    _write(writers["disk0"], 0, b"A" * K64)
    _write(writers["disk1"], 8 * MiB, b"B" * 1000)

    before = time.time()
    snap = source.snapshot(["disk0", "disk1"])
    assert before <= snap.captured_at <= time.time()
    assert snap.point_in_time is True
    assert snap.tracking == "dirty-bitmap"
    assert snap.disks["disk0"].size == DISK_SIZE
    assert snap.disks["disk0"].changed_extents() is None
    assert snap.disks["disk1"].changed_extents() is None
    assert list(snap.disks["disk0"].allocated_extents()) == [Extent(0, K64)]
    assert snap.disks["disk1"].read(8 * MiB, 1000) == b"B" * 1000
    snap.commit()

    # Unaligned writes, one crossing a 64 KiB boundary, and one larger write.
    _write(writers["disk0"], 3 * MiB + 100, b"c" * 10)
    _write(writers["disk0"], 10 * MiB - 10, b"d" * 20)
    _write(writers["disk1"], 20 * MiB, b"e" * (200 * 1024))

    snap = source.snapshot(["disk0", "disk1"])
    assert snap.tracking == "dirty-bitmap"
    assert snap.disks["disk0"].changed_extents() == [
        Extent(3 * MiB, K64),
        Extent(10 * MiB - K64, 2 * K64),
    ]
    assert snap.disks["disk1"].changed_extents() == [Extent(20 * MiB, 4 * K64)]
    assert Extent(3 * MiB, K64) in list(snap.disks["disk0"].allocated_extents())
    snap.commit()

    snap = source.snapshot(["disk0", "disk1"])
    assert snap.disks["disk0"].changed_extents() == []
    assert snap.disks["disk1"].changed_extents() == []
    snap.commit()


def test_view_is_frozen_while_the_workload_keeps_writing(
    source: QemuSource, writers: dict[str, nbdio.HandlePool]
) -> None:
    old0 = os.urandom(4 * MiB)
    old1 = os.urandom(K64)
    _write(writers["disk0"], 1 * MiB, old0)
    _write(writers["disk1"], 0, old1)

    with source.snapshot(["disk0", "disk1"]) as snap:
        # Overwrite everything the view holds, plus a hole, after the capture.
        _write(writers["disk0"], 1 * MiB, b"\xff" * (4 * MiB))
        _write(writers["disk0"], 40 * MiB, b"\xee" * K64)
        _write(writers["disk1"], 0, b"\xdd" * K64)
        view0, view1 = snap.disks["disk0"], snap.disks["disk1"]
        assert view0.read(1 * MiB, 4 * MiB) == old0
        assert view0.read(40 * MiB, K64) == bytes(K64)
        assert view1.read(0, K64) == old1
        # The same from several threads at once (one NBD connection per thread).
        results: list[bool] = []

        def reader(off: int) -> None:
            results.append(view0.read(1 * MiB + off, MiB) == old0[off : off + MiB])

        threads = [threading.Thread(target=reader, args=(i * MiB,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 4
        assert [e for e in view0.allocated_extents() if e.offset >= 40 * MiB] == []
        snap.commit()

    with source.snapshot(["disk0"]) as snap:
        assert snap.disks["disk0"].changed_extents() == [
            Extent(1 * MiB, 4 * MiB),
            Extent(40 * MiB, K64),
        ]
        assert snap.disks["disk0"].read(1 * MiB, 8) == b"\xff" * 8
        snap.commit()


def test_snapshot_is_crash_consistent_across_disks(source: QemuSource, daemon: MachineDaemon) -> None:
    # Writer: sequence number n goes to disk0, then (after disk0 acknowledged it) to disk1.
    # A view of both disks from one instant has disk1 == disk0 or disk1 == disk0 - 1; views
    # taken at different instants would sooner or later show disk1 > disk0 or a larger gap.
    stop = threading.Event()
    errors: list[BaseException] = []
    written = [0]

    def writer() -> None:
        a = nbdio.connect(daemon.nbd_socket, "disk0")
        b = nbdio.connect(daemon.nbd_socket, "disk1")
        try:
            n = 0
            while not stop.is_set():
                n += 1
                rec = struct.pack("<Q", n) * 512
                a.pwrite(rec, 0)
                b.pwrite(rec, 0)
                written[0] = n
        except BaseException as err:
            errors.append(err)
        finally:
            nbdio.close_handle(a)
            nbdio.close_handle(b)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 5
        while len(seen) < 12 and time.monotonic() < deadline:
            with source.snapshot(["disk0", "disk1"]) as snap:
                a = struct.unpack("<Q", snap.disks["disk0"].read(0, 8))[0]
                b = struct.unpack("<Q", snap.disks["disk1"].read(0, 8))[0]
                time.sleep(0.01)
                # Still the same after the writer moved on.
                assert struct.unpack("<Q", snap.disks["disk0"].read(0, 8))[0] == a
                assert snap.disks["disk0"].read(0, 4096) == struct.pack("<Q", a) * 512
                snap.commit()
            seen.append((a, b))
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert len(seen) >= 5
    assert written[0] > seen[-1][0]  # the writer really ran during the snapshots
    for a, b in seen:
        assert a - 1 <= b <= a, seen
    assert any(a > 0 for a, _ in seen)


def test_abort_keeps_every_change_since_the_last_commit(
    source: QemuSource, writers: dict[str, nbdio.HandlePool]
) -> None:
    # Aborting the very first snapshot: the next one must still say "unknown".
    snap = source.snapshot(["disk0"])
    snap.abort()
    snap = source.snapshot(["disk0"])
    assert snap.disks["disk0"].changed_extents() is None
    snap.commit()

    _write(writers["disk0"], 2 * MiB, b"x" * 10)
    snap = source.snapshot(["disk0"])
    assert snap.disks["disk0"].changed_extents() == [Extent(2 * MiB, K64)]
    snap.abort()

    _write(writers["disk0"], 5 * MiB, b"y" * 10)
    snap = source.snapshot(["disk0"])
    assert snap.disks["disk0"].changed_extents() == [Extent(2 * MiB, K64), Extent(5 * MiB, K64)]
    snap.commit()

    snap = source.snapshot(["disk0"])
    assert snap.disks["disk0"].changed_extents() == []
    snap.commit()


def test_exception_in_context_aborts(source: QemuSource, writers: dict[str, nbdio.HandlePool]) -> None:
    source.snapshot(["disk1"]).commit()
    _write(writers["disk1"], 0, b"z")
    with pytest.raises(RuntimeError), source.snapshot(["disk1"]):
        raise RuntimeError("storing the point failed")
    with source.snapshot(["disk1"]) as snap:
        assert snap.disks["disk1"].changed_extents() == [Extent(0, K64)]
        snap.commit()


def test_uncommitted_generations_are_unioned(
    source: QemuSource, daemon: MachineDaemon, base_dir: Path, writers: dict[str, nbdio.HandlePool]
) -> None:
    source.snapshot(["disk0"]).commit()
    _write(writers["disk0"], 0, b"1")
    # A replicator that dies with a snapshot open leaves an old bitmap disabled and the
    # fleecing objects in place; a new source cleans them up and must report the union.
    stale = source.snapshot(["disk0"])
    stale._state = "closed"  # simulate the process dying: nothing is finished
    for view in stale.disks.values():
        view.close()
    _write(writers["disk0"], 7 * MiB, b"2")
    fresh = QemuSource(daemon.qmp_socket, {"disk0": "disk0"}, base_dir / "work")
    with pytest.raises(SourceError, match="in use by another open snapshot"):
        fresh.snapshot(["disk0"])
    assert len(fresh.cleanup_stale()) == 4  # export, job, node, overlay file
    with fresh.snapshot(["disk0"]) as snap:
        assert snap.disks["disk0"].changed_extents() == [Extent(0, K64), Extent(7 * MiB, K64)]
        snap.commit()
    with fresh.snapshot(["disk0"]) as snap:
        assert snap.disks["disk0"].changed_extents() == []
        snap.commit()
    fresh.close()
    source._forget(stale)


def _write_once(daemon: MachineDaemon, disk: str, offset: int, data: bytes) -> None:
    pool = nbdio.HandlePool(daemon.nbd_socket, disk)
    _write(pool, offset, data)
    pool.close()


def test_clean_stop_keeps_tracking(source: QemuSource, daemon: MachineDaemon) -> None:
    source.snapshot(["disk0", "disk1"]).commit()
    _write_once(daemon, "disk0", 0, b"a")
    daemon.stop()
    daemon.restart()
    _write_once(daemon, "disk1", MiB, b"b")
    with source.snapshot(["disk0", "disk1"]) as snap:
        assert snap.tracking == "dirty-bitmap"
        assert snap.disks["disk0"].changed_extents() == [Extent(0, K64)]
        assert snap.disks["disk1"].changed_extents() == [Extent(MiB, K64)]
        snap.commit()


def test_unclean_stop_with_stored_bitmap_reports_inconsistent(
    source: QemuSource, daemon: MachineDaemon
) -> None:
    source.snapshot(["disk0", "disk1"]).commit()
    daemon.stop()
    daemon.restart()  # the bitmaps are now stored in the qcow2 files, marked in use
    _write_once(daemon, "disk1", MiB, b"b")
    daemon.kill()
    assert not daemon.is_running()
    daemon.restart()
    with source.snapshot(["disk0", "disk1"]) as snap:
        assert snap.tracking == "lost: bitmap inconsistent after an unclean stop"
        assert snap.disks["disk0"].changed_extents() is None
        assert snap.disks["disk1"].changed_extents() is None
        assert snap.disks["disk1"].read(MiB, 1) == b"b"
        snap.commit()

    # Tracking resumes from the point committed after the loss.
    _write_once(daemon, "disk1", 3 * MiB, b"c")
    with source.snapshot(["disk0", "disk1"]) as snap:
        assert snap.tracking == "dirty-bitmap"
        assert snap.disks["disk0"].changed_extents() == []
        assert snap.disks["disk1"].changed_extents() == [Extent(3 * MiB, K64)]
        snap.commit()


def test_unclean_stop_before_bitmap_was_stored_reports_missing(
    source: QemuSource, daemon: MachineDaemon
) -> None:
    source.snapshot(["disk0", "disk1"]).commit()
    _write_once(daemon, "disk0", 0, b"a")
    daemon.kill()  # the bitmap existed only in memory
    daemon.restart()
    with source.snapshot(["disk0", "disk1"]) as snap:
        assert snap.tracking.startswith("lost: bitmap missing")
        assert snap.disks["disk0"].changed_extents() is None
        snap.abort()
    # Aborting a lost snapshot must not make the next one look tracked.
    with source.snapshot(["disk0"]) as snap:
        assert snap.tracking.startswith("lost: bitmap missing")
        assert snap.disks["disk0"].changed_extents() is None
        snap.commit()
    with source.snapshot(["disk0"]) as snap:
        assert snap.tracking == "dirty-bitmap"
        assert snap.disks["disk0"].changed_extents() == []
        snap.commit()


def test_teardown_leaves_nothing(source: QemuSource, daemon: MachineDaemon, base_dir: Path) -> None:
    work = base_dir / "work"
    snap = source.snapshot(["disk0", "disk1"])
    during = _leftovers(daemon, work)
    assert len(during["jobs"]) == 2 and len(during["exports"]) == 2 and len(during["files"]) == 2
    snap.commit()
    assert _leftovers(daemon, work) == NOTHING_LEFT
    snap.close()  # idempotent after commit

    snap = source.snapshot(["disk0", "disk1"])
    snap.abort()
    assert _leftovers(daemon, work) == NOTHING_LEFT

    source.snapshot(["disk0"]).close()
    assert _leftovers(daemon, work) == NOTHING_LEFT

    source.snapshot(["disk0"])  # left open: closing the source tears it down
    source.close()
    assert _leftovers(daemon, work) == NOTHING_LEFT


def test_close_after_the_machine_died_removes_files(
    source: QemuSource, daemon: MachineDaemon, base_dir: Path
) -> None:
    snap = source.snapshot(["disk0", "disk1"])
    assert len(list((base_dir / "work").glob("fleece-*"))) == 2
    daemon.kill()
    snap.close()
    snap.close()
    assert list((base_dir / "work").glob("fleece-*")) == []


def test_reset_tracking_and_bad_requests(source: QemuSource, writers: dict[str, nbdio.HandlePool]) -> None:
    source.snapshot(["disk0"]).commit()
    source.reset_tracking()
    with source.snapshot(["disk0"]) as snap:
        assert snap.disks["disk0"].changed_extents() is None
        with pytest.raises(SourceError, match="already committed"):
            snap.commit()
            snap.abort()
    with pytest.raises(NotFound, match="disk 'nope' not found"):
        source.snapshot(["nope"])
    bad = QemuSource(source.qmp_socket, {"disk0": "no-such-node"}, source.work_dir)
    with pytest.raises(SourceError, match="no block node 'no-such-node'"):
        bad.snapshot(["disk0"])


def test_own_nbd_server_when_none_is_known(daemon: MachineDaemon, base_dir: Path) -> None:
    # Without a known NBD socket the source starts its own server; the daemon already runs
    # one, which QEMU refuses, and the message says what to pass instead.
    (Path(daemon.run_dir) / "daemon.json").rename(base_dir / "hidden.json")
    src = QemuSource(daemon.qmp_socket, {"disk0": "disk0"}, base_dir / "own")
    with pytest.raises(SourceError, match="pass its unix socket as nbd_socket"):
        src.snapshot(["disk0"])
    src.close()
    src = QemuSource(daemon.qmp_socket, {"disk0": "disk0"}, base_dir / "own", nbd_socket=daemon.nbd_socket)
    with src.snapshot(["disk0"]) as snap:
        assert snap.disks["disk0"].read(0, 4) == bytes(4)
        snap.commit()
    src.close()


def test_machine_daemon_attach_and_stop(daemon: MachineDaemon, base_dir: Path) -> None:
    other = MachineDaemon.attach(daemon.run_dir)
    assert other.pid == daemon.pid and other.is_running()
    assert other.nbd_socket == daemon.nbd_socket and other.disks == daemon.disks
    other.stop()
    assert not other.is_running()
    assert not daemon.is_running()
    daemon.restart()
    assert daemon.is_running()
    with pytest.raises(SourceError, match="no machine daemon state"):
        MachineDaemon.attach(base_dir / "nowhere")


def test_qmp_client_errors_and_events(daemon: MachineDaemon) -> None:
    with QmpClient(daemon.qmp_socket, timeout=5) as qmp:
        assert "qemu" in qmp.execute("query-version")
        with pytest.raises(SourceError, match="no-such-command") as info:
            qmp.execute("no-such-command")
        assert info.value.fields["error_class"] == "CommandNotFound"
        with pytest.raises(SourceError, match="did not arrive"):
            qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=0.1)
        # Events are buffered and can be waited for after the fact.
        qmp.execute("block-export-del", id="export-disk1")
        event = qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=5)
        assert event["data"]["id"] == "export-disk1"
    with pytest.raises(SourceError, match="cannot connect"):
        QmpClient(str(Path(daemon.run_dir) / "missing.sock"))


def test_nbd_helpers_parallel_round_trip(daemon: MachineDaemon) -> None:
    pool = nbdio.HandlePool(daemon.nbd_socket, "disk0")
    data = os.urandom(12 * MiB + 123)
    nbdio.parallel_pwrite(pool, [(MiB, data[: 6 * MiB]), (7 * MiB, data[6 * MiB :])], workers=3)
    got = bytearray(len(data))

    def consume(ext: Extent, buf: bytes) -> None:
        got[ext.offset - MiB : ext.end - MiB] = buf

    nbdio.parallel_pread(pool, [Extent(MiB, len(data))], consume, workers=3)
    assert bytes(got) == data
    h = nbdio.connect(daemon.nbd_socket, "disk0", [nbdio.BASE_ALLOCATION])
    assert nbdio.data_extents(h) == [Extent(MiB, 12 * MiB + K64)]
    nbdio.close_handle(h)
    pool.close()


def test_coalesce() -> None:
    exts = [Extent(200_000, 10), Extent(0, 1), Extent(K64 - 1, 2), Extent(5, 0)]
    assert nbdio.coalesce(exts, K64, size=230_000) == [Extent(0, 2 * K64), Extent(3 * K64, 230_000 - 3 * K64)]
    assert list(nbdio.split([Extent(0, 10)], 4)) == [Extent(0, 4), Extent(4, 4), Extent(8, 2)]
