"""Failover, cancel, change of point, commit, reprotect and failback with real machines
(qemu-storage-daemon at both sites), checked byte for byte against the workload's log and the
disks at the other site."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import nbd
import pytest
from sqlalchemy import select

from siterecovery.adapters.db.models import PointRow
from siterecovery.control import failover, jobs, protection
from siterecovery.control.replication import take_point
from siterecovery.control.worker import ensure_worker, stop_worker, worker_pid
from siterecovery.dataplane.index import IndexRef
from siterecovery.demo.verify import disk_specs, nbd_reader, qcow2_reader, verify_machine
from siterecovery.demo.workload import Workload
from siterecovery.errors import NotFound, OperationNotAllowed

MIB = 1024 * 1024
CHUNK = 64 * 1024

pytestmark = pytest.mark.integration


def _refused(fn, *args, **kw) -> str:
    with pytest.raises(OperationNotAllowed) as exc:
        fn(*args, **kw)
    return str(exc.value)


def _digest_nbd(socket: str, disks: list[str]) -> dict[str, str]:
    out = {}
    for d in disks:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{d}?socket={socket}")
        try:
            size, md = h.get_size(), hashlib.sha256()
            for off in range(0, size, 4 * MIB):
                md.update(h.pread(min(4 * MIB, size - off), off))
            out[d] = md.hexdigest()
        finally:
            h.shutdown()
    return out


def _digest_qcow2(paths: dict[str, Path]) -> dict[str, str]:
    out = {}
    with qcow2_reader(paths, force_share=True) as r:
        for d in paths:
            size, md = r.size(d), hashlib.sha256()
            for off in range(0, size, 4 * MIB):
                md.update(r.read(d, off, min(4 * MIB, size - off)))
            out[d] = md.hexdigest()
    return out


def _digest_point(vault, point_id: str) -> dict[str, str]:
    with vault.store.uow() as s:
        row = s.get(PointRow, point_id)
        refs = {n: IndexRef.from_json(r) for n, r in row.disks.items()}
    out = {}
    for d, ref in refs.items():
        md, pos = hashlib.sha256(), 0
        # read_disk yields only the non-zero chunks: the gaps are zeros.
        for off, data in vault.datastore.read_disk(ref):
            md.update(bytes(off - pos))
            md.update(data)
            pos = off + len(data)
        md.update(bytes(ref.size - pos))
        out[d] = md.hexdigest()
    return out


def _stop_workload(wl: Workload) -> None:
    """The workload dies with an NBD error once its exports are removed; either way is fine."""
    try:
        wl.stop()
    except Exception:
        wl.kill()


def _verify_recovered(lab, name: str, log: Path) -> object:
    st = lab.item(name)
    rec = st["recovered_machine"]
    m = lab.machines[name]
    with nbd_reader(Path(rec["nbd_socket"]), list(m.images)) as r:
        return verify_machine(r, disk_specs(m.regions), log, m.base())


def _failover_ready(lab, name="vm1"):
    lab.enable(name)
    wl = lab.start_workload(name, rate=1_000_000)
    time.sleep(1.0)
    take_point(lab.vault, name)
    time.sleep(1.0)
    return wl


def test_planned_failover_loses_no_write_and_commit_releases_the_other_points(lab_factory):
    lab = lab_factory()
    wl = _failover_ready(lab)
    # The workload keeps writing until the failover stops the machine's writers.
    info = failover.request_failover(lab.vault, "vm1", planned=True)
    assert lab.item("vm1")["state"] == "FailingOver"
    job = lab.run_job(info["job"])
    assert job["state"] == "Succeeded", job["error"]
    _stop_workload(wl)
    res = job["result"]
    assert res["rto_seconds"] > 0 and res["source_stopped"] is True
    st = lab.item("vm1")
    assert st["state"] == "FailedOver"
    assert "cancel-failover" in st["allowed_operations"] and "commit" in st["allowed_operations"]
    rec = st["recovered_machine"]
    assert Path(rec["dir"], "machine.json").exists() and Path(rec["dir"], "domain.xml").exists()
    assert Path(rec["dir"], "seed", "network-config").exists()

    # Zero data loss: every write the workload saw acknowledged is on the recovered machine.
    v = _verify_recovered(lab, "vm1", wl.log_path)
    assert v.ok, v.problems
    assert v.max_seq >= v.last_logged_seq > 0, (v.max_seq, v.last_logged_seq)

    # The source's writers are stopped: a client can no longer write through its exports.
    daemon = lab.machines["vm1"].daemon
    h = nbd.NBD()
    h.set_export_name("disk0")
    with pytest.raises(nbd.Error):
        h.connect_unix(daemon.nbd_socket)

    points_before = len(protection.list_points(lab.vault, "vm1"))
    assert points_before >= 3
    job = lab.run_job(failover.request_commit(lab.vault, "vm1")["job"])
    assert job["state"] == "Succeeded", job["error"]
    points = protection.list_points(lab.vault, "vm1")
    assert [p["id"] for p in points] == [res["point_id"]]
    st = lab.item("vm1")
    assert st["state"] == "FailoverCommitted"
    assert st["allowed_operations"] == ["reprotect", "complete-migration", "disable"]


def test_cancel_of_a_planned_failover_starts_the_source_again_and_replication_resumes(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    job = lab.run_job(failover.request_failover(lab.vault, "vm1", planned=True)["job"])
    assert job["state"] == "Succeeded", job["error"]
    rec_dir = Path(lab.item("vm1")["recovered_machine"]["dir"])
    job = lab.run_job(failover.request_cancel(lab.vault, "vm1")["job"])
    assert job["state"] == "Succeeded", job["error"]
    st = lab.item("vm1")
    assert st["state"] == "Protected" and st["recovered_machine"] is None
    assert not rec_dir.exists()
    # The guest can write again and the next point comes from the dirty bitmap.
    wl = lab.start_workload("vm1")
    time.sleep(0.5)
    _stop_workload(wl)
    r = take_point(lab.vault, "vm1")
    assert r.method == "dirty-bitmap"


def test_unplanned_failover_to_a_chosen_point_then_change_point_and_refusals(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    first = protection.list_points(lab.vault, "vm1")[0]["id"]
    wl = lab.start_workload("vm1")
    time.sleep(0.5)
    _stop_workload(wl)
    second = take_point(lab.vault, "vm1").point_id

    # A point that does not exist (retention removed it) is refused before anything changes.
    with pytest.raises(NotFound, match="does not exist"):
        failover.request_failover(lab.vault, "vm1", planned=False, point="rp-20000101-000000-abcdef")
    assert lab.item("vm1")["state"] == "Protected"
    msg = _refused(failover.request_commit, lab.vault, "vm1")
    assert "Protected" in msg and "planned-failover" in msg

    info = failover.request_failover(lab.vault, "vm1", planned=False, point=first, shutdown_source=False)
    job = lab.run_job(info["job"])
    assert job["state"] == "Succeeded", job["error"]
    assert "Shut down source machine" not in [s["name"] for s in job["steps"]]
    st = lab.item("vm1")
    assert st["failover"]["point_id"] == first
    # Unplanned: there is no clean source to go back to.
    assert "cancel-failover" not in st["allowed_operations"]
    msg = _refused(failover.request_cancel, lab.vault, "vm1")
    assert "only allowed after a planned failover" in msg
    rec = st["recovered_machine"]
    assert _digest_nbd(rec["nbd_socket"], ["disk0", "disk1"]) == _digest_point(lab.vault, first)

    job = lab.run_job(failover.request_change_point(lab.vault, "vm1", second)["job"])
    assert job["state"] == "Succeeded", job["error"]
    st = lab.item("vm1")
    assert st["state"] == "FailedOver" and st["failover"]["point_id"] == second
    rec = st["recovered_machine"]
    assert _digest_nbd(rec["nbd_socket"], ["disk0", "disk1"]) == _digest_point(lab.vault, second)


def test_failed_failover_is_rolled_back_and_the_source_runs_again(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    info = failover.request_failover(lab.vault, "vm1", planned=True)
    # The recovery site's machine directory cannot be made: the create step fails.
    machines = lab.root / "recovery" / "machines"
    machines.mkdir(parents=True, exist_ok=True)
    (machines / "vm1").write_text("in the way")
    job = lab.run_job(info["job"])
    assert job["state"] == "Failed"
    assert job["result"]["rolled_back"] is True
    st = lab.item("vm1")
    assert st["state"] == "Protected" and st["failover"] is None and st["recovered_machine"] is None
    (machines / "vm1").unlink()
    # The source was started again: its guest can write.
    wl = lab.start_workload("vm1")
    time.sleep(0.3)
    _stop_workload(wl)
    assert take_point(lab.vault, "vm1").method == "dirty-bitmap"


def test_reprotect_sends_only_what_changed_and_failback_brings_every_write_home(lab_factory):
    lab = lab_factory(size=64 * MIB, data=16 * MIB)
    m = lab.machines["vm1"]
    wl = _failover_ready(lab)
    job = lab.run_job(failover.request_failover(lab.vault, "vm1", planned=True)["job"])
    assert job["state"] == "Succeeded", job["error"]
    _stop_workload(wl)
    assert lab.run_job(failover.request_commit(lab.vault, "vm1")["job"])["state"] == "Succeeded"

    # Writes at the recovery site: 40 chunks of 64 KiB, in the workload region of disk0.
    rec = lab.item("vm1")["recovered_machine"]
    start, _end = m.regions["disk0"]
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk0?socket={rec['nbd_socket']}")
    for i in range(40):
        h.pwrite(os.urandom(CHUNK), start + i * 3 * CHUNK)
    h.flush()
    h.shutdown()

    job = lab.run_job(failover.request_reprotect(lab.vault, "vm1")["job"])
    assert job["state"] == "Succeeded", job["error"]
    res = job["result"]
    disk_bytes = 2 * 64 * MIB
    assert res["disk_bytes"] == disk_bytes
    assert res["bytes_compared"] == disk_bytes
    # Only the changed chunks travel (plus nothing else: the original disks were the seed).
    assert 40 * CHUNK <= res["bytes_sent"] <= 40 * CHUNK + 4 * CHUNK, res
    assert res["reverse_method"] == "dirty-bitmap"
    st = lab.item("vm1")
    assert st["state"] == "Protected" and st["direction"] == "reverse"
    assert st["policy"] == "fast-failback"

    # More writes at the recovery site, then a planned failback.
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk1?socket={rec['nbd_socket']}")
    h.pwrite(b"\xab" * CHUNK, m.regions["disk1"][0])
    h.flush()
    h.shutdown()
    recovered_digest = _digest_nbd(rec["nbd_socket"], ["disk0", "disk1"])
    job = lab.run_job(failover.request_failback(lab.vault, "vm1")["job"])
    assert job["state"] == "Succeeded", job["error"]
    st = lab.item("vm1")
    assert st["state"] == "FailedOver" and st["direction"] == "reverse"
    # The original machine runs again with every write made at the recovery site.
    assert _digest_nbd(m.daemon.nbd_socket, ["disk0", "disk1"]) == recovered_digest
    assert job["result"]["update_bytes_sent"] <= 4 * CHUNK

    assert lab.run_job(failover.request_commit(lab.vault, "vm1")["job"])["state"] == "Succeeded"
    assert not Path(rec["dir"]).exists()
    # Writes at home after the failback, then reprotect: only those travel.
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk0?socket={m.daemon.nbd_socket}")
    h.pwrite(b"\xcd" * CHUNK, start)
    h.flush()
    h.shutdown()
    job = lab.run_job(failover.request_reprotect(lab.vault, "vm1")["job"])
    assert job["state"] == "Succeeded", job["error"]
    assert job["result"]["bytes_sent"] <= 2 * CHUNK
    st = lab.item("vm1")
    assert st["state"] == "Protected" and st["direction"] == "forward" and st["policy"] == "fast"
    r = take_point(lab.vault, "vm1")
    assert r.method == "dirty-bitmap"
    assert _digest_point(lab.vault, r.point_id) == _digest_nbd(m.daemon.nbd_socket, ["disk0", "disk1"])


def test_failback_is_refused_while_the_item_replicates_forward(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    msg = _refused(failover.request_failback, lab.vault, "vm1")
    assert "nothing to fail back" in msg
    msg = _refused(failover.request_reprotect, lab.vault, "vm1")
    assert "Protected" in msg


def test_complete_migration_from_protected_fails_over_commits_and_stops_replication(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    info = failover.request_complete_migration(lab.vault, "vm1")
    assert lab.item("vm1")["state"] == "CompletingMigration"
    job = lab.run_job(info["job"])
    assert job["state"] == "Succeeded", job["error"]
    st = lab.item("vm1")
    assert st["state"] == "Migrated" and st["allowed_operations"] == []
    assert protection.list_points(lab.vault, "vm1") == []
    # The migrated machine keeps running at the recovery site.
    rec = st["recovered_machine"]
    assert _digest_nbd(rec["nbd_socket"], ["disk0"])


def test_a_worker_killed_during_failover_resumes_the_job_and_finishes_it(lab_factory):
    lab = lab_factory(size=512 * MIB, data=256 * MIB)
    lab.enable("vm1")
    ensure_worker(lab.vault)
    info = failover.request_failover(lab.vault, "vm1", planned=True)
    deadline = time.monotonic() + 60
    killed_in = None
    while time.monotonic() < deadline:
        job = jobs.show_job(lab.vault, info["job"])
        running = [s["name"] for s in job["steps"] if s["state"] == "Running"]
        if running and running[0] in ("Final sync", "Create machine at target site"):
            pid = worker_pid(lab.vault)
            os.kill(pid, signal.SIGKILL)
            killed_in = running[0]
            break
        assert job["state"] not in jobs.FINAL, job
        time.sleep(0.01)
    assert killed_in is not None
    time.sleep(0.5)
    assert lab.item("vm1")["state"] == "FailingOver"  # never half failed over: the job still owns it
    ensure_worker(lab.vault)
    final = jobs.wait_for(lab.vault, info["job"], timeout=120)
    assert final["state"] == "Succeeded", final["error"]
    st = lab.item("vm1")
    assert st["state"] == "FailedOver"
    rec = st["recovered_machine"]
    assert _digest_nbd(rec["nbd_socket"], ["disk0", "disk1"]) == _digest_point(
        lab.vault, final["result"]["point_id"]
    )
    stop_worker(lab.vault)
    with lab.vault.store.uow() as s:
        assert s.scalar(select(PointRow).where(PointRow.id == final["result"]["point_id"])) is not None


def test_failover_refuses_a_taken_address_or_a_full_site_before_anything_changes(lab_factory):
    from siterecovery.control import networks

    lab = lab_factory(machines=2)
    lab.enable("vm1")
    lab.enable("vm2")
    # vm2 asks for vm1's address at the recovery site; vm1 fails over first and keeps it.
    networks.update_nic(lab.vault, "vm2", "nic0", ip="10.0.0.10")
    job = lab.run_job(failover.request_failover(lab.vault, "vm1", planned=True)["job"])
    assert job["state"] == "Succeeded", job["error"]
    nic = lab.item("vm1")["recovered_machine"]["nics"][0]
    assert (nic["network"], nic["ip"], nic["primary"]) == ("prod-asr", "10.0.0.10", True)
    msg = _refused(failover.request_failover, lab.vault, "vm2", planned=True)
    assert "10.0.0.10" in msg and "vm1" in msg
    assert lab.item("vm2")["state"] == "Protected"
    assert [j for j in jobs.list_jobs(lab.vault, target="vm2") if j["kind"] == "failover"] == []

    # With an address of its own, the site's room is what stops it.
    networks.update_nic(lab.vault, "vm2", "nic0", ip="auto")
    networks.update_site_capacity(lab.vault, "recovery", cpus=1)
    msg = _refused(failover.request_failover, lab.vault, "vm2", planned=True)
    assert "no room" in msg
    assert lab.item("vm2")["state"] == "Protected"

    # Cancelling vm1's failover gives its address and its room back.
    assert lab.run_job(failover.request_cancel(lab.vault, "vm1")["job"])["state"] == "Succeeded"
    job = lab.run_job(failover.request_failover(lab.vault, "vm2", planned=True)["job"])
    assert job["state"] == "Succeeded", job["error"]
    assert lab.item("vm2")["recovered_machine"]["nics"][0]["ip"] == "10.0.0.11"


def test_unplanned_failover_works_when_the_primary_cannot_be_reached(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    latest = protection.list_points(lab.vault, "vm1")[0]["id"]
    lab.machines["vm1"].daemon.kill()  # the primary site is gone
    # A planned failover needs the source: it fails at its prerequisites and changes nothing.
    job = lab.run_job(failover.request_failover(lab.vault, "vm1", planned=True)["job"])
    assert job["state"] == "Failed" and "does not answer" in job["error"] and "unplanned" in job["error"]
    assert [s["state"] for s in job["steps"]][:2] == ["Failed", "NotStarted"]
    st = lab.item("vm1")
    assert st["state"] == "Protected" and st["recovered_machine"] is None
    job = lab.run_job(failover.request_failover(lab.vault, "vm1", planned=False, point="latest")["job"])
    assert job["state"] == "Succeeded", job["error"]
    res = job["result"]
    assert res["source_stopped"] is False and "source_stop_error" in res
    assert res["pending_processed"] is False and res["point_id"] == latest
    assert lab.item("vm1")["state"] == "FailedOver"


def test_operations_a_failed_over_item_does_not_allow_are_refused_and_disable_keeps_the_machine(lab_factory):
    from siterecovery.control import test_failover

    lab = lab_factory()
    lab.enable("vm1")
    assert (
        lab.run_job(failover.request_failover(lab.vault, "vm1", planned=True)["job"])["state"] == "Succeeded"
    )
    for fn, args in (
        (failover.request_failover, {"planned": True}),
        (failover.request_reprotect, {}),
        (failover.request_complete_migration, {}),
        (protection.request_resync, {}),
        (test_failover.start_test_failover, {}),
    ):
        msg = _refused(fn, lab.vault, "vm1", **args)
        assert "state FailedOver" in msg and "change-recovery-point, commit, cancel-failover, disable" in msg
    rec = lab.item("vm1")["recovered_machine"]
    info = protection.disable_replication(lab.vault, "vm1", keep_points=False)
    assert lab.run_job(info["job"])["state"] == "Succeeded"
    with pytest.raises(NotFound):
        lab.item("vm1")
    # Disabling replication stops protecting the machine; it does not take it down.
    assert _digest_nbd(rec["nbd_socket"], ["disk0"])
    from siterecovery.adapters.db.models import IpAllocationRow

    with lab.vault.store.uow() as s:
        assert s.scalars(select(IpAllocationRow)).all() == []


def test_complete_migration_after_a_committed_failover_keeps_the_machine(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    assert (
        lab.run_job(failover.request_failover(lab.vault, "vm1", planned=True)["job"])["state"] == "Succeeded"
    )
    assert lab.run_job(failover.request_commit(lab.vault, "vm1")["job"])["state"] == "Succeeded"
    msg = _refused(failover.request_commit, lab.vault, "vm1")
    assert "state FailoverCommitted" in msg and "reprotect" in msg
    job = lab.run_job(failover.request_complete_migration(lab.vault, "vm1")["job"])
    assert job["state"] == "Succeeded", job["error"]
    st = lab.item("vm1")
    assert st["state"] == "Migrated" and st["allowed_operations"] == []
    assert protection.list_points(lab.vault, "vm1") == []
    assert _digest_nbd(st["recovered_machine"]["nbd_socket"], ["disk0"])
    msg = _refused(failover.request_reprotect, lab.vault, "vm1")
    assert "no longer protected" in msg


def test_resync_compares_every_chunk_and_sends_only_what_differs(lab_factory):
    lab = lab_factory()
    lab.enable("vm1")
    m = lab.machines["vm1"]
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk1?socket={m.daemon.nbd_socket}")
    h.pwrite(b"\x5a" * CHUNK, m.regions["disk1"][0])
    h.flush()
    h.shutdown()
    info = protection.request_resync(lab.vault, "vm1")
    assert lab.item("vm1")["state"] == "Resynchronizing"
    job = lab.run_job(info["job"])
    assert job["state"] == "Succeeded", job["error"]
    res = job["result"]
    assert res["method"] == "hash-resync"
    assert res["bytes_read"] >= 16 * MIB  # every data chunk is read and hashed...
    assert 0 < res["bytes_sent"] <= 2 * CHUNK  # ...and only the changed one travels
    assert lab.item("vm1")["state"] == "Protected"


def _digest_files(paths: dict[str, Path]) -> dict[str, str]:
    out = {}
    for d, p in paths.items():
        md = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(4 * MIB):
                md.update(chunk)
        out[d] = md.hexdigest()
    return out


def test_raw_sites_fail_over_and_back_with_hash_compare(lab_factory):
    lab = lab_factory(kind="raw")
    lab.enable("vm1")
    m = lab.machines["vm1"]
    # Raw files have no writers siterecovery can stop: a planned failover is refused up front.
    msg = _refused(failover.request_failover, lab.vault, "vm1", planned=True)
    assert "raw site" in msg and "unplanned failover" in msg
    job = lab.run_job(failover.request_failover(lab.vault, "vm1", planned=False, point="latest")["job"])
    assert job["state"] == "Succeeded", job["error"]
    rec = lab.item("vm1")["recovered_machine"]
    rec_paths = {d["name"]: Path(d["path"]) for d in rec["disks"]}
    assert _digest_files(rec_paths) == _digest_point(lab.vault, job["result"]["point_id"])
    assert lab.run_job(failover.request_commit(lab.vault, "vm1")["job"])["state"] == "Succeeded"

    with open(rec_paths["disk0"], "r+b") as f:  # a write at the recovery site
        f.seek(m.regions["disk0"][0])
        f.write(b"\x77" * CHUNK)
    job = lab.run_job(failover.request_reprotect(lab.vault, "vm1")["job"])
    assert job["state"] == "Succeeded", job["error"]
    assert job["result"]["reverse_method"] == "hash-scan"
    assert job["result"]["bytes_sent"] == CHUNK
    assert _digest_files(m.images) == _digest_files(rec_paths)

    with open(rec_paths["disk1"], "r+b") as f:
        f.seek(m.regions["disk1"][0])
        f.write(b"\x78" * CHUNK)
    job = lab.run_job(failover.request_failback(lab.vault, "vm1", planned=False)["job"])
    assert job["state"] == "Succeeded", job["error"]
    assert _digest_files(m.images) == _digest_files(rec_paths)
    assert lab.run_job(failover.request_commit(lab.vault, "vm1")["job"])["state"] == "Succeeded"
    assert not rec_paths["disk0"].exists()
    assert lab.run_job(failover.request_reprotect(lab.vault, "vm1")["job"])["state"] == "Succeeded"
    st = lab.item("vm1")
    assert (st["state"], st["direction"]) == ("Protected", "forward")
