"""Making recovery points: one replication cycle of a protected item.

A cycle: (freeze hook if an app-consistent point is due) -> snapshot of all replicated disks ->
(thaw) -> the agent sends what changed -> manifest -> recovery point row -> commit the snapshot
(change tracking moves on) -> retention thinning. The order makes every crash safe: a manifest
is written only after its chunks are durable; the snapshot is committed only after the point is
recorded, so a crash before that leaves the change set tracked for the next cycle.

Consistency labels are never better than the truth:

* a point-in-time snapshot (QEMU fleecing) is ``crash-consistent``, or ``app-consistent`` when
  the freeze hook succeeded before the capture;
* a live read (raw files) is ``fuzzy`` unless the freeze hook held the writers quiesced for the
  whole read, in which case it is ``app-consistent``.

Hooks run with ``/bin/sh -c`` and a timeout (``hooks.timeout_s``). A freeze hook that fails or
times out is followed by the thaw hook at once (it may have frozen part of the application),
and the point gets the label the snapshot alone earns, with a warning on the item.

The initial replication is the first cycle; it checkpoints its progress to the item so that a
killed worker resumes where it was instead of starting from zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from siterecovery.adapters.db.models import ItemRow, PointRow
from siterecovery.bootstrap import agent_for, source_for
from siterecovery.control.maintenance import datastore_lock
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.manifest import Manifest
from siterecovery.dataplane.replicate import DiskStats
from siterecovery.domain.retention import PointStamp, points_to_keep
from siterecovery.errors import NotFound, OperationNotAllowed

log = logging.getLogger(__name__)

APP, CRASH, FUZZY = "app-consistent", "crash-consistent", "fuzzy"

# One lock per item: a cycle, the initial replication and state changes never overlap.
_item_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def item_lock(item_id: int) -> threading.Lock:
    with _locks_guard:
        return _item_locks.setdefault(item_id, threading.Lock())


def new_point_id(t: float) -> str:
    return f"rp-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t))}-{secrets.token_hex(3)}"


def run_hook(command: str | None, timeout: float, what: str) -> str | None:
    """Run a freeze/thaw hook with ``/bin/sh -c`` (the inventory's contract); return None on
    success, else why it failed.

    The hook runs in its own process group and the whole group is killed at the timeout: killing
    only the shell would leave its children (a ``sleep``, a database client) running on, still
    acting on the application after the cycle gave up on them.
    """
    if not command:
        return f"no {what} hook is configured"
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as err:
        return f"{what} hook {command!r} could not run: {err}"
    try:
        out, err_text = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # A child that left the group still holds the pipes: stop waiting for it.
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.wait()
        return f"{what} hook {command!r} did not finish within {timeout:g}s and was killed"
    if proc.returncode != 0:
        tail = (err_text or out).strip().splitlines()[-1:] or [""]
        return f"{what} hook {command!r} exited with status {proc.returncode}: {tail[0]}"
    return None


@dataclass
class CycleResult:
    point_id: str
    consistency: str
    method: str
    created_at: float
    stats: DiskStats
    duration_s: float
    warning: str | None = None


ProgressFn = Callable[[int, int], None]


def latest_point(session: Any, item_id: int) -> PointRow | None:
    return session.scalar(
        select(PointRow).where(PointRow.item_id == item_id).order_by(PointRow.created_at.desc()).limit(1)
    )


def take_point(
    vault: Any,
    item_name: str,
    *,
    app: bool = False,
    initial: bool = False,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    direction: str | None = None,
    resync: bool = False,
) -> CycleResult:
    """Run one replication cycle for the item and record the recovery point it made.

    ``resync`` compares every chunk's hash with the previous point instead of trusting change
    tracking (sends only what differs). ``direction`` (default: the item's) says which machine
    is read: ``forward`` the machine at
    the primary site, ``reverse`` the machine running at the recovery site after a failover (a
    reprotect takes its first reverse point before the item's direction changes).
    """
    t0 = time.monotonic()
    with vault.store.uow() as s:
        item = s.scalar(select(ItemRow).where(ItemRow.name == item_name))
        if item is None:
            raise NotFound(kind="protected item", name=item_name)
        item_id = item.id
        direction = direction or item.direction
        kind, spec, work_dir = replication_source(vault, item, direction)
        disks = list(item.disks)
        prev = latest_point(s, item.id)
        base_refs = {n: IndexRef.from_json(r) for n, r in prev.disks.items()} if prev else {}
        checkpoint = dict(item.checkpoint or {}) if initial else {}
        policy_retention = item.policy.retention_s
        machine_name = item.machine.name

    with item_lock(item_id), datastore_lock(vault):
        return _cycle(
            vault,
            item_name,
            item_id,
            spec,
            kind,
            disks,
            base_refs,
            checkpoint,
            app,
            initial,
            progress,
            cancel,
            policy_retention,
            machine_name,
            t0,
            direction,
            work_dir,
            resync,
        )


def _cycle(
    vault: Any,
    item_name: str,
    item_id: int,
    spec: dict[str, Any],
    kind: str,
    disks: list[str],
    base_refs: dict[str, IndexRef],
    checkpoint: dict[str, Any],
    app: bool,
    initial: bool,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
    retention_s: float,
    machine_name: str,
    t0: float,
    direction: str,
    work_dir: Path,
    resync: bool = False,
) -> CycleResult:
    hooks = spec.get("hooks") or {}
    timeout = float(hooks.get("timeout_s") or 60)
    warning: str | None = None
    frozen = False
    # Without a freeze hook the machine has no way to quiesce its applications: app-consistent
    # points are not possible for it (status says so), and that is not a failure to warn about.
    app = app and bool(hooks.get("freeze"))
    if app:
        failure = run_hook(hooks.get("freeze"), timeout, "freeze")
        if failure is None:
            frozen = True
        else:
            warning = f"app-consistent point fell back to crash-consistent: {failure}"
            if hooks.get("freeze") and hooks.get("thaw"):
                # A freeze hook that failed or timed out may have frozen part of the application.
                thaw_failure = run_hook(hooks.get("thaw"), timeout, "thaw")
                if thaw_failure:
                    warning += f"; {thaw_failure}"

    source = source_for(kind, spec, work_dir)
    agent, datastore = agent_for(vault)
    total_stats = DiskStats()
    try:
        release_stale_snapshots(source, item_name)
        try:
            snap = source.snapshot(disks)
        finally:
            if frozen and not _snapshot_needs_freeze_held(kind):
                thaw = run_hook(hooks.get("thaw"), timeout, "thaw")
                if thaw:
                    warning = thaw
        with snap:
            created_at = snap.captured_at
            tracking_lost = snap.tracking.startswith("lost")
            if tracking_lost:
                _mark_item(vault, item_id, tracking_lost=True)
            refs: dict[str, IndexRef] = {}
            modes: set[str] = set()
            ckpt_disks: dict[str, Any] = dict(checkpoint.get("disks", {}))
            sizes = {n: snap.disks[n].size for n in disks}
            total_bytes = sum(sizes.values())
            done_before = 0

            for name in disks:
                view = snap.disks[name]
                changed = None if resync else view.changed_extents()
                base = base_refs.get(name)
                resume_offset: int | None = None
                if initial and name in ckpt_disks:
                    base = IndexRef.from_json(ckpt_disks[name]["ref"])
                    resume_offset = int(ckpt_disks[name]["offset"])
                if base is not None and base.size != view.size and changed is not None:
                    changed = None  # the disk was resized: compare everything

                def disk_progress(done: int, total: int, _off: int = done_before, _n: str = name) -> None:
                    if progress is not None:
                        progress(
                            _off + int(done * sizes[_n] / total) if total else _off + sizes[_n], total_bytes
                        )

                def save_ckpt(ref: IndexRef, offset: int, _n: str = name) -> None:
                    ckpt_disks[_n] = {"ref": ref.to_json(), "offset": offset}
                    _mark_item(vault, item_id, checkpoint={"disks": dict(ckpt_disks)})

                result = agent.replicate_disk(
                    datastore,
                    view,
                    base,
                    changed=changed,
                    resume_offset=resume_offset,
                    progress=disk_progress,
                    checkpoint=save_ckpt if initial else None,
                    cancel=cancel,
                )
                refs[name] = result.ref
                modes.add(result.mode)
                total_stats.add(result.stats)
                done_before += sizes[name]
                if initial:
                    save_ckpt(result.ref, view.size)

            if frozen and _snapshot_needs_freeze_held(kind):
                thaw = run_hook(hooks.get("thaw"), timeout, "thaw")
                if thaw:
                    warning = thaw
            if frozen:
                consistency = APP
            elif snap.point_in_time:
                consistency = CRASH
            else:
                consistency = FUZZY
            method = _method(modes, snap.tracking, kind)
            point_id = new_point_id(created_at)
            logical = sum(r.size for r in refs.values())
            duration = time.monotonic() - t0
            manifest = Manifest(
                format=1,
                point_id=point_id,
                item=item_name,
                machine=machine_name,
                created_at=created_at,
                consistency=consistency,
                method=method,
                disks=refs,
                stats={**total_stats.as_dict(), "logical_bytes": logical},
            )
            datastore.write_manifest(manifest)
            with vault.store.uow() as s:
                s.add(
                    PointRow(
                        id=point_id,
                        item_id=item_id,
                        created_at=created_at,
                        consistency=consistency,
                        method=method,
                        logical_bytes=logical,
                        read_bytes=total_stats.bytes_read,
                        sent_bytes=total_stats.bytes_sent,
                        stored_bytes=total_stats.bytes_stored,
                        changed_chunks=total_stats.chunks_changed,
                        duration_s=duration,
                        disks={n: r.to_json() for n, r in refs.items()},
                        direction=direction,
                    )
                )
                item = s.get(ItemRow, item_id)
                assert item is not None
                item.last_point_at = created_at
                if consistency == APP:
                    item.last_app_point_at = created_at
                if app:
                    item.last_freeze_failed = not frozen
                item.tracking_lost = False
                item.checkpoint = None
                item.consecutive_failures = 0
                item.last_error = None
                item.last_attempt_at = time.time()
                item.updated_at = time.time()
            snap.commit()
    except BaseException:
        if frozen and _snapshot_needs_freeze_held(kind):
            run_hook(hooks.get("thaw"), timeout, "thaw")
        raise
    finally:
        source.close()
    apply_retention(vault, item_id, retention_s)
    return CycleResult(point_id, consistency, method, created_at, total_stats, duration, warning)


def _snapshot_needs_freeze_held(kind: str) -> bool:
    # A live read (raw files) is consistent only while the writers stay frozen for the whole read.
    return kind == "raw"


def _method(modes: set[str], tracking: str, kind: str) -> str:
    if "initial" in modes:
        return "initial"
    if "hash-resync" in modes:
        return "hash-scan" if tracking == "none" else "hash-resync"
    return "dirty-bitmap"


def _mark_item(vault: Any, item_id: int, **changes: Any) -> None:
    with vault.store.uow() as s:
        item = s.get(ItemRow, item_id)
        if item is not None:
            for k, v in changes.items():
                setattr(item, k, v)
            item.updated_at = time.time()


def record_failure(vault: Any, item_name: str, err: BaseException) -> None:
    with vault.store.uow() as s:
        item = s.scalar(select(ItemRow).where(ItemRow.name == item_name))
        if item is not None:
            item.consecutive_failures += 1
            item.last_error = str(err) or type(err).__name__
            item.last_attempt_at = time.time()


def apply_retention(vault: Any, item_id: int, retention_s: float) -> list[str]:
    """Thin the item's points as the policy says; the removed points' chunks go at the next GC."""
    with vault.store.uow() as s:
        rows = list(s.scalars(select(PointRow).where(PointRow.item_id == item_id)))
        keep = points_to_keep(
            [PointStamp(r.id, r.created_at, r.consistency == APP) for r in rows], retention_s
        )
        item = s.get(ItemRow, item_id)
        pinned = set()
        if item is not None and item.test_failover:
            pinned.add(item.test_failover.get("point_id"))
        if item is not None and item.failover and item.failover.get("point_id"):
            # The point the machine at the target site was built from: a reprotect starts from it.
            pinned.add(item.failover["point_id"])
        doomed = [r for r in rows if r.id not in keep and r.id not in pinned]
        for r in doomed:
            s.delete(r)
    # Manifests go after the rows: a crash in between leaves an orphan manifest (kept, harmless),
    # never a row whose manifest is gone.
    for r in doomed:
        vault.datastore.delete_manifest(r.id)
    return [r.id for r in doomed]


def release_stale_snapshots(source: Any, item_name: str) -> None:
    """Release snapshot state a dead replicator left in the machine (sources that keep any).

    Only the vault's worker snapshots a machine, one snapshot per item at a time, so whatever
    snapshot state is found before a new snapshot belongs to a replicator that died.
    """
    cleanup_stale = getattr(source, "cleanup_stale", None)
    if cleanup_stale is not None:
        removed = cleanup_stale()
        if removed:
            log.warning("%s: removed snapshot state left by a dead replicator: %s", item_name, removed)


def work_dir_for(vault: Any, item_name: str, direction: str = "forward") -> Path:
    """Where the replicator keeps a source's state (change tracking records, control state):
    one directory per machine read, the primary machine (forward) or the recovered one."""
    suffix = "" if direction == "forward" else "-recovered"
    return Path(vault.work_dir) / f"{item_name}{suffix}"


def replication_source(vault: Any, item: ItemRow, direction: str) -> tuple[str, dict[str, Any], Path]:
    """(site kind, machine spec, work dir) of the machine replication reads in ``direction``."""
    if direction == "forward":
        return item.source_site.kind, dict(item.machine.spec), work_dir_for(vault, item.name)
    recovered = item.recovered_machine
    if not recovered:
        raise OperationNotAllowed(
            f"{item.name!r} has no machine running at the recovery site to replicate back from; "
            "fail over first."
        )
    return str(recovered["kind"]), dict(recovered), work_dir_for(vault, item.name, "reverse")
