"""Protecting machines: enable replication, item status, recovery points, disable replication."""

from __future__ import annotations

import shutil
import time
from typing import Any

from sqlalchemy import select

from siterecovery.adapters.db.models import ItemRow, JobRow, MachineRow, PointRow, SiteRow
from siterecovery.bootstrap import source_for
from siterecovery.control import jobs, networks
from siterecovery.control.jobs import JobContext, handler, new_job
from siterecovery.control.policies import get_policy
from siterecovery.control.replication import (
    item_lock,
    record_failure,
    release_stale_snapshots,
    take_point,
    work_dir_for,
)
from siterecovery.control.sites import get_site
from siterecovery.domain.health import HealthInput, assess, current_rpo_s
from siterecovery.domain.states import ItemState, Operation, allowed_operations, begin
from siterecovery.errors import AlreadyExists, InvalidInput, NotFound, OperationNotAllowed

ENABLE_STEPS = ["Enable protection", "Initial replication", "Finalize protection"]
DISABLE_STEPS = ["Stop replication", "Remove change tracking", "Remove recovery points", "Remove item"]


def get_item(session: Any, name: str) -> ItemRow:
    row = session.scalar(select(ItemRow).where(ItemRow.name == name))
    if row is None:
        names = ", ".join(session.scalars(select(ItemRow.name).order_by(ItemRow.name))) or "none yet"
        raise NotFound(kind="protected item", name=name, hint=f" Protected items: {names}.")
    return row


def begin_for(item: ItemRow, op: Operation) -> ItemState:
    """Start ``op`` on ``item`` (see ``domain.states.begin``); refusals list exactly the
    operations the item allows, cancel-failover included when its failover was planned."""
    planned = bool((item.failover or {}).get("planned"))
    return begin(item.state, op, item=item.name, planned_failover=planned)


def find_machine(session: Any, name: str, site: str | None) -> MachineRow:
    q = select(MachineRow).join(SiteRow).where(MachineRow.name == name, SiteRow.role == "primary")
    if site:
        q = q.where(SiteRow.name == site)
    rows = list(session.scalars(q))
    if not rows:
        known_q = select(MachineRow.name).join(SiteRow).where(SiteRow.role == "primary", MachineRow.present)
        if site:
            known_q = known_q.where(SiteRow.name == site)
        known = ", ".join(session.scalars(known_q.distinct().order_by(MachineRow.name))) or "none yet"
        raise NotFound(
            kind="machine",
            name=name,
            hint=f" Known machines: {known}. If it was added to an inventory since, run "
            "'siterecovery site discover SITE'.",
        )
    if len(rows) > 1:
        raise InvalidInput(
            f"machine {name!r} exists in several sites ({', '.join(r.site.name for r in rows)}); "
            "name the site with --source-site."
        )
    if not rows[0].present:
        raise InvalidInput(f"machine {name!r} is no longer in the inventory of site {rows[0].site.name!r}.")
    return rows[0]


def enable_replication(
    vault: Any,
    machine: str,
    *,
    policy: str,
    recovery_site: str,
    source_site: str | None = None,
    exclude_disks: list[str] | None = None,
) -> dict[str, Any]:
    """Create the protected item and queue its enable job (run by the worker)."""
    exclude = list(dict.fromkeys(exclude_disks or []))
    with vault.store.uow() as s:
        m = find_machine(s, machine, source_site)
        if s.scalar(select(ItemRow).where(ItemRow.machine_id == m.id)) is not None:
            raise AlreadyExists(
                kind="protected item",
                name=machine,
                hint=" It is already protected; see 'siterecovery status'.",
            )
        if s.scalar(select(ItemRow).where(ItemRow.name == machine)) is not None:
            raise AlreadyExists(kind="protected item", name=machine)
        pol = get_policy(s, policy)
        target = get_site(s, recovery_site)
        if target.role != "recovery":
            raise InvalidInput(
                f"site {recovery_site!r} is a {target.role} site; replicate to a recovery site."
            )
        names = [d["name"] for d in m.spec["disks"]]
        unknown = [d for d in exclude if d not in names]
        if unknown:
            raise InvalidInput(
                f"cannot exclude {', '.join(unknown)}: machine {machine!r} has disks {', '.join(names)}."
            )
        disks = [n for n in names if n not in exclude]
        if not disks:
            raise InvalidInput("every disk would be excluded; at least one disk must be replicated.")
        now = time.time()
        item = ItemRow(
            name=machine,
            machine_id=m.id,
            policy_id=pol.id,
            source_site_id=m.site_id,
            recovery_site_id=target.id,
            state=ItemState.ENABLING.value,
            direction="forward",
            disks=disks,
            excluded_disks=exclude,
            initial_total_bytes=0,
            initial_done_bytes=0,
            consecutive_failures=0,
            last_freeze_failed=False,
            tracking_lost=False,
            created_at=now,
            updated_at=now,
        )
        s.add(item)
        s.flush()
        networks.ensure_item_networks(s, item)
        job = new_job(s, "enable-replication", machine, ENABLE_STEPS, item_id=item.id)
        return {"item": machine, "job": job.id, "disks": disks, "excluded_disks": exclude}


def _set_state(vault: Any, item_name: str, state: ItemState, **changes: Any) -> None:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        item.state = state.value
        for k, v in changes.items():
            setattr(item, k, v)
        item.updated_at = time.time()


@handler("enable-replication")
def run_enable(ctx: JobContext) -> None:
    with ctx.vault.store.uow() as s:
        job = jobs.get_job(s, ctx.job_id)
        item = s.get(ItemRow, job.item_id)
        if item is None:
            raise NotFound(kind="protected item", name=job.target)
        name, kind, spec = item.name, item.source_site.kind, dict(item.machine.spec)
        disks = list(item.disks)

    with ctx.step("Enable protection") as run:
        if run:
            try:
                _enable_protection(ctx, name, kind, spec, disks)
            except InterruptedError:
                raise
            except Exception as err:  # counted for health; the worker retries the job later
                record_failure(ctx.vault, name, err)
                raise

    with ctx.step("Initial replication") as run:
        if run:

            def progress(done: int, total: int) -> None:
                _set_progress(ctx, name, done, total)

            try:
                result = take_point(ctx.vault, name, initial=True, progress=progress, cancel=ctx.cancel)
            except InterruptedError:
                raise
            except Exception as err:
                record_failure(ctx.vault, name, err)
                raise
            ctx.set_result(
                initial_point=result.point_id,
                bytes_read=result.stats.bytes_read,
                bytes_sent=result.stats.bytes_sent,
                bytes_stored=result.stats.bytes_stored,
            )

    with ctx.step("Finalize protection") as run:
        if run:
            _set_state(ctx.vault, name, ItemState.PROTECTED)
            ctx.progress(1.0, "protected", force=True)


def _enable_protection(ctx: JobContext, name: str, kind: str, spec: dict[str, Any], disks: list[str]) -> None:
    """Reach the machine and check its disks before anything is replicated."""
    source = source_for(kind, spec, work_dir_for(ctx.vault, name))
    try:
        release_stale_snapshots(source, name)
        with source.snapshot(disks) as snap:
            total = sum(snap.disks[d].size for d in disks)
            snap.abort()
    finally:
        source.close()
    _set_state(ctx.vault, name, ItemState.INITIAL_REPLICATION, initial_total_bytes=total)
    ctx.progress(0.05, "protection enabled", force=True)


_last_item_progress: dict[str, float] = {}


def _set_progress(ctx: JobContext, name: str, done: int, total: int) -> None:
    now = time.monotonic()
    if done < total and now - _last_item_progress.get(name, 0.0) < 0.5:
        return
    _last_item_progress[name] = now
    with ctx.vault.store.uow() as s:
        item = get_item(s, name)
        item.initial_done_bytes = done
        item.initial_total_bytes = total
    frac = done / total if total else 1.0
    ctx.progress(0.05 + 0.9 * frac, f"initial replication {frac:.0%}", force=True)


# ---------------------------------------------------------------------------------------------
# Status and recovery points


def item_status(item: ItemRow, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    pol = item.policy
    state = ItemState(item.state)
    initial = None
    if state in (ItemState.ENABLING, ItemState.INITIAL_REPLICATION):
        initial = item.initial_done_bytes / item.initial_total_bytes if item.initial_total_bytes else 0.0
    h_in = HealthInput(
        state=state,
        now=now,
        rpo_threshold_s=pol.rpo_threshold_s,
        crash_interval_s=pol.crash_interval_s,
        app_interval_s=pol.app_interval_s,
        last_point_at=item.last_point_at,
        last_app_point_at=item.last_app_point_at,
        initial_progress=initial,
        consecutive_failures=item.consecutive_failures,
        last_error=item.last_error,
        last_freeze_failed=item.last_freeze_failed,
        tracking_lost=item.tracking_lost,
    )
    health = assess(h_in)
    rpo = current_rpo_s(h_in)
    tf = item.test_failover
    return {
        "name": item.name,
        "machine": item.machine.name,
        "state": item.state,
        "direction": item.direction,
        "source_site": item.source_site.name,
        "recovery_site": item.recovery_site.name,
        "policy": pol.name,
        "disks": list(item.disks),
        "excluded_disks": list(item.excluded_disks),
        "health": health.level,
        "health_reasons": list(health.reasons),
        "rpo_seconds": None if rpo is None else round(rpo, 3),
        "rpo_threshold_seconds": pol.rpo_threshold_s,
        "last_point_at": item.last_point_at,
        "last_app_consistent_point_at": item.last_app_point_at,
        "initial_replication_progress": None if initial is None else round(initial, 4),
        "initial_replication_bytes": {"done": item.initial_done_bytes, "total": item.initial_total_bytes},
        "app_consistency": (
            "off (policy)"
            if not pol.app_interval_s
            else "on"
            if (item.machine.spec.get("hooks") or {}).get("freeze")
            else "unavailable: the machine has no freeze hook in its inventory"
        ),
        "test_failover": tf,
        "failover": item.failover,
        "recovered_machine": _recovered_summary(item.recovered_machine),
        "allowed_operations": [
            op.value
            for op in allowed_operations(state, planned_failover=bool((item.failover or {}).get("planned")))
        ],
        "last_error": item.last_error,
    }


NIC_FIELDS = ("name", "network", "subnet", "ip", "primary")


def _recovered_summary(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """What runs at the recovery site after a failover, and what of the machine was not created."""
    if not rec:
        return None
    return {
        "name": rec.get("name"),
        "site": rec.get("site"),
        "dir": rec.get("dir"),
        "size": rec.get("size"),
        "nics": [{k: n.get(k) for k in NIC_FIELDS} for n in rec.get("nics") or []],
        "nics_not_created": rec.get("nics_not_created") or [],
        "disks": [{"name": d["name"], "path": d.get("path")} for d in rec.get("disks") or []],
        "nbd_socket": rec.get("nbd"),
        "qmp_socket": rec.get("qmp"),
    }


WORKER_DOWN = (
    "replication is stopped: the vault's worker is not running; start it with 'siterecovery worker start'"
)


def status(
    vault: Any, name: str | None = None, *, worker_running: bool | None = None
) -> list[dict[str, Any]]:
    """Status of one item or all; ``worker_running`` None means: look whether the worker runs
    (a caller that runs jobs and cycles itself, in-process, passes True)."""
    from siterecovery.control.worker import REPLICATING, worker_pid

    with vault.store.uow() as s:
        rows = [get_item(s, name)] if name else list(s.scalars(select(ItemRow).order_by(ItemRow.name)))
        out = [item_status(i) for i in rows]
    if worker_running is None:
        worker_running = worker_pid(vault) is not None
    if out and not worker_running:
        # Nothing replicates without the worker; say so rather than let the RPO grow unexplained.
        for st in out:
            if st["state"] in {x.value for x in REPLICATING} or st["state"] == ItemState.INITIAL_REPLICATION:
                st["health_reasons"].insert(0, WORKER_DOWN)
                if st["health"] == "Normal":
                    st["health"] = "Warning"
    return out


def point_dict(p: PointRow) -> dict[str, Any]:
    return {
        "id": p.id,
        "time": p.created_at,
        "type": p.consistency,
        "method": p.method,
        "logical_bytes": p.logical_bytes,
        "read_bytes": p.read_bytes,
        "sent_bytes": p.sent_bytes,
        "stored_bytes": p.stored_bytes,
        "changed_chunks": p.changed_chunks,
        "duration_s": round(p.duration_s, 3),
    }


def list_points(vault: Any, item_name: str) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        rows = s.scalars(
            select(PointRow).where(PointRow.item_id == item.id).order_by(PointRow.created_at.desc())
        )
        return [point_dict(p) for p in rows]


def resolve_point(session: Any, item: ItemRow, which: str) -> PointRow:
    """'latest', 'latest-app' (latest app-consistent) or a point id."""
    q = select(PointRow).where(PointRow.item_id == item.id)
    if which == "latest":
        row = session.scalar(q.order_by(PointRow.created_at.desc()).limit(1))
        what = "no recovery point yet; wait for the initial replication to finish"
    elif which in ("latest-app", "latest-app-consistent"):
        row = session.scalar(
            q.where(PointRow.consistency == "app-consistent").order_by(PointRow.created_at.desc()).limit(1)
        )
        what = "no app-consistent recovery point; use 'latest' or configure freeze/thaw hooks"
    else:
        row = session.scalar(q.where(PointRow.id == which))
        what = (
            f"recovery point {which!r} does not exist (retention may have removed it); "
            f"see 'siterecovery point list {item.name}'"
        )
    if row is None:
        raise NotFound(f"{item.name}: {what}.")
    return row


def refuse_if_busy(session: Any, item: ItemRow, ignore_kinds: tuple[str, ...] = ()) -> None:
    """Refuse a new operation while another job of the item is queued or running."""
    running = session.scalar(
        select(JobRow).where(
            JobRow.item_id == item.id,
            JobRow.state.in_((jobs.QUEUED, jobs.RUNNING)),
            JobRow.kind.not_in(ignore_kinds),
        )
    )
    if running is not None:
        raise OperationNotAllowed(
            f"{item.name!r} has job {running.id} ({running.kind}) running; wait for it to end "
            f"('siterecovery job show {running.id}'), then try again."
        )


# ---------------------------------------------------------------------------------------------
# Disable replication


def disable_replication(vault: Any, item_name: str, *, keep_points: bool = False) -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        begin_for(item, Operation.DISABLE)
        # Disabling cancels a running initial replication; any other job must end first.
        refuse_if_busy(s, item, ignore_kinds=("enable-replication",))
        if item.test_failover:
            raise OperationNotAllowed(
                operation="disable",
                item=item_name,
                state=item.state,
                allowed="test-failover-cleanup (clean up the test failover first)",
            )
        job = new_job(
            s,
            "disable-replication",
            item_name,
            DISABLE_STEPS,
            item_id=item.id,
            params={"keep_points": keep_points, "previous_state": item.state},
        )
        item.state = ItemState.DISABLING.value
        return {"item": item_name, "job": job.id}


@handler("disable-replication")
def run_disable(ctx: JobContext) -> None:
    params = ctx.params()
    with ctx.vault.store.uow() as s:
        job = jobs.get_job(s, ctx.job_id)
        item = s.get(ItemRow, job.item_id)
        if item is None:
            return  # already removed by an earlier run of this job
        name, item_id, kind, spec = item.name, item.id, item.source_site.kind, dict(item.machine.spec)
        rec = item.recovered_machine
        recovered = dict(rec) if rec and rec.get("qmp") else None
        # Cancel an initial replication still queued or running for this item.
        for other in s.scalars(
            select(JobRow).where(
                JobRow.item_id == item_id,
                JobRow.state.in_((jobs.QUEUED, jobs.RUNNING)),
                JobRow.id != ctx.job_id,
            )
        ):
            other.state, other.ended_at, other.error = jobs.CANCELLED, time.time(), "replication disabled"
    with ctx.step("Stop replication") as run, item_lock(item_id):
        if run:
            pass  # holding the item lock waits for a running cycle; the Disabling state stops new ones
    with ctx.step("Remove change tracking") as run:
        if run:
            # The machine at the recovery site (after a failover) keeps running: disabling
            # replication stops protecting it, it does not take production down.
            sources = [(kind, spec, work_dir_for(ctx.vault, name))]
            if recovered:
                sources.append((recovered["kind"], recovered, work_dir_for(ctx.vault, name, "reverse")))
            for src_kind, src_spec, wd in sources:
                try:
                    source = source_for(src_kind, src_spec, wd)
                    try:
                        source.reset_tracking()
                    finally:
                        source.close()
                except Exception as err:  # the machine may be gone; nothing to clean there then
                    ctx.set_result(tracking_cleanup=f"skipped: {err}")
                shutil.rmtree(wd, ignore_errors=True)
    with ctx.step("Remove recovery points") as run:
        if run:
            with ctx.vault.store.uow() as s:
                ids = list(s.scalars(select(PointRow.id).where(PointRow.item_id == item_id)))
            if not params.get("keep_points"):
                for pid in ids:
                    ctx.vault.datastore.delete_manifest(pid)
            with ctx.vault.store.uow() as s:
                for p in s.scalars(select(PointRow).where(PointRow.item_id == item_id)):
                    s.delete(p)
            ctx.set_result(points=len(ids), points_kept_in_datastore=bool(params.get("keep_points")))
    with ctx.step("Remove item") as run:
        if run:
            with ctx.vault.store.uow() as s:
                networks.release_addresses(s, item_id, None)
                for j in s.scalars(select(JobRow).where(JobRow.item_id == item_id)):
                    j.item_id = None
                item = s.get(ItemRow, item_id)
                if item is not None:
                    s.delete(item)


# ---------------------------------------------------------------------------------------------
# Resynchronize


def request_resync(vault: Any, item_name: str) -> dict[str, Any]:
    """Queue a resynchronization: read every disk and send the chunks whose hashes differ from
    the latest point (for when the replica is in doubt or change tracking cannot be trusted)."""
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        entered = begin_for(item, Operation.RESYNC)
        refuse_if_busy(s, item)
        job = new_job(s, "resync", item_name, ["Resynchronize", "Resume replication"], item_id=item.id)
        item.state = entered.value
        return {"item": item_name, "job": job.id}


@handler("resync")
def run_resync(ctx: JobContext) -> None:
    with ctx.vault.store.uow() as s:
        item = s.get(ItemRow, jobs.get_job(s, ctx.job_id).item_id)
        assert item is not None
        name = item.name
    try:
        with ctx.step("Resynchronize") as run:
            if run:
                r = take_point(ctx.vault, name, resync=True, cancel=ctx.cancel)
                ctx.set_result(
                    point_id=r.point_id,
                    method=r.method,
                    bytes_read=r.stats.bytes_read,
                    bytes_sent=r.stats.bytes_sent,
                )
    except InterruptedError:
        raise
    except Exception:
        _set_state(ctx.vault, name, ItemState.PROTECTED)
        raise
    with ctx.step("Resume replication") as run:
        if run:
            _set_state(ctx.vault, name, ItemState.PROTECTED)
