"""Replication through the control plane with real machines: recovery points are byte-exact and
crash-consistent across a machine's disks, change tracking falls back to a hash resync that
sends only what changed, and a killed initial replication resumes where it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

from siterecovery.control import jobs, protection
from siterecovery.control.replication import take_point
from siterecovery.dataplane.materialize import materialize_disk
from siterecovery.demo.verify import disk_specs, raw_reader, verify_machine

MIB = 1024 * 1024

pytestmark = pytest.mark.integration


def recover_point(lab, name: str, point_id: str, out: Path) -> dict[str, Path]:
    """Materialize every disk of a point as a raw image, as a failover would."""
    manifest = lab.vault.datastore.read_manifest(point_id)
    paths = {}
    for disk, ref in manifest.disks.items():
        paths[disk] = out / f"{point_id}-{disk}.raw"
        materialize_disk(lab.vault.datastore, ref, paths[disk], "raw")
    return paths


def test_points_taken_under_load_are_byte_exact_and_crash_consistent(lab_factory, tmp_path):
    lab = lab_factory(size=64 * MIB, data=8 * MIB)
    wl = lab.start_workload("vm1", rate=3_000_000)
    job = lab.enable("vm1")
    assert job["state"] == "Succeeded", job["error"]
    point_ids = [job["result"]["initial_point"]]
    for _ in range(3):
        time.sleep(0.7)
        r = take_point(lab.vault, "vm1")
        assert r.consistency == "crash-consistent"
        assert r.method == "dirty-bitmap"
        point_ids.append(r.point_id)
    wl.stop()

    m = lab.machines["vm1"]
    seqs = []
    for pid in point_ids:
        paths = recover_point(lab, "vm1", pid, tmp_path)
        with raw_reader(paths) as reader:
            res = verify_machine(reader, disk_specs(m.regions), wl.log_path, m.base())
        assert res.ok, res.problems[:5]
        seqs.append(res.max_seq)
        for p in paths.values():
            p.unlink()
    # Each later point holds a longer prefix of the one write sequence across both disks.
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0] > 0
    assert lab.vault.datastore.verify().ok


def assert_same_as_source(recovered: dict[str, Path], images: dict[str, Path]) -> None:
    for disk, img in images.items():
        out = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(recovered[disk]), str(img)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout + out.stderr


def _write_chunks(socket: str, disk: str, offsets: list[int], fill: int) -> None:
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{disk}?socket={socket}")
    for off in offsets:
        h.pwrite(os.urandom(65536 - 16) + bytes([fill]) * 16, off)
    h.flush()
    h.shutdown()


def test_inconsistent_bitmap_leads_to_hash_resync_sending_only_changed_chunks(lab_factory, tmp_path):
    lab = lab_factory(size=64 * MIB, data=16 * MIB)
    assert lab.enable("vm1")["state"] == "Succeeded"
    m = lab.machines["vm1"]
    assert m.daemon is not None
    # Change 5 chunks of disk0 (inside the data) and 2 of disk1 (in the empty region).
    _write_chunks(m.daemon.nbd_socket, "disk0", [i * 65536 for i in (3, 17, 40, 41, 200)], 1)
    _write_chunks(m.daemon.nbd_socket, "disk1", [32 * MIB + i * 65536 for i in (0, 9)], 2)
    m.daemon.kill()  # unclean stop: QEMU loads the persistent bitmaps as inconsistent
    m.daemon = m.daemon.restart()

    r = take_point(lab.vault, "vm1")
    assert r.method == "hash-resync"
    assert r.stats.chunks_changed == 7
    assert r.stats.chunks_sent == 7
    assert r.stats.bytes_read >= 16 * MIB  # it read the disks, and sent only the difference
    assert r.consistency == "crash-consistent"

    # Tracking is back: the next point uses the dirty bitmap again and sends one chunk.
    _write_chunks(m.daemon.nbd_socket, "disk1", [40 * MIB], 3)
    r2 = take_point(lab.vault, "vm1")
    assert r2.method == "dirty-bitmap"
    assert r2.stats.chunks_sent == 1
    assert lab.item("vm1")["health"] == "Normal"

    # The resynced point is byte-exact: compare with the source images.
    m.daemon.stop()
    paths = recover_point(lab, "vm1", r2.point_id, tmp_path)
    assert_same_as_source(paths, m.images)


def _worker(lab) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "siterecovery.entrypoints.worker", "--vault", str(lab.vault.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_kill_during_initial_replication_resumes_without_resending(lab_factory, tmp_path):
    lab = lab_factory(size=1024 * MIB, data=600 * MIB)
    info = protection.enable_replication(lab.vault, "vm1", policy="fast", recovery_site="recovery")
    worker = _worker(lab)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = lab.item("vm1")
            done = st["initial_replication_bytes"]["done"]
            with lab.vault.store.uow() as s:
                from siterecovery.control.protection import get_item

                ckpt = get_item(s, "vm1").checkpoint
            if ckpt and done > 0.3 * st["initial_replication_bytes"]["total"]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("initial replication made no checkpoint in time")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    stored_before = lab.vault.datastore.stats()["stored_bytes"]
    job = jobs.show_job(lab.vault, info["job"])
    assert job["state"] == "Running"  # left behind by the dead worker

    worker = _worker(lab)
    try:
        final = jobs.wait_for(lab.vault, info["job"], timeout=180)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert final["state"] == "Succeeded", final["error"]
    stored_after = lab.vault.datastore.stats()["stored_bytes"]
    resent = final["result"]["bytes_sent"]
    # The resumed run sent what was still missing, not everything again.
    assert stored_before > 0.2 * stored_after
    assert resent <= (stored_after - stored_before) + 8 * MIB
    assert lab.item("vm1")["state"] == "Protected"

    m = lab.machines["vm1"]
    m.daemon.stop()
    point = final["result"]["initial_point"]
    paths = recover_point(lab, "vm1", point, tmp_path)
    assert_same_as_source(paths, m.images)


def test_index_metadata_of_a_point_grows_with_the_change(lab_factory):
    lab = lab_factory(size=512 * MIB, data=8 * MIB)
    assert lab.enable("vm1")["state"] == "Succeeded"
    m = lab.machines["vm1"]
    _write_chunks(m.daemon.nbd_socket, "disk0", [300 * MIB], 4)
    before = lab.vault.datastore.stats()["stored_bytes"]
    r = take_point(lab.vault, "vm1")
    grown = lab.vault.datastore.stats()["stored_bytes"] - before
    assert r.stats.chunks_sent == 1
    # One data chunk plus a handful of index pages; nothing proportional to the 1 GiB of disks.
    assert grown - r.stats.bytes_stored < 64 * 1024
    assert lab.vault.datastore.read_manifest(r.point_id).disks["disk0"].size == 512 * MIB


def test_excluded_disk_is_not_replicated(lab_factory):
    lab = lab_factory(size=64 * MIB, data=8 * MIB)
    job = lab.enable("vm1", exclude_disks=["disk1"])
    assert job["state"] == "Succeeded", job["error"]
    st = lab.item("vm1")
    assert st["disks"] == ["disk0"] and st["excluded_disks"] == ["disk1"]
    manifest = lab.vault.datastore.read_manifest(job["result"]["initial_point"])
    assert list(manifest.disks) == ["disk0"]
    r = take_point(lab.vault, "vm1")
    assert list(lab.vault.datastore.read_manifest(r.point_id).disks) == ["disk0"]


def test_status_says_when_replication_is_stopped_because_the_worker_is_down(lab_factory):
    from siterecovery.control.worker import ensure_worker, stop_worker

    lab = lab_factory(size=64 * MIB, data=4 * MIB)
    assert lab.enable("vm1")["state"] == "Succeeded"
    st = protection.status(lab.vault, "vm1")[0]
    assert st["health"] == "Warning"
    assert st["health_reasons"][0] == protection.WORKER_DOWN
    ensure_worker(lab.vault)
    try:
        st = protection.status(lab.vault, "vm1")[0]
        assert protection.WORKER_DOWN not in st["health_reasons"]
    finally:
        stop_worker(lab.vault)
