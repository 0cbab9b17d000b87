"""Test failover (drill) with real machines: the test machine is built at the recovery site from
a recovery point with independent disks, replication goes on during the drill with the point in
use pinned against retention, operations the state does not allow are refused with the state
and the allowed operations named, and cleanup leaves no file and no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from sqlalchemy import select

from siterecovery.adapters.db.models import PointRow
from siterecovery.adapters.sources.qemu_daemon import MachineDaemon
from siterecovery.control import networks, protection, test_failover
from siterecovery.control.protection import list_points
from siterecovery.control.replication import take_point
from siterecovery.errors import OperationNotAllowed

MIB = 1024 * 1024
HOUR = 3600.0

pytestmark = pytest.mark.integration


def _connect(socket: str, disk: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{disk}?socket={socket}")
    return h


def _read(socket: str, disk: str, offset: int, length: int) -> bytes:
    h = _connect(socket, disk)
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


def _write(socket: str, disk: str, offset: int, data: bytes) -> None:
    h = _connect(socket, disk)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    needle = text.encode()
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if needle in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(pid))
    return pids


def _age_points(lab, point_ids: list[str], seconds: float) -> None:
    """Move points back in time (retention judges ages from the points' own times)."""
    with lab.vault.store.uow() as s:
        for row in s.scalars(select(PointRow).where(PointRow.id.in_(point_ids))):
            row.created_at -= seconds


def _refused(fn, *args, **kw) -> str:
    with pytest.raises(OperationNotAllowed) as exc:
        fn(*args, **kw)
    return str(exc.value)


def test_test_failover_builds_an_independent_machine_and_cleanup_removes_everything(lab_factory):
    lab = lab_factory(size=32 * MIB, data=4 * MIB)
    job = lab.enable("vm1")
    assert job["state"] == "Succeeded", job["error"]
    src = lab.machines["vm1"].daemon
    assert src is not None
    old_point = job["result"]["initial_point"]
    _write(src.nbd_socket, "disk1", 20 * MIB, b"after-the-first-point" * 100)
    drill_point = take_point(lab.vault, "vm1").point_id

    msg = _refused(test_failover.cleanup_test_failover, lab.vault, "vm1")
    assert "state Protected" in msg and "test-failover" in msg

    info = test_failover.start_test_failover(lab.vault, "vm1", "latest")
    assert info["point_id"] == drill_point and info["point_type"] == "crash-consistent"
    assert lab.item("vm1")["state"] == "StartingTestFailover"
    msg = _refused(test_failover.start_test_failover, lab.vault, "vm1")
    assert "state StartingTestFailover" in msg and "none while" in msg

    job = lab.run_job(info["job"])
    assert job["state"] == "Succeeded", job["error"]
    item = lab.item("vm1")
    assert item["state"] == "TestFailover"
    assert item["allowed_operations"] == ["test-failover-cleanup", "disable"]
    assert item["test_failover"]["point_id"] == drill_point

    # The test machine: machine.json and its own disks under the recovery site path.
    tdir = lab.root / "recovery" / "machines" / "vm1-test"
    machine = json.loads((tdir / "machine.json").read_text())
    assert machine["name"] == "vm1-test" and machine["source_machine"] == "vm1"
    assert machine["recovery_point"]["id"] == drill_point
    # A drill never joins production: its NIC is on a test network made for this drill, with the
    # production subnet's address space, and keeps its address there (it is free in that network).
    test_net = item["test_failover"]["test_network"]
    assert test_net.startswith("vm1-test-")
    assert [(n["network"], n["ip"], n["primary"]) for n in machine["nics"]] == [(test_net, "10.0.0.10", True)]
    assert (tdir / "domain.xml").exists() and (tdir / "seed" / "network-config").exists()
    assert test_net in {n["name"] for n in networks.list_networks(lab.vault, "recovery")}
    for disk in machine["disks"]:
        path = Path(disk["path"])
        assert path.parent == tdir and path.exists()
        qinfo = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert qinfo["format"] == "qcow2" and "backing-filename" not in qinfo  # an independent copy

    # The test machine runs and takes writes; the source does not see them.
    test = MachineDaemon.attach(tdir / "run")
    assert test.is_running()
    source_before = _read(src.nbd_socket, "disk0", 0, MIB)
    assert _read(test.nbd_socket, "disk0", 0, MIB) == source_before
    assert _read(test.nbd_socket, "disk1", 20 * MIB, 21) == b"after-the-first-point"
    scribble = os.urandom(256 * 1024)
    _write(test.nbd_socket, "disk0", 0, scribble)
    assert _read(test.nbd_socket, "disk0", 0, len(scribble)) == scribble
    assert _read(src.nbd_socket, "disk0", 0, MIB) == source_before

    # Operations the state does not allow are refused, naming the state and what is allowed.
    msg = _refused(test_failover.start_test_failover, lab.vault, "vm1")
    assert "state TestFailover" in msg and "test-failover-cleanup, disable" in msg
    msg = _refused(protection.disable_replication, lab.vault, "vm1")
    assert "TestFailover" in msg and "test-failover-cleanup" in msg

    # Replication goes on; the drill's point is pinned while older unpinned ones are thinned.
    _age_points(lab, [old_point, drill_point], 3 * HOUR)  # beyond the 2h retention
    r = take_point(lab.vault, "vm1")
    assert r.consistency == "crash-consistent"
    assert r.stats.chunks_sent == 0  # the test machine's writes are not the source's
    ids = [p["id"] for p in list_points(lab.vault, "vm1")]
    assert drill_point in ids and old_point not in ids
    assert lab.vault.datastore.list_manifests() == sorted([drill_point, r.point_id])
    assert lab.item("vm1")["state"] == "TestFailover"

    pid = test.pid
    assert pid is not None and _pids_mentioning(str(tdir))
    cleanup = test_failover.cleanup_test_failover(lab.vault, "vm1", notes="drill ok")
    assert lab.item("vm1")["state"] == "CleaningUpTestFailover"
    job = lab.run_job(cleanup["job"])
    assert job["state"] == "Succeeded", job["error"]
    assert job["result"]["notes"] == "drill ok"

    assert not tdir.exists()
    assert not _pids_mentioning(str(tdir)), "a process of the test machine is still running"
    item = lab.item("vm1")
    assert item["state"] == "Protected" and item["test_failover"] is None
    assert item["health"] == "Normal", item["health_reasons"]
    assert test_net not in {n["name"] for n in networks.list_networks(lab.vault, "recovery")}

    # Unpinned now: the next cycle's retention removes the aged point.
    r2 = take_point(lab.vault, "vm1")
    ids = [p["id"] for p in list_points(lab.vault, "vm1")]
    assert drill_point not in ids and ids == [r2.point_id, r.point_id]
    assert lab.vault.datastore.verify().ok


def test_test_failover_of_latest_app_without_app_points_is_refused_before_anything_starts(lab_factory):
    lab = lab_factory(size=16 * MIB, data=1 * MIB)
    assert lab.enable("vm1")["state"] == "Succeeded"
    from siterecovery.errors import NotFound

    with pytest.raises(NotFound) as exc:
        test_failover.start_test_failover(lab.vault, "vm1", "latest-app")
    assert "no app-consistent recovery point" in str(exc.value)
    item = lab.item("vm1")
    assert item["state"] == "Protected" and item["test_failover"] is None
    assert not (lab.root / "recovery" / "machines" / "vm1-test").exists()


def test_worker_keeps_replicating_during_a_test_failover(lab_factory):
    from siterecovery.control.worker import ensure_worker, stop_worker

    lab = lab_factory(size=16 * MIB, data=1 * MIB)
    assert lab.enable("vm1")["state"] == "Succeeded"
    info = test_failover.start_test_failover(lab.vault, "vm1", "latest")
    job = lab.run_job(info["job"])
    assert job["state"] == "Succeeded", job["error"]
    before = {p["id"] for p in list_points(lab.vault, "vm1")}
    ensure_worker(lab.vault)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if len({p["id"] for p in list_points(lab.vault, "vm1")} - before) >= 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no recovery point was made during the test failover")
        assert lab.item("vm1")["state"] == "TestFailover"
        cleanup = test_failover.cleanup_test_failover(lab.vault, "vm1")
        from siterecovery.control import jobs

        done = jobs.wait_for(lab.vault, cleanup["job"], timeout=30)
        assert done["state"] == "Succeeded", done["error"]
    finally:
        stop_worker(lab.vault, timeout=20)
    assert lab.item("vm1")["state"] == "Protected"
    assert info["point_id"] in {p["id"] for p in list_points(lab.vault, "vm1")}
