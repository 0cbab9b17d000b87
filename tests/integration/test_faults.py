"""Faults with real components, and the worker's schedule.

* The recovery site is full (a small tmpfs): a test failover fails with a message that names
  the place and says there is no space, leaves nothing behind, and the item is Protected again.
* The datastore is full (a small tmpfs): replication fails cleanly with StorageFull's message,
  no manifest refers to a missing chunk, and once there is room again nothing was lost.
* The source is unreachable: cycles fail, health goes Warning then Critical with the error
  text, and recovers to Normal once the machine is back.
* The real worker makes points at the policy's crash-consistent frequency and follows a
  policy change at the next cycle.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest

from siterecovery.control import jobs, policies, test_failover
from siterecovery.control.protection import list_points
from siterecovery.control.replication import take_point
from siterecovery.control.worker import Worker, ensure_worker, stop_worker, worker_pid
from siterecovery.errors import StorageFull

MIB = 1024 * 1024
CHUNK = 64 * 1024

pytestmark = pytest.mark.integration


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("2m")`` mounts a tmpfs of that size and returns its directory."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {proc.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _files_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if not p.is_dir()]


def _write_random(socket: str, disk: str, offset: int, length: int) -> None:
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{disk}?socket={socket}")
    try:
        for off in range(offset, offset + length, MIB):
            h.pwrite(os.urandom(min(MIB, offset + length - off)), off)
        h.flush()
    finally:
        h.shutdown()


# -- recovery site full ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "failing_step"),
    [
        # More data than the site has room for: refused by the prerequisites check.
        (4 * MIB, "Prerequisites check"),
        # Fits as data, but not with the room that writing the qcow2 images takes.
        (768 * 1024, "Create test machine"),
    ],
)
def test_test_failover_to_a_full_recovery_site_fails_and_leaves_nothing(
    tmpfs, lab_factory, data, failing_step
):
    site = tmpfs("2m")
    lab = lab_factory(size=16 * MIB, data=data, recovery_path=site)
    assert lab.enable("vm1")["state"] == "Succeeded"

    info = test_failover.start_test_failover(lab.vault, "vm1", "latest")
    job = lab.run_job(info["job"])
    assert job["state"] == "Failed"
    assert "no space" in job["error"].lower()
    assert str(site) in job["error"]
    assert "recovery site" in job["error"] and "datastore" not in job["error"]  # the advice fits
    failed = [s["name"] for s in job["steps"] if s["state"] == "Failed"]
    assert failed == [failing_step]

    assert _files_under(site) == []
    assert not (site / "machines" / "vm1-test").exists()
    assert not _pids_of_daemons_under(site)
    item = lab.item("vm1")
    assert item["state"] == "Protected" and item["test_failover"] is None
    assert lab.vault.datastore.verify().ok
    # Nothing is stuck: the item still replicates and can be drilled again.
    assert take_point(lab.vault, "vm1").consistency == "crash-consistent"


def _pids_of_daemons_under(d: Path) -> list[int]:
    needle = str(d).encode()
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


# -- datastore full --------------------------------------------------------------------------


def test_initial_replication_into_a_full_datastore_fails_cleanly(tmpfs, lab_factory):
    store = tmpfs("2m")
    lab = lab_factory(size=32 * MIB, data=8 * MIB, datastore=store / "ds")
    job = lab.enable("vm1")
    assert job["state"] == "Failed"
    assert job["error"].startswith(f"no space left on {store}")
    assert "existing recovery points are intact" in job["error"]

    ds = lab.vault.datastore
    assert ds.list_manifests() == []
    report = ds.verify()
    assert report.ok, report.problems[:3]
    assert list_points(lab.vault, "vm1") == []
    item = lab.item("vm1")
    assert item["last_error"] == job["error"]
    assert item["health"] == "Warning"
    assert any("no space left on" in reason for reason in item["health_reasons"])
    # No temp file of an interrupted chunk write is left taking the space.
    assert not [p for p in _files_under(store) if ".tmp" in p.name or p.name.startswith(".")]

    # Room again: the worker retries the initial replication, which resumes and completes.
    assert item["state"] == "InitialReplication"
    subprocess.run(["mount", "-o", "remount,size=64m", str(store)], check=True)
    ensure_worker(lab.vault)
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and lab.item("vm1")["state"] != "Protected":
            time.sleep(0.2)
    finally:
        stop_worker(lab.vault, timeout=20)
    item = lab.item("vm1")
    worker_log = (lab.vault.run_dir / "worker.log").read_text()[-2000:]
    assert item["state"] == "Protected", (item, jobs.list_jobs(lab.vault, target="vm1"), worker_log)
    assert item["health"] == "Normal", item["health_reasons"]
    retry = [j for j in jobs.list_jobs(lab.vault, target="vm1") if j["params"].get("retry")]
    assert retry and retry[0]["state"] == "Succeeded", retry
    assert len(ds.list_manifests()) >= 1 and ds.verify().ok


def test_datastore_full_during_a_cycle_keeps_points_and_loses_no_change(tmpfs, lab_factory):
    store = tmpfs("3m")
    lab = lab_factory(size=32 * MIB, data=512 * 1024, datastore=store / "ds")
    job = lab.enable("vm1")
    assert job["state"] == "Succeeded", job["error"]
    first = job["result"]["initial_point"]
    m = lab.machines["vm1"]
    assert m.daemon is not None
    # Incompressible data, more than the datastore can hold.
    _write_random(m.daemon.nbd_socket, "disk0", 8 * MIB, 6 * MIB)

    with pytest.raises(StorageFull) as exc:
        take_point(lab.vault, "vm1")
    assert str(exc.value).startswith(f"no space left on {store}")
    ds = lab.vault.datastore
    assert ds.list_manifests() == [first]
    assert [p["id"] for p in list_points(lab.vault, "vm1")] == [first]
    report = ds.verify()
    assert report.ok, report.problems[:3]
    assert lab.item("vm1")["state"] == "Protected"

    # Room again: the next cycle sends the whole change that the failed cycle could not store.
    subprocess.run(["mount", "-o", "remount,size=64m", str(store)], check=True)
    r = take_point(lab.vault, "vm1")
    assert r.method == "dirty-bitmap"
    assert r.stats.chunks_changed == 6 * MIB // CHUNK
    assert ds.verify().ok


# -- source unreachable ----------------------------------------------------------------------


def test_unreachable_source_degrades_health_and_recovers(lab_factory):
    lab = lab_factory(size=16 * MIB, data=1 * MIB)
    assert lab.enable("vm1")["state"] == "Succeeded"
    m = lab.machines["vm1"]
    assert m.daemon is not None
    worker = Worker(lab.vault)  # its cycle: take a point, or record the failure on the item
    m.daemon.stop()

    worker._cycle("vm1", False)
    item = lab.item("vm1")
    assert item["health"] == "Warning"
    error = item["last_error"]
    assert error and "qmp" in error.lower()
    assert any(f"last error: {error}" in reason for reason in item["health_reasons"])

    worker._cycle("vm1", False)
    worker._cycle("vm1", False)
    item = lab.item("vm1")
    assert item["health"] == "Critical"
    assert any("3 times in a row" in r and error in r for r in item["health_reasons"]), item["health_reasons"]
    assert len(list_points(lab.vault, "vm1")) == 1

    m.daemon = m.daemon.restart()
    _write_random(m.daemon.nbd_socket, "disk1", 4 * MIB, CHUNK)
    worker._cycle("vm1", False)
    item = lab.item("vm1")
    assert item["health"] == "Normal", item["health_reasons"]
    assert item["last_error"] is None
    points = list_points(lab.vault, "vm1")
    assert len(points) == 2 and points[0]["method"] == "dirty-bitmap" and points[0]["changed_chunks"] == 1


# -- worker schedule -------------------------------------------------------------------------


def _new_points(lab, known: set[str]) -> list[dict]:
    return sorted((p for p in list_points(lab.vault, "vm1") if p["id"] not in known), key=lambda p: p["time"])


def _wait_points(lab, known: set[str], count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _new_points(lab, known)
        if len(new) >= count:
            return new
        time.sleep(0.2)
    pytest.fail(f"the worker made {len(_new_points(lab, known))} points in {timeout:g}s, expected {count}")


def test_worker_follows_the_policy_schedule_and_its_changes(lab_factory):
    lab = lab_factory(size=16 * MIB, data=1 * MIB)
    assert lab.enable("vm1")["state"] == "Succeeded"
    known = {p["id"] for p in list_points(lab.vault, "vm1")}
    pid = ensure_worker(lab.vault)
    try:
        assert ensure_worker(lab.vault) == pid  # one worker per vault
        new = _wait_points(lab, known, 2, timeout=15)
        times = [p["time"] for p in new[:2]]
        assert 4.5 <= times[1] - times[0] <= 8, times
        assert {p["type"] for p in new} == {"crash-consistent"}

        policies.update_policy(lab.vault, "fast", crash_frequency="10s")
        known |= {p["id"] for p in _new_points(lab, known)}
        after = _wait_points(lab, known, 2, timeout=25)
        gap = after[1]["time"] - after[0]["time"]
        assert 9.5 <= gap <= 14, gap
        assert lab.item("vm1")["health"] == "Normal"
    finally:
        assert stop_worker(lab.vault, timeout=20)
    assert worker_pid(lab.vault) is None
    assert not jobs.pid_alive(pid)
