"""Failover, change of recovery point, cancel, commit, reprotect, failback, complete migration.

The life of a protected item after its first recovery point (ASR's)::

    Protected --failover--> FailedOver --commit--> FailoverCommitted --reprotect--> Protected
    (forward)    (planned/unplanned)   (cancel if planned: back to Protected)        (reverse)

and failback is the same path in the reverse direction: a planned failover from the machine
running at the recovery site back onto the original machine's disks, commit, and a reprotect
that makes the item replicate forward again.

Where a failover lands:

* forward: a new machine "<item>" at the recovery site, its disks materialized from the point
  (qcow2 on qemu sites, raw on raw sites) into ``<site path>/machines/<item>/`` together with its
  machine spec (``machine.json``), libvirt domain XML and cloud-init NoCloud seed; on qemu sites
  a qemu-storage-daemon owns the disks and takes writes (the machine "runs").
* reverse (failback): the original machine at the primary site. Its own disks are the seed: they
  are made equal to the point by comparing chunk hashes and writing only what differs, while
  the original machine's writers are stopped; then its writers are started again.

Every operation is a job whose steps are safe to repeat: a worker killed in the middle resumes
the job at the interrupted step. A failover that fails (not interrupted) is rolled back: the
machine it was building is removed, its addresses released, the source's writers started again
and the item returns to the state it started from, so an item is never left half failed over.

Reprotect after a forward failover: the machine at the recovery site started from point P with
a fresh change-tracking baseline, so the first reverse point is P plus the chunks its dirty
bitmap names; the original disks are then synchronised to that point by comparing their chunk
hashes with it (writes the primary made after P, lost in an unplanned failover, are undone
there too). The job reports the bytes compared and the bytes sent.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select

from siterecovery.adapters.db.models import ItemRow, PointRow, PolicyRow
from siterecovery.bootstrap import source_for
from siterecovery.control import jobs, networks
from siterecovery.control.jobs import JobContext, handler, new_job
from siterecovery.control.maintenance import datastore_lock
from siterecovery.control.protection import begin_for, get_item, refuse_if_busy, resolve_point
from siterecovery.control.replication import (
    item_lock,
    latest_point,
    release_stale_snapshots,
    take_point,
    work_dir_for,
)
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.materialize import materialize_disk
from siterecovery.domain.states import Direction, ItemState, Operation
from siterecovery.errors import InvalidInput, OperationNotAllowed, SiteRecoveryError, StorageFull

log = logging.getLogger(__name__)

PREREQ = "Prerequisites check"
SHUTDOWN = "Shut down source machine"
FINAL_SYNC = "Final sync"
PENDING = "Process pending data"
CREATE = "Create machine at target site"
START = "Start machine"
PLANNED_STEPS = [PREREQ, SHUTDOWN, FINAL_SYNC, CREATE, START]
UNPLANNED_STEPS = [PREREQ, SHUTDOWN, PENDING, CREATE, START]
POINT_CHOICES = ("latest", "latest-processed", "latest-app", "latest-app-consistent")


# ---------------------------------------------------------------------------------------------
# Where things are: sources, targets and the machines' control


def machine_dir(site_path: str, name: str) -> Path:
    return Path(site_path) / "machines" / name


def _control(kind: str, spec: dict[str, Any], work_dir: Path) -> Any:
    """The machine control of a qemu-site machine (None for raw sites: files have no writers we
    can stop)."""
    if kind != "qemu":
        return None
    from siterecovery.adapters.compute.qemu import QemuMachineControl

    return QemuMachineControl(
        spec["qmp"],
        {d["name"]: d["node"] for d in spec["disks"]},
        work_dir / "control",
        nbd_socket=spec.get("nbd"),
    )


def _read_item(vault: Any, ctx: JobContext) -> dict[str, Any]:
    """A plain snapshot of what the handlers need from the item (no session outlives a step)."""
    with vault.store.uow() as s:
        job = jobs.get_job(s, ctx.job_id)
        item = s.get(ItemRow, job.item_id)
        if item is None:
            raise InvalidInput(f"the item of job {ctx.job_id} no longer exists.")
        return {
            "id": item.id,
            "name": item.name,
            "state": item.state,
            "direction": item.direction,
            "disks": list(item.disks),
            "primary_kind": item.source_site.kind,
            "primary_spec": dict(item.machine.spec),
            "recovery_kind": item.recovery_site.kind,
            "recovery_site": item.recovery_site.name,
            "recovery_path": item.recovery_site.path,
            "recovered": dict(item.recovered_machine) if item.recovered_machine else None,
            "failover": dict(item.failover) if item.failover else None,
            "job_created_at": job.created_at,
            "result": dict(job.result or {}),
        }


def _source_of(vault: Any, info: dict[str, Any], direction: str) -> tuple[str, dict[str, Any], Path]:
    """(kind, spec, work dir) of the machine that replication reads in ``direction``."""
    if direction == Direction.FORWARD:
        return info["primary_kind"], info["primary_spec"], work_dir_for(vault, info["name"])
    rec = info["recovered"]
    if not rec:
        raise OperationNotAllowed(f"{info['name']!r} has no machine at the recovery site.")
    return str(rec["kind"]), rec, work_dir_for(vault, info["name"], "reverse")


def _stop_writes(vault: Any, info: dict[str, Any], direction: str) -> bool:
    """Stop the writers of the machine replication reads in ``direction``; False for raw sites."""
    kind, spec, wd = _source_of(vault, info, direction)
    ctl = _control(kind, spec, wd)
    if ctl is None:
        return False
    ctl.stop_writes()
    return True


def _resume_writes(vault: Any, info: dict[str, Any], direction: str) -> None:
    kind, spec, wd = _source_of(vault, info, direction)
    ctl = _control(kind, spec, wd)
    if ctl is not None:
        ctl.resume_writes()


def _set_tracking_baseline(kind: str, spec: dict[str, Any], work_dir: Path, disks: list[str]) -> None:
    """Start change tracking from the disks as they are now (equal to the point just applied),
    so that the next replication from this machine sends only what is written from now on."""
    source = source_for(kind, spec, work_dir)
    try:
        release_stale_snapshots(source, spec.get("name", "machine"))
        with source.snapshot(disks) as snap:
            snap.commit()
    finally:
        source.close()


def _space_needed(vault: Any, refs: dict[str, IndexRef]) -> int:
    # Sparse images need room for the point's data, not its virtual size.
    return sum(
        sum(1 for _ in vault.datastore.index_reader(r).nonzero_entries()) * r.chunk_size
        for r in refs.values()
    )


def site_full(where: Path | str, detail: str) -> StorageFull:
    return StorageFull(
        f"no space left on the recovery site at {where}: {detail}. Free space there or give the "
        "recovery site a path with more room; the recovery points are intact.",
        where=str(where),
        detail=detail,
    )


def _check_room(vault: Any, path: Path, refs: dict[str, IndexRef]) -> None:
    need = _space_needed(vault, refs)
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise site_full(path, f"{free} bytes free, the machine needs {need}")


def _point_refs(session: Any, item: ItemRow, point_id: str) -> tuple[PointRow, dict[str, IndexRef]]:
    p = resolve_point(session, item, point_id)
    return p, {n: IndexRef.from_json(r) for n, r in p.disks.items()}


# ---------------------------------------------------------------------------------------------
# Requests (run by the CLI/API: validate, refuse before anything changes, queue the job)


def _resolve_requested_point(session: Any, item: ItemRow, point: str) -> PointRow | None:
    """Validate the requested point now; None for "latest" (decided by the job)."""
    if point == "latest":
        if latest_point(session, item.id) is None:
            raise OperationNotAllowed(
                f"{item.name}: no recovery point yet; wait for the initial replication."
            )
        return None
    which = "latest" if point == "latest-processed" else point
    return resolve_point(session, item, which)


def request_failover(
    vault: Any,
    item_name: str,
    *,
    planned: bool,
    point: str = "latest",
    shutdown_source: bool = True,
    job_kind: str = "failover",
) -> dict[str, Any]:
    """Queue a failover (or, in the reverse direction, a failback) of the item.

    Planned: the source's writers are stopped, a final sync makes the last point, no data is
    lost. Unplanned: to ``point`` (latest: process what is pending first when the source can be
    reached; latest-processed; latest-app; a point id), optionally stopping the source first.
    """
    op = Operation.PLANNED_FAILOVER if planned else Operation.UNPLANNED_FAILOVER
    if not planned and point not in POINT_CHOICES and not point.startswith("rp-"):
        raise InvalidInput(
            f"recovery point {point!r} is not valid: use latest, latest-processed, latest-app or a "
            "point id from 'siterecovery point list ITEM'."
        )
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        state = ItemState(item.state)
        entered = begin_for(item, op)
        refuse_if_busy(s, item)
        direction = Direction(item.direction)
        source_kind = item.source_site.kind if direction is Direction.FORWARD else item.recovery_site.kind
        if planned and source_kind != "qemu":
            raise OperationNotAllowed(
                f"a planned failover of {item_name!r} needs a machine whose writers siterecovery can "
                f"stop; the source is on a {source_kind} site. Stop its writers yourself, then run an "
                "unplanned failover to 'latest'."
            )
        chosen = None if planned else _resolve_requested_point(s, item, point)
        base = chosen or latest_point(s, item.id)
        if base is None:
            raise OperationNotAllowed(
                f"{item_name}: no recovery point yet; wait for the initial replication."
            )
        plan: dict[str, Any] | None = None
        if direction is Direction.FORWARD:
            refs = {n: IndexRef.from_json(r) for n, r in base.disks.items()}
            _check_room(vault, Path(item.recovery_site.path) / "machines", refs)
            # Validates NIC roles, subnets, addresses, size and room; allocates the addresses in
            # this transaction, so a refusal leaves everything as it was.
            plan = networks.plan_failover_network(s, item, purpose="failover")
        steps = PLANNED_STEPS if planned else UNPLANNED_STEPS
        if not planned and not shutdown_source:
            steps = [st for st in steps if st != SHUTDOWN]
        job = new_job(
            s,
            job_kind,
            item_name,
            steps,
            item_id=item.id,
            params={
                "planned": planned,
                "point": point if not planned else "final-sync",
                "point_id": chosen.id if chosen else None,
                "shutdown_source": planned or shutdown_source,
                "direction": direction.value,
                "previous_state": state.value,
                "network_plan": plan,
            },
        )
        # A migration from Protected is one job: its item shows CompletingMigration throughout.
        item.state = (ItemState.COMPLETING_MIGRATION if job_kind == "complete-migration" else entered).value
        item.failover = {
            "job": job.id,
            "planned": planned,
            "direction": direction.value,
            "state": "starting",
            "requested_at": job.created_at,
        }
        item.updated_at = time.time()
        return {
            "item": item_name,
            "job": job.id,
            "planned": planned,
            "direction": direction.value,
            "failback": direction is Direction.REVERSE,
            "point": point if not planned else "final sync",
        }


def request_failback(
    vault: Any, item_name: str, *, planned: bool = True, point: str = "latest"
) -> dict[str, Any]:
    """Failback: a failover in the reverse direction (the item must have been reprotected)."""
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        if item.direction != Direction.REVERSE.value:
            raise OperationNotAllowed(
                f"{item_name!r} replicates forward (primary -> recovery site): there is nothing to fail "
                "back. Failback follows a failover, its commit and a reprotect; use 'siterecovery failover'."
            )
    return request_failover(vault, item_name, planned=planned, point=point)


# ---------------------------------------------------------------------------------------------
# The failover job


@handler("failover")
def run_failover(ctx: JobContext) -> None:
    _failover_or_roll_back(ctx, ctx.params(), _read_item(ctx.vault, ctx))


def _failover_or_roll_back(ctx: JobContext, params: dict[str, Any], info: dict[str, Any]) -> None:
    """Run the failover's steps; a failure (not an interruption, which resumes) is rolled back."""
    try:
        _failover_steps(ctx, params, info)
    except InterruptedError:
        raise
    except Exception as err:
        _rollback_failover(ctx, params, info, err)
        raise


def _failover_steps(ctx: JobContext, params: dict[str, Any], info: dict[str, Any]) -> None:
    vault, name = ctx.vault, info["name"]
    direction = params["direction"]
    planned = params["planned"]
    forward = direction == Direction.FORWARD

    with ctx.step(PREREQ) as run:
        if run:
            if planned:
                kind, spec, wd = _source_of(vault, info, direction)
                ctl = _control(kind, spec, wd)
                if ctl is not None and not ctl.is_reachable():
                    raise OperationNotAllowed(
                        f"a planned failover needs the source machine of {name!r}, and its QMP socket "
                        f"{spec.get('qmp')} does not answer. Start it, or run an unplanned failover "
                        "(it works without the source)."
                    )
            if not forward:
                ctl = _control(info["primary_kind"], info["primary_spec"], work_dir_for(vault, name))
                if ctl is not None and not ctl.is_reachable():
                    raise OperationNotAllowed(
                        f"failback writes to the original machine's disks, and its QMP socket "
                        f"{info['primary_spec'].get('qmp')} does not answer; start the machine's "
                        "process at the primary site (its guest stays stopped) and try again."
                    )
            ctx.progress(0.05, "prerequisites met", force=True)

    if params.get("shutdown_source"):
        with ctx.step(SHUTDOWN) as run:
            if run:
                try:
                    stopped = _stop_writes(vault, info, direction)
                    ctx.set_result(source_stopped=stopped)
                except SiteRecoveryError as err:
                    if planned:
                        raise
                    # Unplanned failover goes on without the source (it may be gone for good).
                    ctx.set_result(source_stopped=False, source_stop_error=str(err))
                ctx.progress(0.1, "source machine stopped", force=True)

    sync_step = FINAL_SYNC if planned else PENDING
    with ctx.step(sync_step) as run:
        if run:
            point_id = _sync_for_failover(ctx, params, info)
            ctx.set_result(point_id=point_id)
    info = _read_item(vault, ctx)
    point_id = info["result"]["point_id"]
    with vault.store.uow() as s:
        item = get_item(s, name)
        point, refs = _point_refs(s, item, point_id)
        point_info = {"id": point.id, "time": point.created_at, "type": point.consistency}
    if planned:
        # The writers were stopped before the final point: nothing written is missing from it.
        ctx.set_result(final_point_after_writes_stopped=True)

    if forward:
        _create_at_recovery_site(ctx, params, info, refs, point_info)
    else:
        _apply_to_original(ctx, info, refs, point_info)


def _sync_for_failover(ctx: JobContext, params: dict[str, Any], info: dict[str, Any]) -> str:
    vault, name, direction = ctx.vault, info["name"], params["direction"]
    if params["planned"]:
        r = take_point(vault, name, direction=direction, cancel=ctx.cancel)
        ctx.progress(0.3, f"final point {r.point_id}", force=True)
        ctx.set_result(final_sync_bytes_sent=r.stats.bytes_sent)
        return r.point_id
    if params.get("point_id"):
        return str(params["point_id"])
    if params["point"] == "latest":
        try:
            r = take_point(vault, name, direction=direction, cancel=ctx.cancel)
            ctx.set_result(pending_processed=True)
            return r.point_id
        except InterruptedError:
            raise
        except Exception as err:  # the source may be gone: the latest processed point it is
            ctx.set_result(pending_processed=False, pending_error=str(err))
    with vault.store.uow() as s:
        p = latest_point(s, info["id"])
        if p is None:
            raise OperationNotAllowed(f"{name}: no recovery point to fail over to.")
        return p.id


def _materialize(vault: Any, refs: dict[str, IndexRef], paths: dict[str, Path], fmt: str, where: Path) -> int:
    with datastore_lock(vault), ThreadPoolExecutor(max_workers=max(1, len(refs))) as pool:
        futs = {n: pool.submit(materialize_disk, vault.datastore, r, paths[n], fmt) for n, r in refs.items()}
        try:
            return sum(f.result() for f in futs.values())
        except StorageFull as err:
            raise site_full(err.fields.get("where", where), err.fields.get("detail", str(err))) from err


def _machine_doc(
    name: str,
    info: dict[str, Any],
    point_info: dict[str, Any],
    plan: dict[str, Any] | None,
    disks: list[dict[str, Any]],
    role: str,
) -> dict[str, Any]:
    spec = info["primary_spec"]
    size = (plan or {}).get("size") or {
        "name": None,
        "cpus": spec["cpus"],
        "memory_mib": spec["memory_mib"],
        "max_nics": len(spec["nics"]),
    }
    return {
        "name": name,
        "source_machine": spec["name"],
        "role": role,
        "recovery_point": point_info,
        "size": size,
        "cpus": size["cpus"],
        "memory_mib": size["memory_mib"],
        "os": spec.get("os", "linux"),
        "disks": disks,
        "nics": list((plan or {}).get("nics") or []),
        "nics_not_created": list((plan or {}).get("nics_not_created") or []),
    }


def build_machine(
    vault: Any,
    *,
    name: str,
    directory: Path,
    site_kind: str,
    refs: dict[str, IndexRef],
    doc: dict[str, Any],
) -> dict[str, Any]:
    """Materialize the disks in parallel and write the machine's spec, domain XML and seed."""
    from siterecovery.adapters.compute.artifacts import write_machine_artifacts

    fmt = "qcow2" if site_kind == "qemu" else "raw"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {n: directory / f"{n}.{fmt}" for n in refs}
    written = _materialize(vault, refs, paths, fmt, directory)
    doc = {
        **doc,
        "disks": [{"name": n, "path": str(paths[n]), "format": fmt, "size": refs[n].size} for n in refs],
    }
    artifacts = write_machine_artifacts(directory, doc)
    return {"bytes_written": written, "paths": {n: str(p) for n, p in paths.items()}, "artifacts": artifacts}


def start_machine(directory: Path, disk_paths: dict[str, str]) -> Any:
    """Start (or find running) the qemu-storage-daemon that owns a built machine's disks."""
    from siterecovery.adapters.sources.qemu_daemon import MachineDaemon

    run_dir = directory / "run"
    if (run_dir / "daemon.json").exists():
        with contextlib.suppress(Exception):
            daemon = MachineDaemon.attach(run_dir)
            if daemon.is_running():
                return daemon
    return MachineDaemon.start(run_dir, {n: Path(p) for n, p in disk_paths.items()})


def remove_machine(directory: Path) -> None:
    """Stop a built machine's process (if any) and delete its directory."""
    run_dir = directory / "run"
    if (run_dir / "daemon.json").exists():
        from siterecovery.adapters.sources.qemu_daemon import MachineDaemon

        with contextlib.suppress(Exception):  # already gone: nothing to stop
            MachineDaemon.attach(run_dir).stop()
    shutil.rmtree(directory, ignore_errors=True)


def _recovered_spec(
    name: str, info: dict[str, Any], directory: Path, paths: dict[str, str], doc: dict[str, Any], daemon: Any
) -> dict[str, Any]:
    from siterecovery.adapters.sources.qemu_daemon import node_name

    kind = info["recovery_kind"]
    return {
        "name": name,
        "kind": kind,
        "site": info["recovery_site"],
        "dir": str(directory),
        "run_dir": str(directory / "run") if daemon is not None else None,
        "qmp": daemon.qmp_socket if daemon is not None else None,
        "nbd": daemon.nbd_socket if daemon is not None else None,
        "pid": daemon.pid if daemon is not None else None,
        "disks": [{"name": n, "node": node_name(n), "path": p} for n, p in paths.items()],
        "nics": doc["nics"],
        "nics_not_created": doc["nics_not_created"],
        "size": doc["size"],
        "cpus": doc["cpus"],
        "memory_mib": doc["memory_mib"],
        "os": doc["os"],
        "hooks": {"freeze": None, "thaw": None, "timeout_s": 60.0},
    }


def _create_at_recovery_site(
    ctx: JobContext,
    params: dict[str, Any],
    info: dict[str, Any],
    refs: dict[str, IndexRef],
    point_info: dict[str, Any],
) -> None:
    vault, name = ctx.vault, info["name"]
    directory = machine_dir(info["recovery_path"], name)
    plan = params.get("network_plan")
    with ctx.step(CREATE) as run:
        if run:
            doc = _machine_doc(name, info, point_info, plan, [], "failover")
            built = build_machine(
                vault, name=name, directory=directory, site_kind=info["recovery_kind"], refs=refs, doc=doc
            )
            ctx.set_result(
                bytes_written=built["bytes_written"], disks=built["paths"], artifacts=built["artifacts"]
            )
            ctx.progress(0.8, "machine created", force=True)
    with ctx.step(START) as run:
        if run:
            info = _read_item(vault, ctx)
            paths = info["result"]["disks"]
            doc = _machine_doc(name, info, point_info, plan, [], "failover")
            daemon = start_machine(directory, paths) if info["recovery_kind"] == "qemu" else None
            spec = _recovered_spec(name, info, directory, paths, doc, daemon)
            wd = work_dir_for(vault, name, "reverse")
            shutil.rmtree(wd, ignore_errors=True)  # tracking of an earlier machine means nothing now
            if daemon is not None:
                _set_tracking_baseline("qemu", spec, wd, info["disks"])
            rto = time.time() - info["job_created_at"]
            ctx.set_result(rto_seconds=round(rto, 3), machine=name, machine_dir=str(directory))
            with vault.store.uow() as s:
                item = get_item(s, name)
                item.recovered_machine = spec
                item.failover = {
                    **(item.failover or {}),
                    "state": "failed-over",
                    "point_id": point_info["id"],
                    "point_time": point_info["time"],
                    "point_type": point_info["type"],
                    "machine": name,
                    "site": info["recovery_site"],
                    "dir": str(directory),
                    "rto_seconds": round(rto, 3),
                    "nics_not_created": doc["nics_not_created"],
                    "completed_at": time.time(),
                }
                item.state = ItemState.FAILED_OVER.value
                item.updated_at = time.time()


def _apply_to_original(
    ctx: JobContext, info: dict[str, Any], refs: dict[str, IndexRef], point_info: dict[str, Any]
) -> None:
    """Failback: make the original machine's disks equal to the point, then start its writers."""
    vault, name = ctx.vault, info["name"]
    kind, spec = info["primary_kind"], info["primary_spec"]
    wd = work_dir_for(vault, name)
    with ctx.step(CREATE) as run:
        if run:
            stats = sync_original_disks(vault, kind, spec, wd, refs, cancel=ctx.cancel)
            ctx.set_result(**{f"update_{k}": v for k, v in stats.items()})
            ctx.progress(0.8, "original disks updated", force=True)
    with ctx.step(START) as run:
        if run:
            if kind == "qemu":
                _set_tracking_baseline(kind, spec, wd, info["disks"])
                ctl = _control(kind, spec, wd)
                ctl.resume_writes()
            rto = time.time() - info["job_created_at"]
            ctx.set_result(rto_seconds=round(rto, 3), machine=spec["name"])
            with vault.store.uow() as s:
                item = get_item(s, name)
                item.failover = {
                    **(item.failover or {}),
                    "state": "failed-over",
                    "point_id": point_info["id"],
                    "point_time": point_info["time"],
                    "point_type": point_info["type"],
                    "machine": spec["name"],
                    "site": item.source_site.name,
                    "rto_seconds": round(rto, 3),
                    "completed_at": time.time(),
                }
                item.state = ItemState.FAILED_OVER.value
                item.updated_at = time.time()


def sync_original_disks(
    vault: Any, kind: str, spec: dict[str, Any], work_dir: Path, refs: dict[str, IndexRef], cancel: Any = None
) -> dict[str, int]:
    """Make the original machine's disks byte-equal to ``refs`` in place, writing only chunks
    whose hashes differ; its writers are stopped first. Returns bytes compared and sent."""
    from siterecovery.dataplane.resync import sync_disk_to_point

    totals = {"bytes_compared": 0, "bytes_sent": 0, "bytes_zeroed": 0, "chunks_sent": 0}
    disk_paths = {d["name"]: d.get("path") for d in spec["disks"]}
    ctl = _control(kind, spec, work_dir)
    if ctl is not None:
        ctl.stop_writes()
    for disk, ref in refs.items():
        if ctl is not None:
            cm = ctl.open_writer(disk)
        else:
            from siterecovery.adapters.compute.raw import RawFileWriter

            cm = contextlib.closing(RawFileWriter(Path(str(disk_paths[disk]))))
        with datastore_lock(vault), cm as writer:
            st = sync_disk_to_point(vault.datastore, ref, writer, cancel=cancel)
        totals["bytes_compared"] += st.bytes_compared
        totals["bytes_sent"] += st.bytes_sent
        totals["bytes_zeroed"] += st.bytes_zeroed
        totals["chunks_sent"] += st.chunks_sent
    return totals


def _rollback_failover(
    ctx: JobContext, params: dict[str, Any], info: dict[str, Any], err: BaseException
) -> None:
    """Undo a failed failover: nothing stays at the target, the source runs again."""
    vault, name = ctx.vault, info["name"]
    notes: list[str] = []
    if params["direction"] == Direction.FORWARD:
        remove_machine(machine_dir(info["recovery_path"], name))
        shutil.rmtree(work_dir_for(vault, name, "reverse"), ignore_errors=True)
    result = _read_item(vault, ctx)["result"]
    if result.get("source_stopped") is True:
        try:
            _resume_writes(vault, info, params["direction"])
        except Exception as resume_err:  # say so; the failover error stays the job's error
            notes.append(f"the source machine could not be started again: {resume_err}")
    with vault.store.uow() as s:
        item = get_item(s, name)
        if params["direction"] == Direction.FORWARD:
            networks.release_addresses(s, item.id, "failover")
            item.recovered_machine = None
        item.state = params.get("previous_state", ItemState.PROTECTED.value)
        item.failover = None
        item.updated_at = time.time()
    ctx.set_result(rolled_back=True, rollback_notes=notes, failure=str(err))


# ---------------------------------------------------------------------------------------------
# Change recovery point, cancel, commit


def request_change_point(vault: Any, item_name: str, point: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        entered = begin_for(item, Operation.CHANGE_RECOVERY_POINT)
        refuse_if_busy(s, item)
        which = "latest" if point == "latest-processed" else point
        p = resolve_point(s, item, which)
        job = new_job(
            s,
            "change-recovery-point",
            item_name,
            ["Stop machine", "Rebuild machine", START],
            item_id=item.id,
            params={"point_id": p.id, "previous_point": (item.failover or {}).get("point_id")},
        )
        item.state = entered.value
        return {"item": item_name, "job": job.id, "point_id": p.id, "point_time": p.created_at}


@handler("change-recovery-point")
def run_change_point(ctx: JobContext) -> None:
    params = ctx.params()
    info = _read_item(ctx.vault, ctx)
    vault, name = ctx.vault, info["name"]
    forward = info["failover"]["direction"] == Direction.FORWARD
    with vault.store.uow() as s:
        item = get_item(s, name)
        point, refs = _point_refs(s, item, params["point_id"])
        point_info = {"id": point.id, "time": point.created_at, "type": point.consistency}
    try:
        if forward:
            directory = Path(info["recovered"]["dir"])
            with ctx.step("Stop machine") as run:
                if run:
                    remove_machine_process(directory)
            with ctx.step("Rebuild machine") as run:
                if run:
                    doc = _machine_doc(name, info, point_info, None, [], "failover")
                    doc["nics"] = info["recovered"]["nics"]
                    doc["nics_not_created"] = info["recovered"].get("nics_not_created", [])
                    doc["size"] = info["recovered"]["size"]
                    built = build_machine(
                        vault,
                        name=name,
                        directory=directory,
                        site_kind=info["recovery_kind"],
                        refs=refs,
                        doc=doc,
                    )
                    ctx.set_result(bytes_written=built["bytes_written"])
            with ctx.step(START) as run:
                if run:
                    paths = {d["name"]: d["path"] for d in info["recovered"]["disks"]}
                    daemon = start_machine(directory, paths) if info["recovery_kind"] == "qemu" else None
                    wd = work_dir_for(vault, name, "reverse")
                    shutil.rmtree(wd, ignore_errors=True)
                    spec = dict(info["recovered"])
                    if daemon is not None:
                        spec.update(qmp=daemon.qmp_socket, nbd=daemon.nbd_socket, pid=daemon.pid)
                        _set_tracking_baseline("qemu", spec, wd, info["disks"])
                    _finish_change(vault, name, point_info, spec)
        else:
            kind, spec = info["primary_kind"], info["primary_spec"]
            wd = work_dir_for(vault, name)
            with ctx.step("Stop machine") as run:
                if run:
                    ctl = _control(kind, spec, wd)
                    if ctl is not None:
                        ctl.stop_writes()
            with ctx.step("Rebuild machine") as run:
                if run:
                    stats = sync_original_disks(vault, kind, spec, wd, refs, cancel=ctx.cancel)
                    ctx.set_result(**{f"update_{k}": v for k, v in stats.items()})
            with ctx.step(START) as run:
                if run:
                    if kind == "qemu":
                        _set_tracking_baseline(kind, spec, wd, info["disks"])
                        _control(kind, spec, wd).resume_writes()
                    _finish_change(vault, name, point_info, None)
    except InterruptedError:
        raise
    except Exception:
        with vault.store.uow() as s:
            item = get_item(s, name)
            item.state = ItemState.FAILED_OVER.value
        raise


def remove_machine_process(directory: Path) -> None:
    run_dir = directory / "run"
    if (run_dir / "daemon.json").exists():
        from siterecovery.adapters.sources.qemu_daemon import MachineDaemon

        with contextlib.suppress(Exception):
            MachineDaemon.attach(run_dir).stop()


def _finish_change(vault: Any, name: str, point_info: dict[str, Any], spec: dict[str, Any] | None) -> None:
    with vault.store.uow() as s:
        item = get_item(s, name)
        if spec is not None:
            item.recovered_machine = spec
        item.failover = {
            **(item.failover or {}),
            "point_id": point_info["id"],
            "point_time": point_info["time"],
            "point_type": point_info["type"],
        }
        item.state = ItemState.FAILED_OVER.value
        item.updated_at = time.time()


def request_cancel(vault: Any, item_name: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        entered = begin_for(item, Operation.CANCEL_FAILOVER)
        refuse_if_busy(s, item)
        job = new_job(
            s,
            "cancel-failover",
            item_name,
            ["Stop machine at target site", "Start source machine", "Resume replication"],
            item_id=item.id,
        )
        item.state = entered.value
        return {"item": item_name, "job": job.id}


@handler("cancel-failover")
def run_cancel(ctx: JobContext) -> None:
    info = _read_item(ctx.vault, ctx)
    vault, name = ctx.vault, info["name"]
    direction = info["failover"]["direction"]
    try:
        with ctx.step("Stop machine at target site") as run:
            if run:
                if direction == Direction.FORWARD:
                    remove_machine(Path(info["recovered"]["dir"]))
                    shutil.rmtree(work_dir_for(vault, name, "reverse"), ignore_errors=True)
                    with vault.store.uow() as s:
                        item = get_item(s, name)
                        networks.release_addresses(s, item.id, "failover")
                        item.recovered_machine = None
                else:
                    ctl = _control(info["primary_kind"], info["primary_spec"], work_dir_for(vault, name))
                    if ctl is not None:
                        ctl.stop_writes()
        with ctx.step("Start source machine") as run:
            if run:
                _resume_writes(vault, info, direction)
        with ctx.step("Resume replication") as run:
            if run:
                with vault.store.uow() as s:
                    item = get_item(s, name)
                    item.failover = None
                    item.state = ItemState.PROTECTED.value
                    item.updated_at = time.time()
    except InterruptedError:
        raise
    except Exception:
        with vault.store.uow() as s:
            item = get_item(s, name)
            item.state = ItemState.FAILED_OVER.value
        raise


def request_commit(vault: Any, item_name: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        entered = begin_for(item, Operation.COMMIT)
        refuse_if_busy(s, item)
        steps = ["Release other recovery points", "Complete commit"]
        if item.direction == Direction.REVERSE.value:
            steps.insert(1, "Remove machine at recovery site")
        job = new_job(s, "commit-failover", item_name, steps, item_id=item.id)
        item.state = entered.value
        return {"item": item_name, "job": job.id}


def release_other_points(vault: Any, item_id: int, keep: str | None) -> int:
    """Delete every recovery point of the item but ``keep`` (rows first, then manifests)."""
    with vault.store.uow() as s:
        rows = [p for p in s.scalars(select(PointRow).where(PointRow.item_id == item_id)) if p.id != keep]
        ids = [p.id for p in rows]
        for p in rows:
            s.delete(p)
    for pid in ids:
        vault.datastore.delete_manifest(pid)
    return len(ids)


@handler("commit-failover")
def run_commit(ctx: JobContext) -> None:
    info = _read_item(ctx.vault, ctx)
    vault, name = ctx.vault, info["name"]
    try:
        _commit_steps(ctx, info)
    except InterruptedError:
        raise
    except Exception:
        with vault.store.uow() as s:
            item = get_item(s, name)
            item.state = ItemState.FAILED_OVER.value
        raise


def _commit_steps(ctx: JobContext, info: dict[str, Any]) -> None:
    vault, name = ctx.vault, info["name"]
    with ctx.step("Release other recovery points") as run:
        if run:
            fo = _read_item(vault, ctx)["failover"] or {}
            released = release_other_points(vault, info["id"], fo.get("point_id"))
            ctx.set_result(points_released=released, kept_point=fo.get("point_id"))
    if info["direction"] == Direction.REVERSE:
        with ctx.step("Remove machine at recovery site") as run:
            if run:
                _remove_recovered(vault, _read_item(vault, ctx))
    with ctx.step("Complete commit") as run:
        if run:
            with vault.store.uow() as s:
                item = get_item(s, name)
                item.failover = {**(item.failover or {}), "state": "committed", "committed_at": time.time()}
                item.state = ItemState.FAILOVER_COMMITTED.value
                item.updated_at = time.time()


def _remove_recovered(vault: Any, info: dict[str, Any]) -> None:
    """After a committed failback: the machine at the recovery site is no longer needed (its
    data is at home and in the failback point)."""
    rec = info["recovered"]
    if rec and rec.get("dir"):
        remove_machine(Path(rec["dir"]))
    shutil.rmtree(work_dir_for(vault, info["name"], "reverse"), ignore_errors=True)
    with vault.store.uow() as s:
        item = get_item(s, info["name"])
        networks.release_addresses(s, item.id, "failover")
        item.recovered_machine = None


# ---------------------------------------------------------------------------------------------
# Reprotect


def request_reprotect(vault: Any, item_name: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        entered = begin_for(item, Operation.REPROTECT)
        refuse_if_busy(s, item)
        to_reverse = item.direction == Direction.FORWARD.value
        if to_reverse:
            steps = [
                PREREQ,
                "Stop original machine writes",
                "Replicate recovered machine",
                "Synchronize original disks",
                "Finalize reprotect",
            ]
        else:
            steps = [PREREQ, "Replicate original machine", "Finalize reprotect"]
        job = new_job(
            s,
            "reprotect",
            item_name,
            steps,
            item_id=item.id,
            params={"to": Direction(item.direction).reversed().value},
        )
        item.state = entered.value
        return {"item": item_name, "job": job.id, "direction": Direction(item.direction).reversed().value}


@handler("reprotect")
def run_reprotect(ctx: JobContext) -> None:
    params = ctx.params()
    info = _read_item(ctx.vault, ctx)
    vault, name = ctx.vault, info["name"]
    to = params["to"]
    try:
        if to == Direction.REVERSE:
            _reprotect_to_reverse(ctx, info)
        else:
            _reprotect_to_forward(ctx, info)
        with ctx.step("Finalize reprotect") as run:
            if run:
                with vault.store.uow() as s:
                    item = get_item(s, name)
                    item.direction = to
                    item.policy_id = _policy_for(s, item.policy_id, to)
                    item.failover = None
                    item.state = ItemState.PROTECTED.value
                    item.consecutive_failures = 0
                    item.last_error = None
                    item.updated_at = time.time()
    except InterruptedError:
        raise
    except Exception as err:
        with vault.store.uow() as s:
            item = get_item(s, name)
            item.state = ItemState.FAILOVER_COMMITTED.value
            item.last_error = str(err)
        raise


def _policy_for(session: Any, policy_id: int, direction: str) -> int:
    """Reverse replication uses the policy's "-failback" twin (as ASR); forward, the original."""
    pol = session.get(PolicyRow, policy_id)
    if pol is None:
        return policy_id
    if direction == Direction.REVERSE:
        twin = session.scalar(select(PolicyRow).where(PolicyRow.failback_of_id == pol.id))
        return twin.id if twin is not None else pol.id
    return pol.failback_of_id or pol.id


def _reprotect_to_reverse(ctx: JobContext, info: dict[str, Any]) -> None:
    vault, name = ctx.vault, info["name"]
    kind, spec = info["primary_kind"], info["primary_spec"]
    wd = work_dir_for(vault, name)
    with ctx.step(PREREQ) as run:
        if run:
            if not info["recovered"]:
                raise OperationNotAllowed(f"{name!r} has no machine at the recovery site to protect.")
            ctl = _control(kind, spec, wd)
            if ctl is not None and not ctl.is_reachable():
                raise OperationNotAllowed(
                    f"reprotect uses the original machine's disks as the seed, and its QMP socket "
                    f"{spec.get('qmp')} does not answer: start the machine's process at site "
                    "primary (its writers are stopped by reprotect) and try again."
                )
    with ctx.step("Stop original machine writes") as run:
        if run:
            ctl = _control(kind, spec, wd)
            if ctl is not None:
                ctl.stop_writes()
    with ctx.step("Replicate recovered machine") as run:
        if run:
            r = take_point(vault, name, direction=Direction.REVERSE.value, cancel=ctx.cancel)
            ctx.set_result(
                reverse_point=r.point_id,
                reverse_method=r.method,
                bytes_read_at_recovery_site=r.stats.bytes_read,
                bytes_sent_to_datastore=r.stats.bytes_sent,
            )
            ctx.progress(0.5, f"first reverse point {r.point_id}", force=True)
    with ctx.step("Synchronize original disks") as run:
        if run:
            point_id = _read_item(vault, ctx)["result"]["reverse_point"]
            with vault.store.uow() as s:
                _p, refs = _point_refs(s, get_item(s, name), point_id)
            stats = sync_original_disks(vault, kind, spec, wd, refs, cancel=ctx.cancel)
            size = sum(r.size for r in refs.values())
            ctx.set_result(
                bytes_compared=stats["bytes_compared"],
                bytes_sent=stats["bytes_sent"] + stats["bytes_zeroed"],
                chunks_sent=stats["chunks_sent"],
                disk_bytes=size,
            )
            # The original disks now equal the reverse point; the primary's change tracking
            # must not replay what reprotect wrote as if the machine had written it.
            if kind == "qemu":
                _set_tracking_baseline(kind, spec, wd, info["disks"])


def _reprotect_to_forward(ctx: JobContext, info: dict[str, Any]) -> None:
    vault, name = ctx.vault, info["name"]
    kind, spec = info["primary_kind"], info["primary_spec"]
    with ctx.step(PREREQ) as run:
        if run:
            ctl = _control(kind, spec, work_dir_for(vault, name))
            if ctl is not None and not ctl.is_reachable():
                raise OperationNotAllowed(
                    f"reprotect replicates the original machine of {name!r}, and its QMP socket "
                    f"{spec.get('qmp')} does not answer; start it and try again."
                )
    with ctx.step("Replicate original machine") as run:
        if run:
            # Its disks were made equal to the failback point and tracked since: only what it
            # wrote after the failback travels.
            r = take_point(vault, name, direction=Direction.FORWARD.value, cancel=ctx.cancel)
            with vault.store.uow() as s:
                size = sum(
                    IndexRef.from_json(x).size
                    for x in resolve_point(s, get_item(s, name), r.point_id).disks.values()
                )
            ctx.set_result(
                forward_point=r.point_id,
                method=r.method,
                bytes_compared=0,
                bytes_read=r.stats.bytes_read,
                bytes_sent=r.stats.bytes_sent,
                disk_bytes=size,
            )


# ---------------------------------------------------------------------------------------------
# Complete migration


def request_complete_migration(vault: Any, item_name: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        state = ItemState(item.state)
        begin_for(item, Operation.COMPLETE_MIGRATION)
        refuse_if_busy(s, item)
        if item.direction != Direction.FORWARD.value:
            raise OperationNotAllowed(
                f"{item_name!r} replicates in the reverse direction; complete a migration from the "
                "forward direction (fail back, commit and reprotect first)."
            )
    if state is ItemState.PROTECTED:
        # One job: planned failover, commit, and removal of replication.
        return request_failover(vault, item_name, planned=True, job_kind="complete-migration")
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        job = new_job(
            s,
            "complete-migration",
            item_name,
            ["Remove replication"],
            item_id=item.id,
            params={"previous_state": state.value},
        )
        item.state = ItemState.COMPLETING_MIGRATION.value
        return {"item": item_name, "job": job.id}


@handler("complete-migration")
def run_complete_migration(ctx: JobContext) -> None:
    params = ctx.params()
    info = _read_item(ctx.vault, ctx)
    vault, name = ctx.vault, info["name"]
    if "direction" in params:  # from Protected: fail over first
        with vault.store.uow() as s:
            job = jobs.get_job(s, ctx.job_id)
            if not any(st["name"] == "Remove replication" for st in job.steps):
                job.steps = [*job.steps] + [
                    {"name": n, "state": "NotStarted", "started_at": None, "ended_at": None, "detail": None}
                    for n in ("Release other recovery points", "Complete commit", "Remove replication")
                ]
        _failover_or_roll_back(ctx, params, info)
        _commit_steps(ctx, _read_item(vault, ctx))
    with ctx.step("Remove replication") as run:
        if run:
            info = _read_item(vault, ctx)
            with contextlib.suppress(Exception):  # the primary may be gone for good
                source = source_for(info["primary_kind"], info["primary_spec"], work_dir_for(vault, name))
                try:
                    source.reset_tracking()
                finally:
                    source.close()
            shutil.rmtree(work_dir_for(vault, name), ignore_errors=True)
            shutil.rmtree(work_dir_for(vault, name, "reverse"), ignore_errors=True)
            released = release_other_points(vault, info["id"], None)
            ctx.set_result(points_released=released)
            with vault.store.uow() as s:
                item = get_item(s, name)
                item.state = ItemState.MIGRATED.value
                item.updated_at = time.time()


__all__ = [
    "request_cancel",
    "request_change_point",
    "request_commit",
    "request_complete_migration",
    "request_failback",
    "request_failover",
    "request_reprotect",
    "item_lock",
]
