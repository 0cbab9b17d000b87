"""Test failover (drill) and its cleanup.

A test failover builds "<name>-test" at the recovery site from a chosen recovery point: its disks
are independent copies materialized from the datastore (writing to them never touches
replicated data), it gets a machine spec with its NICs on an isolated test network, and on a
qemu recovery site it is started (a qemu-storage-daemon owns its disks and takes writes).
Replication of the item continues during the drill; the point in use is pinned so retention
cannot remove it. Cleanup stops and deletes everything the test failover made and records the
user's notes.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from siterecovery.adapters.compute.artifacts import write_machine_artifacts
from siterecovery.adapters.db.models import ItemRow
from siterecovery.control import jobs, networks
from siterecovery.control.failover import site_full
from siterecovery.control.jobs import JobContext, handler, new_job
from siterecovery.control.maintenance import datastore_lock
from siterecovery.control.protection import begin_for, get_item, refuse_if_busy, resolve_point
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.materialize import materialize_disk
from siterecovery.domain.states import ItemState, Operation
from siterecovery.errors import StorageFull

START_STEPS = ["Prerequisites check", "Create test machine", "Start test machine"]
CLEANUP_STEPS = ["Stop test machine", "Delete test machine", "Complete cleanup"]


def start_test_failover(vault: Any, item_name: str, point: str = "latest") -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        state = ItemState(item.state)
        entered = begin_for(item, Operation.TEST_FAILOVER)
        refuse_if_busy(s, item)
        p = resolve_point(s, item, point)
        # Size, room, NICs and test addresses are checked (and the addresses taken, the test
        # network made) in this transaction: a refusal leaves everything as it was.
        plan = networks.plan_failover_network(s, item, purpose="test")
        job = new_job(
            s,
            "test-failover",
            item_name,
            START_STEPS,
            item_id=item.id,
            params={
                "point_id": p.id,
                "requested": point,
                "previous_state": state.value,
                "network_plan": plan,
            },
        )
        item.state = entered.value
        # Pin the point now, so that retention cannot remove it before the job reads it.
        item.test_failover = {
            "point_id": p.id,
            "job": job.id,
            "state": "starting",
            "site": plan["site"],
            "size": plan["size"],
            "test_network": plan.get("test_network"),
        }
        return {
            "item": item_name,
            "job": job.id,
            "point_id": p.id,
            "point_time": p.created_at,
            "point_type": p.consistency,
        }


def test_machine_dir(site_path: str, name: str) -> Path:
    return Path(site_path) / "machines" / f"{name}-test"


@handler("test-failover")
def run_test_failover(ctx: JobContext) -> None:
    params = ctx.params()
    with ctx.vault.store.uow() as s:
        job = jobs.get_job(s, ctx.job_id)
        item = s.get(ItemRow, job.item_id)
        assert item is not None
        name = item.name
        site_kind = item.recovery_site.kind
        site_path = item.recovery_site.path
        spec = dict(item.machine.spec)
        point = resolve_point(s, item, params["point_id"])
        refs = {n: IndexRef.from_json(r) for n, r in point.disks.items()}
        point_info = {"id": point.id, "time": point.created_at, "type": point.consistency}
    tdir = test_machine_dir(site_path, name)
    fmt = "qcow2" if site_kind == "qemu" else "raw"
    try:
        with ctx.step("Prerequisites check") as run:
            if run:
                # Images are sparse: they need room for the point's data, not its virtual size.
                need = sum(
                    sum(1 for _ in ctx.vault.datastore.index_reader(r).nonzero_entries()) * r.chunk_size
                    for r in refs.values()
                )
                tdir.parent.mkdir(parents=True, exist_ok=True)
                free = shutil.disk_usage(tdir.parent).free
                if free < need:
                    raise site_full(tdir.parent, f"{free} bytes free, the test machine needs {need}")
                ctx.progress(0.05, f"recovering {point_info['id']} ({point_info['type']})", force=True)

        disk_paths = {n: str(tdir / f"{n}.{fmt}") for n in refs}
        with ctx.step("Create test machine") as run:
            if run:
                tdir.mkdir(parents=True, exist_ok=True)
                with datastore_lock(ctx.vault), ThreadPoolExecutor(max_workers=max(1, len(refs))) as pool:
                    futs = {
                        n: pool.submit(materialize_disk, ctx.vault.datastore, r, Path(disk_paths[n]), fmt)
                        for n, r in refs.items()
                    }
                    try:
                        written = {n: f.result() for n, f in futs.items()}
                    except StorageFull as err:
                        # Sparse images need room for data only, but writing qcow2 needs more
                        # for a while than the check above could know.
                        raise site_full(
                            err.fields.get("where", tdir), err.fields.get("detail", str(err))
                        ) from err
                plan = params["network_plan"]
                machine = {
                    "name": f"{name}-test",
                    "source_machine": spec["name"],
                    "role": "test",
                    "recovery_point": point_info,
                    "size": plan["size"],
                    "cpus": plan["size"]["cpus"],
                    "memory_mib": plan["size"]["memory_mib"],
                    "os": spec["os"],
                    "disks": [
                        {"name": n, "path": disk_paths[n], "format": fmt, "size": refs[n].size} for n in refs
                    ],
                    # A drill never joins production networks: its NICs are on the test network.
                    "nics": plan["nics"],
                    "nics_not_created": plan["nics_not_created"],
                }
                write_machine_artifacts(tdir, machine)
                ctx.set_result(bytes_written=sum(written.values()))
                ctx.progress(0.8, "test machine created", force=True)

        with ctx.step("Start test machine") as run:
            if run:
                run_dir = None
                if site_kind == "qemu":
                    from siterecovery.adapters.sources.qemu_daemon import MachineDaemon

                    # A step interrupted after the start finds its machine running: reuse it.
                    daemon = _running_daemon(tdir / "run") or MachineDaemon.start(
                        tdir / "run", {n: Path(p) for n, p in disk_paths.items()}
                    )
                    run_dir = str(tdir / "run")
                    ctx.set_result(pid=daemon.pid, nbd_socket=daemon.nbd_socket)
                plan = params["network_plan"]
                with ctx.vault.store.uow() as s:
                    item = get_item(s, name)
                    item.state = ItemState.TEST_FAILOVER.value
                    item.test_failover = {
                        "site": plan["site"],
                        "size": plan["size"],
                        "test_network": plan.get("test_network"),
                        "nics": plan["nics"],
                        "nics_not_created": plan["nics_not_created"],
                        "point_id": point_info["id"],
                        "point_time": point_info["time"],
                        "point_type": point_info["type"],
                        "machine": f"{name}-test",
                        "dir": str(tdir),
                        "disks": disk_paths,
                        "run_dir": run_dir,
                        "job": ctx.job_id,
                        "started_at": time.time(),
                        "state": "running",
                    }
    except Exception:
        # Undo: nothing of a failed drill is left behind and the item is as before.
        _remove_test_machine(tdir)
        with ctx.vault.store.uow() as s:
            item = get_item(s, name)
            _release_test_network(s, item, params.get("network_plan") or {})
            item.state = params.get("previous_state", ItemState.PROTECTED.value)
            item.test_failover = None
        raise


def _release_test_network(session: Any, item: ItemRow, plan: dict[str, Any]) -> None:
    """Give back the drill's addresses and remove the test network made for it (if any)."""
    networks.release_addresses(session, item.id, "test")
    if plan.get("test_network"):  # made for this drill only (a mapped test network stays)
        networks.remove_test_network(session, plan["test_network"])


def _running_daemon(run_dir: Path) -> Any:
    from siterecovery.adapters.sources.qemu_daemon import MachineDaemon

    if not (run_dir / "daemon.json").exists():
        return None
    try:
        daemon = MachineDaemon.attach(run_dir)
    except Exception:  # a stale record of a daemon that is gone: start a new one
        return None
    return daemon if daemon.is_running() else None


def _remove_test_machine(tdir: Path) -> None:
    run_dir = tdir / "run"
    if (run_dir / "daemon.json").exists():
        from siterecovery.adapters.sources.qemu_daemon import MachineDaemon

        # Already gone: nothing to stop.
        with contextlib.suppress(Exception):
            MachineDaemon.attach(run_dir).stop()
    shutil.rmtree(tdir, ignore_errors=True)


def cleanup_test_failover(vault: Any, item_name: str, notes: str = "") -> dict[str, Any]:
    with vault.store.uow() as s:
        item = get_item(s, item_name)
        entered = begin_for(item, Operation.TEST_FAILOVER_CLEANUP)
        refuse_if_busy(s, item)
        job = new_job(
            s,
            "test-failover-cleanup",
            item_name,
            CLEANUP_STEPS,
            item_id=item.id,
            params={"notes": notes, "test_failover": item.test_failover},
        )
        item.state = entered.value
        return {"item": item_name, "job": job.id}


@handler("test-failover-cleanup")
def run_cleanup(ctx: JobContext) -> None:
    params = ctx.params()
    tf = params.get("test_failover") or {}
    with ctx.vault.store.uow() as s:
        job = jobs.get_job(s, ctx.job_id)
        item = s.get(ItemRow, job.item_id)
        assert item is not None
        name = item.name
    tdir = Path(tf["dir"]) if tf.get("dir") else None
    with ctx.step("Stop test machine") as run:
        if run and tf.get("run_dir") and Path(tf["run_dir"], "daemon.json").exists():
            from siterecovery.adapters.sources.qemu_daemon import MachineDaemon

            MachineDaemon.attach(Path(tf["run_dir"])).stop()
    with ctx.step("Delete test machine") as run:
        if run and tdir is not None:
            _remove_test_machine(tdir)
    with ctx.step("Complete cleanup") as run:
        if run:
            with ctx.vault.store.uow() as s:
                item = get_item(s, name)
                _release_test_network(s, item, tf)
                item.state = ItemState.PROTECTED.value
                item.test_failover = None
            ctx.set_result(
                notes=params.get("notes", ""), test_machine=tf.get("machine"), point_id=tf.get("point_id")
            )
