"""The QEMU source: point-in-time views and changed extents of a running machine's disks.

Works against a QEMU VM and against ``qemu-storage-daemon`` alike: both speak QMP and share the
block layer. Everything is done with stock QEMU features (7.2 is enough):

Change tracking - persistent dirty bitmaps
    Each disk's qcow2 node carries bitmaps named ``siterecovery-<n>`` (granularity 64 KiB, the
    chunk size; persistent, so they survive a clean stop of the VM inside the qcow2 file). The
    bitmap with the highest ``n`` is the active one: it records every write since the last
    snapshot. Older ones are disabled and frozen: they hold the writes between the last
    *committed* snapshot and the current one. If several older ones exist (a snapshot was never
    committed nor aborted, e.g. the replicator crashed) their union is used: a superset of the
    changes is safe, a gap is not.

Point-in-time views - image fleecing
    A temporary qcow2 overlay (``work_dir/fleece-<token>-<disk>.qcow2``) whose backing is the
    live disk node is attached with ``blockdev-add``; ``blockdev-backup sync=none`` into it
    installs a copy-before-write filter, so every guest write first copies the old data into
    the overlay. Reading the overlay therefore shows the disk as it was at the instant the job
    started, while the guest keeps writing. QEMU serialises the backup's copies against reads
    of the overlay (the target's backing is the source), so a read never sees new data.

One transaction
    A single QMP ``transaction`` does, for all of the machine's disks at once: add the new
    bitmap, disable the old ones, and start the fleecing backup. Because it is one atomic
    step with the guest's I/O drained, (a) every disk is captured at the same instant - the
    views are crash-consistent across disks, as if power had been cut - and (b) no write falls
    between two tracking generations: each write lands in exactly one of "before the view"
    (old bitmaps, in the view) or "after the view" (new bitmap, not in the view).

Export
    Each overlay is exported read-only on the machine's NBD server (the daemon's own server if
    there is one, else one started on ``work_dir/nbd.sock``), with the old bitmaps attached, so
    the data and ``qemu:dirty-bitmap:<name>`` block status are read over NBD with libnbd.

Finishing
    ``commit()`` removes the old bitmaps (tracking restarts at this view); ``abort()`` merges
    them into the new one (nothing since the last committed snapshot is forgotten) or, if there
    was no old one, removes the new one too (the next view must again report "unknown").
    Both then tear down exports, jobs, nodes and overlay files; after that no ``srf-``/``srj-``
    /``sre-`` object is left in the machine.

Lost tracking
    After an unclean stop (SIGKILL, host crash) QEMU loads persistent bitmaps as
    ``inconsistent``. Those are removed and the view reports ``changed_extents() is None`` with
    ``tracking == "lost: bitmap inconsistent after an unclean stop"``; the engine then resyncs by
    hashes. A partial change set is never reported. QEMU stores a persistent bitmap in the
    qcow2 file only when it closes the image cleanly, so a bitmap created since the last clean
    start simply vanishes on an unclean stop; the tracking record ``work_dir/tracking.json``
    (``{"version": 1, "disks": [image file, ...]}``, the disks with a committed generation)
    tells that case (``"lost: bitmap missing after an unclean stop (or it was removed)"``)
    from a first snapshot. Keep ``work_dir`` stable per machine for that; without the record a
    vanished bitmap still yields ``changed_extents() is None`` (safe), only labelled as a
    first snapshot.

Object names (QEMU node names are limited to 31 characters): fleecing node
``srf-<token>-<i>``, backup job ``srj-<token>-<i>``, export id ``sre-<token>-<i>``, NBD export
name ``siterecovery-<token>-<disk>``; ``<token>`` is random per snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from siterecovery.adapters.sources import nbd as nbdio
from siterecovery.adapters.sources.qmp import QmpClient
from siterecovery.errors import InvalidInput, NotFound, SourceError
from siterecovery.ports.source import Extent

BITMAP_PREFIX = "siterecovery-"
GRANULARITY = 65536
LOST_INCONSISTENT = "bitmap inconsistent after an unclean stop"
LOST_MISSING = "bitmap missing after an unclean stop (or it was removed)"
TRACKING_RECORD = "tracking.json"
TRACKING_RECORD_VERSION = 1
TRACKING_BITMAP = "dirty-bitmap"
_BITMAP_NAME = re.compile(rf"^{re.escape(BITMAP_PREFIX)}(\d+)$")
_STALE_PREFIXES = ("srf-", "srj-", "sre-")
_TEARDOWN_TIMEOUT = 15.0


def daemon_nbd_socket(qmp_socket: str) -> str | None:
    """The NBD socket of a MachineDaemon whose QMP socket is ``qmp_socket``, if any (found
    through the daemon's ``daemon.json`` next to the QMP socket)."""
    state = Path(qmp_socket).parent / "daemon.json"
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    if data.get("qmp_socket") == str(qmp_socket) and data.get("nbd_socket"):
        return str(data["nbd_socket"])
    return None


def start_nbd_server(qmp: QmpClient, path: Path | str, *, ours_if_running: bool) -> str:
    """Start the machine's NBD server on the unix socket ``path`` and return the path.

    QEMU runs at most one NBD server per process and cannot tell where a running one listens:
    with ``ours_if_running`` the caller knows that a running server is the one it started on
    ``path`` earlier, and "already running" is success; otherwise it is an error that asks for
    the machine's own NBD socket.
    """
    path = str(path)
    if len(path.encode()) > 107:
        raise InvalidInput(f"NBD socket path {path} is too long for a unix socket; use a shorter work_dir.")
    try:
        qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": path}})
    except SourceError as err:
        if ours_if_running and "already running" in str(err.fields.get("desc", "")):
            return path
        raise SourceError(
            f"cannot start an NBD server in the machine: {err}. If the machine already runs "
            "one, pass its unix socket as nbd_socket."
        ) from err
    return path


@dataclass
class _DiskPlan:
    """Everything a snapshot creates for one disk, so teardown knows what to remove."""

    name: str
    node: str
    size: int
    old_bitmaps: list[str]
    known: bool  # old_bitmaps are a complete record since the last committed snapshot
    lost_reason: str | None
    new_bitmap: str
    overlay: Path
    fleece_node: str
    job_id: str
    export_id: str
    export_name: str
    key: str = ""  # identity of the disk image in the tracking record
    created: set[str] = field(default_factory=set)  # "overlay", "node", "job", "export"


def _disk_key(info: dict[str, Any]) -> str:
    """A stable identity for a disk: its image file name (node names may change on restart)."""
    return str(info.get("file") or info.get("node-name", ""))


class QemuDiskView:
    """One disk of a :class:`QemuSnapshot`: reads the fleecing export over NBD.

    Thread-safe: each thread reads over its own NBD connection.
    """

    def __init__(self, name: str, size: int, nbd_socket: str, export_name: str, bitmaps: list[str] | None):
        self.name = name
        self.size = size
        self._bitmaps = bitmaps
        contexts = [nbdio.BASE_ALLOCATION]
        if bitmaps:
            contexts += [nbdio.dirty_bitmap_context(b) for b in bitmaps]
        self._contexts = contexts
        self._pool = nbdio.HandlePool(nbd_socket, export_name, contexts)
        self._changed: list[Extent] | None = None
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(
                f"read of {length} bytes at {offset} is outside disk {self.name!r} "
                f"(size {self.size}); allowed is 0 <= offset, offset + length <= size."
            )
        if length == 0:
            return b""
        return self._pool.pread(offset, length)

    def allocated_extents(self) -> Iterator[Extent]:
        yield from nbdio.data_extents(self._pool.handle())

    def changed_extents(self) -> list[Extent] | None:
        if self._bitmaps is None:
            return None
        with self._lock:
            if self._changed is None:
                dirty_contexts = [nbdio.dirty_bitmap_context(b) for b in self._bitmaps]
                status = nbdio.block_status(self._pool.handle(), dirty_contexts) if dirty_contexts else {}
                dirty = [
                    Extent(off, n)
                    for ctx in dirty_contexts
                    for off, n, flags in status[ctx]
                    if flags & nbdio.STATE_DIRTY
                ]
                self._changed = nbdio.coalesce(dirty, GRANULARITY, self.size)
            return list(self._changed)

    def close(self) -> None:
        self._pool.close()


class QemuSnapshot:
    """A point-in-time view of several disks of one machine (see the module docstring)."""

    point_in_time = True

    def __init__(
        self,
        source: QemuSource,
        plans: list[_DiskPlan],
        captured_at: float,
        nbd_socket: str,
    ) -> None:
        self._source = source
        self._plans = plans
        self.captured_at = captured_at
        lost = sorted({p.lost_reason for p in plans if p.lost_reason})
        self.tracking = f"lost: {'; '.join(lost)}" if lost else TRACKING_BITMAP
        self.disks: dict[str, QemuDiskView] = {
            p.name: QemuDiskView(
                p.name, p.size, nbd_socket, p.export_name, p.old_bitmaps if p.known else None
            )
            for p in plans
        }
        self._state = "open"
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``open``, ``committed``, ``aborted`` or ``closed`` (closed without a decision)."""
        return self._state

    def commit(self) -> None:
        """The point was stored: forget the old bitmaps, keep tracking with the new one."""
        self._finish("committed")

    def abort(self) -> None:
        """The point was not stored: fold the old bitmaps back into the new one."""
        self._finish("aborted")

    def close(self) -> None:
        """Release the view; without commit/abort before, bitmaps are handled as by abort()."""
        self._finish("closed")

    def __enter__(self) -> QemuSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self._state == "open":
            self.abort()
        self.close()

    def _finish(self, outcome: str) -> None:
        with self._lock:
            if self._state != "open":
                if outcome != "closed":
                    if self._state == outcome:
                        return
                    raise SourceError(
                        f"snapshot was already {self._state}; exactly one of commit() or abort() "
                        "may be called."
                    )
                return
            self._state = outcome
        for view in self.disks.values():
            view.close()
        try:
            self._source._finish_snapshot(self._plans, commit=outcome == "committed")
        finally:
            self._source._forget(self)


class QemuSource:
    """A QEMU VM or qemu-storage-daemon reached over QMP (see the module docstring).

    ``disks`` maps the inventory disk name to the QEMU block node name of the disk's format
    node (qcow2, needed for persistent bitmaps). ``work_dir`` holds overlay files (and the NBD
    socket if this source has to start an NBD server); it must be on a filesystem with room for
    the data the guest overwrites while a view is open.
    """

    def __init__(
        self,
        qmp_socket: str,
        disks: dict[str, str],
        work_dir: Path,
        nbd_socket: str | None = None,
        timeout: float = 30,
    ) -> None:
        if not disks:
            raise InvalidInput("a QEMU source needs at least one disk: give {disk name: node name}.")
        self.qmp_socket = str(qmp_socket)
        self.disks = dict(disks)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._nbd_socket = nbd_socket or self._daemon_nbd_socket()
        self._own_nbd = False  # True once this source started the machine's NBD server
        self._open: list[QemuSnapshot] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- Source port ------------------------------------------------------------------------

    def snapshot(self, disks: list[str]) -> QemuSnapshot:
        names = self._check_disks(disks)
        token = secrets.token_hex(3)
        with self._qmp() as qmp:
            infos = self._node_infos(qmp)
            plans = self._plan(qmp, names, infos, token)
            nbd_socket = self._ensure_nbd_server(qmp)
            try:
                for plan in plans:
                    self._add_fleece_node(qmp, plan)
                actions: list[dict[str, Any]] = []
                for plan in plans:
                    actions.append(
                        {
                            "type": "block-dirty-bitmap-add",
                            "data": {
                                "node": plan.node,
                                "name": plan.new_bitmap,
                                "granularity": GRANULARITY,
                                "persistent": True,
                            },
                        }
                    )
                    actions += [
                        {"type": "block-dirty-bitmap-disable", "data": {"node": plan.node, "name": b}}
                        for b in plan.old_bitmaps
                    ]
                    actions.append(
                        {
                            "type": "blockdev-backup",
                            "data": {
                                "job-id": plan.job_id,
                                "device": plan.node,
                                "target": plan.fleece_node,
                                "sync": "none",
                                "auto-dismiss": True,
                            },
                        }
                    )
                captured_at = time.time()
                qmp.execute("transaction", actions=actions)
            except BaseException:
                # The transaction is atomic: on failure no bitmap or job exists, only nodes/files.
                with contextlib.suppress(SourceError):
                    self._teardown(qmp, plans)
                raise
            for plan in plans:
                plan.created.add("job")
            snap = QemuSnapshot(self, plans, captured_at, nbd_socket)
            with self._lock:
                self._open.append(snap)
            try:
                for plan in plans:
                    export: dict[str, Any] = {
                        "type": "nbd",
                        "id": plan.export_id,
                        "node-name": plan.fleece_node,
                        "name": plan.export_name,
                        "writable": False,
                    }
                    if plan.known and plan.old_bitmaps:
                        export["bitmaps"] = plan.old_bitmaps
                    qmp.execute("block-export-add", **export)
                    plan.created.add("export")
            except BaseException:
                qmp.close()
                snap.abort()
                raise
        return snap

    def reset_tracking(self) -> None:
        """Remove every siterecovery bitmap of this source's disks."""
        with self._qmp() as qmp:
            infos = self._node_infos(qmp)
            for node in self.disks.values():
                for bitmap in self._our_bitmaps(infos.get(node, {})):
                    if bitmap.get("busy"):
                        raise SourceError(
                            f"bitmap {bitmap['name']} of node {node} is in use by an open snapshot; "
                            "commit or abort it before resetting tracking."
                        )
                    qmp.execute("block-dirty-bitmap-remove", node=node, name=bitmap["name"])
            keys = {_disk_key(infos[node]) for node in self.disks.values() if node in infos}
        self._record_committed(keys, add=False)

    def cleanup_stale(self) -> list[str]:
        """Remove siterecovery exports, jobs, nodes and overlay files that no open snapshot of
        this source owns (left by a replicator that died). Do not call while another process
        has a snapshot of this machine open. Returns what was removed."""
        removed: list[str] = []
        with self._lock:
            owned = {
                name
                for snap in self._open
                for p in snap._plans
                for name in (p.fleece_node, p.job_id, p.export_id, str(p.overlay))
            }
        with self._qmp() as qmp:
            for export in qmp.execute("query-block-exports"):
                if export["id"].startswith("sre-") and export["id"] not in owned:
                    qmp.execute("block-export-del", id=export["id"], mode="hard")
                    removed.append(export["id"])
            self._wait_gone(qmp, "query-block-exports", "id", set(removed))
            jobs = [j["id"] for j in qmp.execute("query-jobs") if j["id"].startswith("srj-")]
            for job in jobs:
                if job not in owned:
                    self._cancel_job(qmp, job)
                    removed.append(job)
            self._wait_gone(qmp, "query-jobs", "id", set(removed))
            for node in qmp.execute("query-named-block-nodes", flat=True):
                name = node.get("node-name", "")
                if name.startswith("srf-") and name not in owned:
                    qmp.execute("blockdev-del", node_name=name)
                    removed.append(name)
        for overlay in self.work_dir.glob("fleece-*.qcow2"):
            if str(overlay) not in owned:
                overlay.unlink(missing_ok=True)
                removed.append(str(overlay))
        return removed

    def close(self) -> None:
        """Close open snapshots (as abort) and stop an NBD server this source started."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            snaps = list(self._open)
        for snap in snaps:
            snap.close()
        if self._own_nbd:
            with contextlib.suppress(SourceError), self._qmp() as qmp:
                qmp.execute("nbd-server-stop")

    def __enter__(self) -> QemuSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- snapshot helpers -------------------------------------------------------------------

    def _check_disks(self, disks: list[str]) -> list[str]:
        if self._closed:
            raise SourceError("this QEMU source is closed; create a new one.")
        if not disks:
            raise InvalidInput(f"name at least one disk to snapshot; this machine has {sorted(self.disks)}.")
        unknown = [d for d in disks if d not in self.disks]
        if unknown:
            raise NotFound(
                kind="disk", name=unknown[0], hint=f" This machine's disks are {sorted(self.disks)}."
            )
        if len(set(disks)) != len(disks):
            raise InvalidInput(f"disks {disks} name a disk twice; name each disk once.")
        return list(disks)

    @staticmethod
    def _our_bitmaps(info: dict[str, Any]) -> list[dict[str, Any]]:
        return [b for b in info.get("dirty-bitmaps") or [] if _BITMAP_NAME.match(b.get("name", ""))]

    def _node_infos(self, qmp: QmpClient) -> dict[str, dict[str, Any]]:
        return {n["node-name"]: n for n in qmp.execute("query-named-block-nodes", flat=True)}

    def _plan(
        self, qmp: QmpClient, names: list[str], infos: dict[str, dict[str, Any]], token: str
    ) -> list[_DiskPlan]:
        numbers = [0]
        per_disk: dict[str, list[dict[str, Any]]] = {}
        for name in names:
            node = self.disks[name]
            if node not in infos:
                raise SourceError(
                    f"disk {name!r}: QEMU has no block node {node!r}; known nodes are "
                    f"{sorted(infos)}. Give the node name of the disk's qcow2 node."
                )
            bitmaps = self._our_bitmaps(infos[node])
            busy = [b["name"] for b in bitmaps if b.get("busy")]
            if busy:
                raise SourceError(
                    f"disk {name!r} has bitmap(s) {busy} in use by another open snapshot; commit "
                    "or abort it first (or cleanup_stale() if its replicator died)."
                )
            per_disk[name] = bitmaps
            numbers += [int(_BITMAP_NAME.match(b["name"]).group(1)) for b in bitmaps]  # type: ignore[union-attr]
        new_bitmap = f"{BITMAP_PREFIX}{max(numbers) + 1}"
        committed = self._load_committed()
        plans: list[_DiskPlan] = []
        for i, name in enumerate(names):
            node = self.disks[name]
            bitmaps = per_disk[name]
            lost_reason = None
            old = [b["name"] for b in sorted(bitmaps, key=lambda b: int(b["name"][len(BITMAP_PREFIX) :]))]
            if any(b.get("inconsistent") for b in bitmaps):
                # A partial union would hide writes: drop every generation of this disk.
                for b in old:
                    qmp.execute("block-dirty-bitmap-remove", node=node, name=b)
                old, lost_reason = [], LOST_INCONSISTENT
            elif not old and _disk_key(infos[node]) in committed:
                old, lost_reason = [], LOST_MISSING
            plans.append(
                _DiskPlan(
                    name=name,
                    node=node,
                    size=int(infos[node]["image"]["virtual-size"]),
                    old_bitmaps=old,
                    known=bool(old),
                    lost_reason=lost_reason,
                    new_bitmap=new_bitmap,
                    overlay=self.work_dir / f"fleece-{token}-{i}.qcow2",
                    fleece_node=f"srf-{token}-{i}",
                    job_id=f"srj-{token}-{i}",
                    export_id=f"sre-{token}-{i}",
                    export_name=f"siterecovery-{token}-{name}",
                    key=_disk_key(infos[node]),
                )
            )
        return plans

    def _add_fleece_node(self, qmp: QmpClient, plan: _DiskPlan) -> None:
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(plan.overlay), str(plan.size)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SourceError(f"cannot create the fleecing overlay {plan.overlay}: {proc.stderr.strip()}")
        plan.created.add("overlay")
        qmp.execute(
            "blockdev-add",
            driver="qcow2",
            node_name=plan.fleece_node,
            file={"driver": "file", "filename": str(plan.overlay)},
            backing=plan.node,
        )
        plan.created.add("node")

    def _daemon_nbd_socket(self) -> str | None:
        """The NBD socket of a MachineDaemon whose QMP socket this is, if any."""
        return daemon_nbd_socket(self.qmp_socket)

    def _ensure_nbd_server(self, qmp: QmpClient) -> str:
        if self._nbd_socket is not None and not self._own_nbd:
            return self._nbd_socket
        # Started again each time in case the machine restarted in between.
        path = start_nbd_server(qmp, self.work_dir / "nbd.sock", ours_if_running=self._own_nbd)
        self._nbd_socket = path
        self._own_nbd = True
        return path

    # -- tracking record ----------------------------------------------------------------------

    def _record_path(self) -> Path:
        return self.work_dir / TRACKING_RECORD

    def _load_committed(self) -> set[str]:
        """Disks (by image file) for which a bitmap generation was committed.

        QEMU writes a persistent bitmap into the qcow2 file only at a clean close, so a bitmap
        created after the last clean start vanishes without trace on an unclean stop. This
        record tells "never tracked" (first snapshot) from "tracking vanished" (lost).
        Format: ``{"version": 1, "disks": [image file, ...]}``.
        """
        try:
            data = json.loads(self._record_path().read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as err:
            raise SourceError(
                f"tracking record {self._record_path()} is unreadable ({err}); delete it to "
                "resync every disk by hashes."
            ) from err
        if data.get("version") != TRACKING_RECORD_VERSION:
            raise SourceError(
                f"tracking record {self._record_path()} has version {data.get('version')!r}, this "
                f"version reads {TRACKING_RECORD_VERSION}; delete it to resync by hashes."
            )
        return set(data.get("disks", []))

    def _record_committed(self, keys: set[str], add: bool) -> None:
        with self._lock:
            current = self._load_committed()
            new = current | keys if add else current - keys
            if new == current:
                return
            tmp = self._record_path().with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump({"version": TRACKING_RECORD_VERSION, "disks": sorted(new)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._record_path())

    # -- teardown ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _qmp(self) -> Iterator[QmpClient]:
        # One short connection per operation: a QMP chardev serves one client at a time.
        qmp = QmpClient(self.qmp_socket, timeout=self.timeout)
        try:
            yield qmp
        finally:
            qmp.close()

    def _forget(self, snap: QemuSnapshot) -> None:
        with self._lock:
            if snap in self._open:
                self._open.remove(snap)

    def _finish_snapshot(self, plans: list[_DiskPlan], commit: bool) -> None:
        try:
            qmp = QmpClient(self.qmp_socket, timeout=self.timeout)
        except SourceError:
            # The machine is gone: its graph went with it; only our files remain. Its bitmaps
            # are either stored cleanly (superset next time) or inconsistent (detected).
            self._remove_files(plans)
            return
        with qmp:
            self._teardown(qmp, plans)
            infos = self._node_infos(qmp)
            actions: list[dict[str, Any]] = []
            present_new: set[str] = set()
            for plan in plans:
                present = {b["name"] for b in self._our_bitmaps(infos.get(plan.node, {}))}
                old = [b for b in plan.old_bitmaps if b in present]
                if plan.new_bitmap in present:
                    present_new.add(plan.key)
                else:
                    # The machine restarted in between; whatever is there now is checked by
                    # the next snapshot.
                    continue
                if commit:
                    pass
                elif old:
                    actions.append(
                        {
                            "type": "block-dirty-bitmap-merge",
                            "data": {"node": plan.node, "target": plan.new_bitmap, "bitmaps": old},
                        }
                    )
                else:
                    # Nothing was committed before this view: the next one must report "unknown".
                    actions.append(
                        {
                            "type": "block-dirty-bitmap-remove",
                            "data": {"node": plan.node, "name": plan.new_bitmap},
                        }
                    )
                actions += [
                    {"type": "block-dirty-bitmap-remove", "data": {"node": plan.node, "name": b}} for b in old
                ]
            if actions:
                qmp.execute("transaction", actions=actions)
            if commit:
                self._record_committed(present_new, add=True)

    def _teardown(self, qmp: QmpClient, plans: list[_DiskPlan]) -> None:
        """Remove exports, jobs, fleecing nodes and overlay files of ``plans`` (tolerant:
        objects that are already gone are skipped)."""
        try:
            exports = {p.export_id for p in plans if "export" in p.created}
            for export_id in exports:
                with contextlib.suppress(SourceError):
                    qmp.execute("block-export-del", id=export_id, mode="hard")
            self._wait_gone(qmp, "query-block-exports", "id", exports)
            jobs = {p.job_id for p in plans if "job" in p.created}
            for job in jobs:
                self._cancel_job(qmp, job)
            self._wait_gone(qmp, "query-jobs", "id", jobs)
            for plan in plans:
                if "node" in plan.created:
                    with contextlib.suppress(SourceError):
                        qmp.execute("blockdev-del", node_name=plan.fleece_node)
                plan.created -= {"export", "job", "node"}
        finally:
            self._remove_files(plans)

    @staticmethod
    def _cancel_job(qmp: QmpClient, job_id: str) -> None:
        for job in qmp.execute("query-jobs"):
            if job["id"] != job_id:
                continue
            with contextlib.suppress(SourceError):
                if job["status"] in ("concluded", "aborting", "null"):
                    qmp.execute("job-dismiss", id=job_id)
                else:
                    qmp.execute("block-job-cancel", device=job_id, force=True)

    @staticmethod
    def _wait_gone(qmp: QmpClient, query: str, key: str, ids: set[str]) -> None:
        if not ids:
            return
        deadline = time.monotonic() + _TEARDOWN_TIMEOUT
        while True:
            left = [item for item in qmp.execute(query) if item[key] in ids]
            if not left:
                return
            if time.monotonic() > deadline:
                raise SourceError(
                    f"{', '.join(i[key] for i in left)} still present {_TEARDOWN_TIMEOUT:g} s after "
                    "removal was requested; check the machine, then run cleanup_stale()."
                )
            for item in left:
                # A job that concluded without auto-dismiss (or an error) must be dismissed.
                if query == "query-jobs" and item.get("status") == "concluded":
                    with contextlib.suppress(SourceError):
                        qmp.execute("job-dismiss", id=item[key])
            time.sleep(0.01)

    @staticmethod
    def _remove_files(plans: list[_DiskPlan]) -> None:
        for plan in plans:
            plan.overlay.unlink(missing_ok=True)
            plan.created.discard("overlay")
