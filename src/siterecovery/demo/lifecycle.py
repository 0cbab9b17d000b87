"""The demo's second act: the whole life of a protected machine, checked against ground truth.

After the drills, two machines go through everything ASR does after a disaster:

1. planned failover of the first machine while its workload writes: the failover stops the
   source's writers (the workload then exits on an NBD error, so its log holds exactly the
   acknowledged writes) and the machine that runs at the recovery site must hold every one of
   them (data loss 0);
2. unplanned failover of the second machine to "latest" after a disaster (its storage daemon
   and its workload are SIGKILLed): the job cannot reach the source and takes the latest
   processed point, which must be crash-consistent; the writes it lacks are the data loss;
3. a new workload writes at the recovery site on each failed-over machine;
4. commit; the second machine's primary is started again (its disks are reprotect's seed);
   reprotect: the original disks are made equal to the recovered machine by comparing chunk
   hashes, and only chunks that differ travel (after the crash that is more: the killed daemon
   lost the writes its guest never flushed, and reprotect restores them);
5. reverse replication runs while the recovery-site workloads write; planned failback of
   both: the original disks must then hold the failover point's data AND every write made at
   the recovery site (data loss 0);
6. commit of the failback, reprotect forward, and a new forward point from the worker.

Disk layout: each disk's workload region is split in two halves. The primary-phase workload
writes only the FIRST half, the recovery-site workload only the SECOND, each with its own log,
so :func:`~siterecovery.demo.verify.verify_machine` can check each half against its own log
(it scans only the region it is given).

Data loss of a failover = 4096 x (writes the log acknowledges beyond the newest write on the
recovered disks), i.e. ``4096 * max(0, last_logged_seq - max_seq)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siterecovery.adapters.sources.qemu_daemon import MachineDaemon
from siterecovery.control import failover, jobs, protection
from siterecovery.control.vault import Vault
from siterecovery.demo.fabric import CHUNK_SIZE, load_base
from siterecovery.demo.verify import VerifyResult, disk_specs, nbd_reader, verify_machine
from siterecovery.demo.workload import BLOCK_SIZE, Workload, read_log

if TYPE_CHECKING:
    from rich.console import Console

    from siterecovery.demo.run import Checks

MIB = 1024 * 1024
JOB_TIMEOUT_S = 600.0
# A workload whose writers were stopped exits on its next write; give it this long.
WRITER_EXIT_S = 15.0
# Reprotect may send, beyond the chunks the logs name, the chunks of writes a SIGKILLed writer
# made but had not logged yet (at most its 0.2 s log flush interval's worth).
UNLOGGED_SLACK_CHUNKS = 128
# "Far below the disk size": after a planned failover, reprotect must send less than this share
# of the disks. (After a crash the bound is the chunks the primary ever wrote: see _changed_chunks.)
REPROTECT_MAX_SHARE = 0.25


def split_regions(
    regions: dict[str, tuple[int, int]],
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Each disk's workload region cut in two 4 KiB-aligned halves: (first halves, second halves)."""
    first: dict[str, tuple[int, int]] = {}
    second: dict[str, tuple[int, int]] = {}
    for disk, (start, end) in regions.items():
        mid = start + (end - start) // 2 // BLOCK_SIZE * BLOCK_SIZE
        first[disk], second[disk] = (start, mid), (mid, end)
    return first, second


def data_loss_bytes(res: VerifyResult) -> int:
    """Bytes of acknowledged writes missing from a recovered copy (see the module docstring)."""
    return BLOCK_SIZE * max(0, res.last_logged_seq - res.max_seq)


@dataclass
class LifecycleMachine:
    """What the lifecycle needs of one demo machine (run.py owns the daemon and workload)."""

    name: str
    images: dict[str, Path]
    first_half: dict[str, tuple[int, int]]
    second_half: dict[str, tuple[int, int]]
    daemon: MachineDaemon
    workload: Workload  # the primary-phase workload, on the first halves
    seed: int
    recovery_workload: Workload | None = None
    failover_max_seq: int | None = None  # newest primary-phase write the failover point holds
    recovered_dir: str | None = None  # the machine built at the recovery site
    crashed: bool = False  # its primary was SIGKILLed (unplanned failover)

    def base(self) -> dict[str, Any]:
        return {d: load_base(p) for d, p in self.images.items()}


@dataclass
class LifecycleReport:
    rto_seconds: dict[str, float] = field(default_factory=dict)
    data_loss_bytes: dict[str, int] = field(default_factory=dict)
    reprotect_bytes_sent: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "rto_seconds": self.rto_seconds,
            "data_loss_bytes": self.data_loss_bytes,
            "reprotect_bytes_sent": self.reprotect_bytes_sent,
            "lifecycle_seconds": round(self.seconds, 1),
        }


class LifecycleFailed(Exception):
    """A step failed in a way that makes the following steps meaningless (its check says why)."""


@dataclass
class Lifecycle:
    vault: Vault
    root: Path
    console: Console
    checks: Checks
    rate_bytes_s: float
    crash_interval_s: float
    recovery_write_seconds: float
    # follow(title, done): show the items live until done() (run.py's table).
    follow: Callable[[str, Callable[[], bool]], None]
    # observe(): called before a commit releases recovery points (run.py counts them all).
    observe: Callable[[], None] = lambda: None
    report: LifecycleReport = field(default_factory=LifecycleReport)

    # -- the whole act ---------------------------------------------------------------------

    def run(self, planned: LifecycleMachine, unplanned: LifecycleMachine | None) -> LifecycleReport:
        t0 = time.monotonic()
        try:
            self._run(planned, unplanned)
        finally:
            self.report.seconds = time.monotonic() - t0
        return self.report

    def _run(self, planned: LifecycleMachine, unplanned: LifecycleMachine | None) -> None:
        machines = [m for m in (planned, unplanned) if m is not None]
        self.console.rule("[bold]failover, reprotect and failback")
        self.planned_failover(planned)
        if unplanned is not None:
            self.unplanned_failover(unplanned)
        self.write_at_recovery_site(machines)
        self.commit(machines, "failover")
        if unplanned is not None:
            self.console.print(f"starting {unplanned.name}'s primary machine again (reprotect's seed)")
            unplanned.daemon.restart()
        self.reprotect_to_reverse(machines)
        self.reverse_replication(machines)
        self.failback(machines)
        self.commit(machines, "failback")
        self.reprotect_to_forward(machines)

    # -- steps -----------------------------------------------------------------------------

    def planned_failover(self, m: LifecycleMachine) -> None:
        self.console.print(f"planned failover of {m.name} while its workload writes")
        final = self._run_job(failover.request_failover(self.vault, m.name, planned=True)["job"])
        key = f"{m.name} planned failover"
        self._require(key, final, f"source stopped: {(final['result'] or {}).get('source_stopped')}")
        self._record_rto(key, final)
        stopped = _wait_exit(m.workload, WRITER_EXIT_S)
        self.checks.add(
            f"{m.name}: source writers stopped by the failover",
            stopped,
            "the workload's next write was refused and it exited"
            if stopped
            else f"the workload still wrote {WRITER_EXIT_S:.0f}s after the failover; stopped it",
        )
        res = self._verify_recovered(m, m.first_half, m.workload.log_path)
        loss = data_loss_bytes(res)
        self.report.data_loss_bytes[key] = loss
        m.failover_max_seq = res.max_seq
        self.checks.add(
            f"{m.name}: planned failover lost no write",
            res.ok and res.max_seq > 0 and loss == 0,
            f"{res.detail}; data loss {loss} bytes (the log acknowledges writes 1..{res.last_logged_seq})",
        )

    def unplanned_failover(self, m: LifecycleMachine) -> None:
        self.console.print(f"disaster at the primary site: {m.name}'s machine is killed (SIGKILL)")
        t_disaster = time.time()
        m.daemon.kill()
        m.workload.kill()
        m.crashed = True
        final = self._run_job(
            failover.request_failover(self.vault, m.name, planned=False, point="latest")["job"]
        )
        key = f"{m.name} unplanned failover"
        res_job = final["result"] or {}
        self._require(
            key,
            final,
            f"to {res_job.get('point_id')} (pending data processed: {res_job.get('pending_processed')}, "
            f"source stopped: {res_job.get('source_stopped')})",
        )
        self._record_rto(key, final)
        # A cycle that captured its point before the disaster may still have been storing it
        # when the daemon died: the newest point is the latest processed one, whenever it landed.
        points = protection.list_points(self.vault, m.name)
        latest_id = points[0]["id"] if points else None
        latest_time = float(points[0]["time"]) if points else 0.0
        self.checks.add(
            f"{m.name}: unplanned failover used the latest processed point",
            res_job.get("point_id") == latest_id
            and latest_time <= t_disaster
            and res_job.get("pending_processed") is False,
            f"point {res_job.get('point_id')} captured {t_disaster - latest_time:.1f}s before the "
            f"disaster, the newest of {len(points)}; the pending data could not be read",
        )
        res = self._verify_recovered(m, m.first_half, m.workload.log_path)
        loss = data_loss_bytes(res)
        self.report.data_loss_bytes[key] = loss
        m.failover_max_seq = res.max_seq
        self.checks.add(
            f"{m.name}: recovered machine crash-consistent after the disaster",
            res.ok and res.max_seq > 0,
            f"{res.detail}; data loss {loss / MIB:.2f} MiB ({loss // BLOCK_SIZE} acknowledged writes "
            "after the point)",
        )

    def write_at_recovery_site(self, machines: list[LifecycleMachine]) -> None:
        for i, m in enumerate(machines):
            rec = self._recovered(m.name)
            wl = Workload(
                rec["nbd_socket"],
                m.second_half,
                self.root / "logs" / f"{m.name}-recovery.log",
                rate_bytes_s=self.rate_bytes_s,
                seed=2000 + m.seed + i,
                machine_tag=m.name,
            )
            wl.start()
            m.recovery_workload = wl
        self.console.print(
            f"workloads write at the recovery site on {', '.join(m.name for m in machines)} "
            f"({self.recovery_write_seconds:.0f}s before commit; they go on until failback)"
        )
        end = time.monotonic() + self.recovery_write_seconds
        self.follow("writes at the recovery site", lambda: time.monotonic() >= end)
        for m in machines:
            assert m.recovery_workload is not None
            st = m.recovery_workload.stats()
            self.checks.add(
                f"{m.name}: writes at the recovery site",
                m.recovery_workload.is_alive() and st.writes > 0,
                f"{st.writes} writes ({st.bytes / MIB:.1f} MiB) acknowledged at the recovery site",
            )

    def commit(self, machines: list[LifecycleMachine], what: str) -> None:
        self.observe()
        started = {m.name: failover.request_commit(self.vault, m.name)["job"] for m in machines}
        for m in machines:
            final = jobs.wait_for(self.vault, started[m.name], timeout=JOB_TIMEOUT_S)
            st = protection.status(self.vault, m.name)[0]
            points = protection.list_points(self.vault, m.name)
            res = final["result"] or {}
            detail = f"job {final['state']}, item {st['state']}, {len(points)} point(s) kept"
            if what == "failback":
                gone = (
                    st["recovered_machine"] is None and not Path(m.recovered_dir or "/nonexistent").exists()
                )
                detail += f", machine at the recovery site removed: {gone}"
                passed = gone and len(points) == 1
            else:
                detail += f", {res.get('points_released', 0)} released"
                passed = len(points) == 1
            if final["error"]:
                detail += f": {final['error']}"
            ok = self.checks.add(
                f"{m.name}: commit {what}",
                final["state"] == jobs.SUCCEEDED and st["state"] == "FailoverCommitted" and passed,
                detail,
            )
            if not ok:
                raise LifecycleFailed(f"commit of the {what} of {m.name} failed")

    def reprotect_to_reverse(self, machines: list[LifecycleMachine]) -> None:
        started = {m.name: failover.request_reprotect(self.vault, m.name)["job"] for m in machines}
        for m in machines:
            final = jobs.wait_for(self.vault, started[m.name], timeout=JOB_TIMEOUT_S)
            res = final["result"] or {}
            st = protection.status(self.vault, m.name)[0]
            self._require_state(f"{m.name}: reprotect (recovery site -> primary)", final, st, "reverse")
            sent, size = int(res.get("bytes_sent", 0)), int(res.get("disk_bytes", 0))
            self.report.reprotect_bytes_sent[m.name] = {
                "bytes_sent": sent,
                "bytes_compared": int(res.get("bytes_compared", 0)),
                "disk_bytes": size,
            }
            bound = self._changed_chunks(m) * CHUNK_SIZE
            share_ok = m.crashed or sent <= REPROTECT_MAX_SHARE * size
            why = (
                "the crash lost the primary's unflushed writes, so every chunk its workload wrote may differ"
                if m.crashed
                else "the original disks were stopped at the failover point"
            )
            self.checks.add(
                f"{m.name}: reprotect sent only what changed",
                size > 0 and sent <= bound and share_ok,
                f"{sent / MIB:.1f} MiB sent of {size / MIB:.0f} MiB of disks ({sent / max(size, 1):.1%}), "
                f"{int(res.get('bytes_compared', 0)) / MIB:.0f} MiB compared; the chunks that can differ "
                f"hold at most {bound / MIB:.1f} MiB ({why})",
            )

    def reverse_replication(self, machines: list[LifecycleMachine]) -> None:
        since = time.time()
        deadline = time.monotonic() + 3 * self.crash_interval_s + 30

        def newer(name: str) -> list[dict[str, Any]]:
            return [p for p in protection.list_points(self.vault, name) if p["time"] > since]

        self.follow(
            "reverse replication (recovery site -> primary)",
            lambda: time.monotonic() >= deadline or all(newer(m.name) for m in machines),
        )
        for m in machines:
            pts = newer(m.name)
            st = protection.status(self.vault, m.name)[0]
            self.checks.add(
                f"{m.name}: reverse replication",
                bool(pts) and st["direction"] == "reverse",
                f"{len(pts)} reverse point(s) made by the worker, RPO {st['rpo_seconds']}s",
            )

    def failback(self, machines: list[LifecycleMachine]) -> None:
        started = {
            m.name: failover.request_failback(self.vault, m.name, planned=True)["job"] for m in machines
        }
        for m in machines:
            final = jobs.wait_for(self.vault, started[m.name], timeout=JOB_TIMEOUT_S)
            key = f"{m.name} failback"
            res = final["result"] or {}
            self._require(
                key,
                final,
                f"{res.get('update_bytes_sent', 0) / MIB:.1f} MiB written to the original disks "
                f"({res.get('update_bytes_compared', 0) / MIB:.0f} MiB compared)",
            )
            self._record_rto(key, final)
            wl = m.recovery_workload
            assert wl is not None
            self.checks.add(
                f"{m.name}: recovery-site writers stopped by the failback",
                _wait_exit(wl, WRITER_EXIT_S),
                "the recovery-site workload's next write was refused and it exited",
            )
            base = m.base()
            with nbd_reader(Path(m.daemon.nbd_socket), list(m.images)) as reader:
                first = verify_machine(reader, disk_specs(m.first_half), m.workload.log_path, base)
                second = verify_machine(reader, disk_specs(m.second_half), wl.log_path, base)
            self.checks.add(
                f"{m.name}: primary disks hold the failover point's data",
                first.ok and first.max_seq == m.failover_max_seq,
                f"first halves: {first.detail}; the failover point held writes 1..{m.failover_max_seq}",
            )
            loss = data_loss_bytes(second)
            self.report.data_loss_bytes[key] = loss
            self.checks.add(
                f"{m.name}: failback brought every recovery-site write home",
                second.ok and second.max_seq > 0 and loss == 0,
                f"second halves: {second.detail}; data loss {loss} bytes",
            )

    def reprotect_to_forward(self, machines: list[LifecycleMachine]) -> None:
        since = time.time()
        started = {m.name: failover.request_reprotect(self.vault, m.name)["job"] for m in machines}
        for m in machines:
            final = jobs.wait_for(self.vault, started[m.name], timeout=JOB_TIMEOUT_S)
            res = final["result"] or {}
            st = protection.status(self.vault, m.name)[0]
            self._require_state(f"{m.name}: reprotect (primary -> recovery site)", final, st, "forward")
            sent, size = int(res.get("bytes_sent", 0)), int(res.get("disk_bytes", 0))
            self.report.reprotect_bytes_sent[f"{m.name} (after failback)"] = {
                "bytes_sent": sent,
                "bytes_compared": int(res.get("bytes_compared", 0)),
                "disk_bytes": size,
            }
            # Nothing wrote to the original disks since the failback made them equal to its point.
            self.checks.add(
                f"{m.name}: reprotect after failback sent only what changed",
                size > 0 and sent <= 2 * CHUNK_SIZE * len(m.images),
                f"{sent / MIB:.2f} MiB sent of {size / MIB:.0f} MiB of disks ({res.get('method')})",
            )
        # The worker replicates forward again on the item's original policy.
        deadline = time.monotonic() + 3 * self.crash_interval_s + 30
        reprotect_points = {
            (jobs.show_job(self.vault, j)["result"] or {}).get("forward_point") for j in started.values()
        }

        def newer(name: str) -> list[dict[str, Any]]:
            return [
                p
                for p in protection.list_points(self.vault, name)
                if p["time"] > since and p["id"] not in reprotect_points
            ]

        self.follow(
            "forward replication again",
            lambda: time.monotonic() >= deadline or all(newer(m.name) for m in machines),
        )
        for m in machines:
            pts = newer(m.name)
            st = protection.status(self.vault, m.name)[0]
            self.checks.add(
                f"{m.name}: replicates forward again",
                bool(pts) and st["state"] == "Protected" and st["direction"] == "forward",
                f"item {st['state']} ({st['direction']}, policy {st['policy']}), {len(pts)} new forward "
                f"point(s) from the worker" + (f" by {pts[-1]['method']}" if pts else ""),
            )

    # -- helpers ---------------------------------------------------------------------------

    def _run_job(self, job_id: str) -> dict[str, Any]:
        return jobs.wait_for(self.vault, job_id, timeout=JOB_TIMEOUT_S)

    def _require(self, key: str, final: dict[str, Any], detail: str) -> None:
        res = final["result"] or {}
        rto = res.get("rto_seconds")
        text = f"job {final['state']}"
        if rto is not None:
            text += f", machine running {rto:.1f}s after the request"
        text += f"; {detail}"
        if final["error"]:
            text += f": {final['error']}"
        if not self.checks.add(key, final["state"] == jobs.SUCCEEDED, text):
            raise LifecycleFailed(f"{key} failed")

    def _require_state(self, check: str, final: dict[str, Any], st: dict[str, Any], direction: str) -> None:
        text = f"job {final['state']} in {final['duration_s']}s, item {st['state']} ({st['direction']})"
        if final["error"]:
            text += f": {final['error']}"
        ok = final["state"] == jobs.SUCCEEDED and st["state"] == "Protected" and st["direction"] == direction
        if not self.checks.add(check, ok, text):
            raise LifecycleFailed(f"{check} failed")

    def _record_rto(self, key: str, final: dict[str, Any]) -> None:
        rto = (final["result"] or {}).get("rto_seconds")
        if rto is not None:
            self.report.rto_seconds[key] = round(float(rto), 2)

    def _recovered(self, name: str) -> dict[str, Any]:
        rec = protection.status(self.vault, name)[0]["recovered_machine"]
        if not rec or not rec.get("nbd_socket"):
            raise LifecycleFailed(f"{name} has no running machine at the recovery site: {rec}")
        return dict(rec)

    def _verify_recovered(
        self, m: LifecycleMachine, regions: dict[str, tuple[int, int]], log: Path
    ) -> VerifyResult:
        rec = self._recovered(m.name)
        m.recovered_dir = rec["dir"]
        with nbd_reader(Path(rec["nbd_socket"]), list(m.images)) as reader:
            return verify_machine(reader, disk_specs(regions), log, m.base())

    def _changed_chunks(self, m: LifecycleMachine) -> int:
        """An upper bound on the 64 KiB chunks in which the original disks and the recovered
        machine can differ: those written at the recovery site, plus those the primary wrote
        after the failover point (lost by an unplanned failover; reprotect undoes them). A
        SIGKILLed primary also loses writes its guest never flushed (qcow2 metadata still in the
        daemon's memory; the demo workload does not flush), so after a crash every chunk the
        primary's workload wrote counts."""
        chunks: set[tuple[int, int]] = set()
        assert m.recovery_workload is not None
        _h, records = read_log(m.recovery_workload.log_path)
        chunks.update((r.disk, r.offset // CHUNK_SIZE) for r in records)
        _h, records = read_log(m.workload.log_path)
        after = 0 if m.crashed else (m.failover_max_seq or 0)
        # Disk indexes are the same in both logs (the same disks in the same order).
        chunks.update((r.disk, r.offset // CHUNK_SIZE) for r in records if r.seq > after)
        return len(chunks) + UNLOGGED_SLACK_CHUNKS


def _wait_exit(wl: Workload, timeout_s: float) -> bool:
    """Wait for a workload whose writers were stopped to exit; stop it if it does not."""
    deadline = time.monotonic() + timeout_s
    while wl.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    exited = not wl.is_alive()
    try:
        wl.stop()
    except Exception:
        # It exited on an NBD error (the expected end); stop() reports the non-zero status.
        wl.kill()
    return exited


__all__ = [
    "Lifecycle",
    "LifecycleFailed",
    "LifecycleMachine",
    "LifecycleReport",
    "data_loss_bytes",
    "split_regions",
]
