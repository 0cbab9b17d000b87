"""Machine control at a qemu site: stop and resume a machine's writes, write its disks in place.

A protected machine at a qemu site is a QEMU VM or a ``qemu-storage-daemon`` (qsd) reached over
its QMP socket. :class:`QemuMachineControl` implements
:class:`~siterecovery.ports.compute.MachineControl` for both; ``kind()`` tells them apart (a
system emulator answers ``query-status``, qsd does not know the command).

Stopping writes
    VM: QMP ``stop`` pauses the vCPUs, so the guest issues no more I/O; QEMU drains and flushes
    every block device before ``stop`` returns (``vm_stop``), so nothing is in flight afterwards.
    qsd: its writers are the clients of its block exports, so the exports that write into the
    machine's disk nodes are deleted (``block-export-del`` mode ``hard``, which disconnects the
    clients; we wait until QEMU reports them gone, which is after their requests completed).

    QEMU 7.2's ``query-block-exports`` reports only id, type and node of an export, not its NBD
    name or settings. Those are read from the NBD server itself, which lists its exports
    (``NBD_OPT_LIST``: name, description) and describes each (``NBD_OPT_INFO``: read-only flag;
    ``NBD_OPT_LIST_META_CONTEXT``: exported dirty bitmaps, ``qemu:allocation-depth``). Which
    name belongs to which export id is observed by deleting the exports one at a time: the name
    that disappears from the listing is the deleted export's. When the server cannot be listed
    (its socket is unknown: pass ``nbd_socket``, or it is not a MachineDaemon) or the listing is
    ambiguous, the export is re-created under the disk's inventory name, writable (the
    MachineDaemon convention), and the record says ``"recovered_by": "inventory-name"``. Settings
    QEMU does not reveal at all (``writethrough``, ``iothread``) are re-created with defaults.
    Exports of other types (FUSE, vhost-user-blk) cannot be re-created and are refused up front.

    During an open replication snapshot QEMU inserts a copy-before-write filter above a disk
    node, and exports then sit on the filter. Exports are therefore matched by walking down
    ``file`` edges of the block graph (``x-debug-query-block-graph``) to a disk node, and
    re-created (and writers opened) on the topmost filter above the disk node, so that guest
    writes keep passing the filter. Exports whose id starts with ``sre-`` (QemuSource's
    fleecing exports) or ``srw-`` (writers of this class) are never treated as the guest's.

Record ``state_dir/stopped.json`` (written atomically before anything is changed, updated after
each export is deleted, removed by ``resume_writes``)::

    {"version": 1, "kind": "vm" | "storage-daemon", "stopped_at": <epoch s>,
     "was_running": bool,                                   # vm only
     "exports": [                                           # storage-daemon only
        {"id": str, "type": "nbd", "disk": <inventory name>, "disk_node": str, "node": str,
         "candidates": {nbd name: settings} | null,         # the listing before deleting it
         "settings": {"name", "description", "writable", "bitmaps", "allocation_depth"} | null,
         "recovered_by": "nbd-listing" | "inventory-name" | null}]}

In-place writers
    ``open_writer(disk)`` adds a temporary writable NBD export ``srw-<token>`` (NBD name
    ``siterecovery-w-<token>-<disk>``) of the disk on the machine's NBD server (one started on
    ``state_dir/nbd.sock`` if the machine has none we know of; stopped again when this object's
    last writer closes) and connects to it with libnbd. It refuses unless the machine's writes
    are stopped. A paused VM's disk device keeps its write permission unless it was started with
    ``share-rw=on``; QEMU then refuses the export and the error says what to do.

Connections: a QMP monitor serves one client at a time, so every operation opens a short
connection of its own.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd

from siterecovery.adapters.compute.image import NbdDiskWriter
from siterecovery.adapters.sources.qemu import daemon_nbd_socket, start_nbd_server
from siterecovery.adapters.sources.qmp import QmpClient
from siterecovery.durable import fsync_dir, write_atomic
from siterecovery.errors import InvalidInput, NotFound, SourceError
from siterecovery.ports.compute import DiskWriter, MachineKind

STOPPED_RECORD = "stopped.json"
RECORD_VERSION = 1
WRITER_EXPORT_PREFIX = "srw-"
WRITER_NAME_PREFIX = "siterecovery-w-"
# Export ids and NBD names that siterecovery itself creates (never a guest's).
_OUR_EXPORT_IDS = ("srw-", "sre-")
_OUR_NBD_NAMES = "siterecovery-"
_BITMAP_CONTEXT = "qemu:dirty-bitmap:"
_ALLOCATION_DEPTH = "qemu:allocation-depth"
_POLL = 0.02


def _is_command_not_found(err: SourceError) -> bool:
    return err.fields.get("error_class") == "CommandNotFound"


class _Graph:
    """The block graph (``x-debug-query-block-graph``), or None-like fallbacks without it."""

    def __init__(self, raw: dict[str, Any] | None) -> None:
        self.available = raw is not None
        self._names: dict[int, str] = {}
        self._types: dict[int, str] = {}
        self._ids: dict[str, int] = {}
        self._children: dict[int, list[int]] = {}
        self._parents: dict[int, list[int]] = {}
        for node in (raw or {}).get("nodes", []):
            self._names[node["id"]] = node.get("name", "")
            self._types[node["id"]] = node.get("type", "")
            if node.get("type") == "block-driver" and node.get("name"):
                self._ids[node["name"]] = node["id"]
        for edge in (raw or {}).get("edges", []):
            # Only "file" edges pass data through unchanged (filters, and format -> protocol);
            # "backing" (an overlay reading its base) and "target" (a backup target) do not.
            if edge.get("name") != "file":
                continue
            if self._types.get(edge["parent"]) != "block-driver":
                continue
            self._children.setdefault(edge["parent"], []).append(edge["child"])
            self._parents.setdefault(edge["child"], []).append(edge["parent"])

    def writes_into(self, node: str, targets: set[str]) -> str | None:
        """The target node that writes to ``node`` reach (following ``file`` edges down), if any."""
        if node in targets:
            return node
        start = self._ids.get(node)
        if start is None:
            return None
        todo, seen = [start], {start}
        while todo:
            current = todo.pop()
            name = self._names.get(current, "")
            if name in targets:
                return name
            for child in self._children.get(current, []):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return None

    def top(self, node: str) -> str:
        """The topmost node above ``node`` along ``file`` edges (``node`` itself without filters)."""
        current = self._ids.get(node)
        if current is None:
            return node
        seen = {current}
        while True:
            parents = [p for p in self._parents.get(current, []) if p not in seen]
            if not parents:
                return self._names.get(current, node) or node
            current = parents[0]
            seen.add(current)


def _nbd_catalog(socket_path: str | None) -> dict[str, dict[str, Any]] | None:
    """``{nbd name: settings}`` of every export the NBD server lists (see the module docstring),
    or None when the server cannot be listed."""
    if not socket_path:
        return None
    h = nbd.NBD()
    listed: list[tuple[str, str]] = []
    try:
        h.set_opt_mode(True)
        h.connect_unix(socket_path)
        h.opt_list(lambda name, description: listed.append((name, description)) or 0)
    except nbd.Error:
        with contextlib.suppress(nbd.Error):
            h.opt_abort()
        return None
    catalog: dict[str, dict[str, Any]] = {}
    try:
        for name, description in listed:
            contexts: list[str] = []
            try:
                h.set_export_name(name)
                h.opt_info()
                read_only = bool(h.is_read_only())
                h.opt_list_meta_context(contexts.append)
            except nbd.Error:
                # Vanished between list and info (being deleted): not a settled export.
                continue
            catalog[name] = {
                "name": name,
                "description": description,
                "writable": not read_only,
                "bitmaps": sorted(
                    c[len(_BITMAP_CONTEXT) :] for c in contexts if c.startswith(_BITMAP_CONTEXT)
                ),
                "allocation_depth": _ALLOCATION_DEPTH in contexts,
            }
    finally:
        with contextlib.suppress(nbd.Error):
            h.opt_abort()
    return catalog


class QemuMachineControl:
    """Control of one QEMU VM or qemu-storage-daemon (see the module docstring).

    ``disks`` maps inventory disk names to QEMU node names (the format node, as for
    :class:`~siterecovery.adapters.sources.qemu.QemuSource`). ``state_dir`` holds the stop
    record and, if needed, the NBD socket for writers; keep it stable per machine. ``nbd_socket``
    is the unix socket of the machine's own NBD server when it has one (found through
    ``daemon.json`` for a MachineDaemon).
    """

    def __init__(
        self,
        qmp_socket: str,
        disks: dict[str, str],
        state_dir: Path,
        *,
        nbd_socket: str | None = None,
        timeout: float = 30,
        reach_timeout: float = 3,
    ) -> None:
        if not disks:
            raise InvalidInput("a machine needs at least one disk: give {disk name: node name}.")
        self.qmp_socket = str(qmp_socket)
        self.disks = dict(disks)
        self.state_dir = Path(state_dir)
        self.timeout = timeout
        self.reach_timeout = reach_timeout
        self.nbd_socket = nbd_socket or daemon_nbd_socket(self.qmp_socket)
        self._kind: MachineKind | None = None
        self._lock = threading.Lock()
        self._writers = 0
        self._own_nbd: str | None = None  # socket of an NBD server this object started

    # -- MachineControl ---------------------------------------------------------------------

    def kind(self) -> MachineKind:
        if self._kind is None:
            with self._qmp() as qmp:
                self._kind = self._detect_kind(qmp)
        return self._kind

    def stop_writes(self) -> None:
        with self._qmp() as qmp:
            if self._detect_kind(qmp) == "vm":
                self._stop_vm(qmp)
            else:
                self._stop_exports(qmp)

    def resume_writes(self) -> None:
        record = self._load_record()
        with self._qmp() as qmp:
            if self._detect_kind(qmp) == "vm":
                self._resume_vm(qmp, record)
            else:
                self._resume_exports(qmp, record)
        self._remove_record()

    def writes_stopped(self) -> bool:
        with self._qmp() as qmp:
            if self._detect_kind(qmp) == "vm":
                return not qmp.execute("query-status").get("running", False)
            return not self._guest_exports(qmp, self._graph(qmp))

    def is_reachable(self) -> bool:
        try:
            with QmpClient(self.qmp_socket, timeout=self.reach_timeout) as qmp:
                qmp.execute("query-version")
        except SourceError:
            return False
        return True

    def power_off(self) -> bool:
        """QMP ``quit``, then wait until nothing listens on the QMP socket (or the timeout)."""
        try:
            with QmpClient(self.qmp_socket, timeout=self.timeout) as qmp:
                qmp.execute("quit")
        except SourceError:
            # Gone already, or the monitor closed before answering quit: the wait decides.
            pass
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not self._listening():
                return True
            time.sleep(0.05)
        return not self._listening()

    @contextlib.contextmanager
    def open_writer(self, disk: str) -> Iterator[DiskWriter]:
        node = self._node(disk)
        token = secrets.token_hex(3)
        export_id = f"{WRITER_EXPORT_PREFIX}{token}"
        export_name = f"{WRITER_NAME_PREFIX}{token}-{disk}"
        with self._qmp() as qmp:
            kind = self._detect_kind(qmp)
            graph = self._graph(qmp)
            if kind == "vm":
                if qmp.execute("query-status").get("running", False):
                    raise SourceError(
                        f"the guest of the VM at {self.qmp_socket} is running; call stop_writes() "
                        f"before writing disk {disk!r} in place."
                    )
            else:
                busy = self._guest_exports(qmp, graph)
                if busy:
                    raise SourceError(
                        f"the storage daemon at {self.qmp_socket} still exports "
                        f"{sorted(e['id'] for e in busy)} to its clients; call stop_writes() before "
                        f"writing disk {disk!r} in place."
                    )
            socket_path = self._ensure_nbd_server(qmp)
            try:
                qmp.execute(
                    "block-export-add",
                    type="nbd",
                    id=export_id,
                    node_name=graph.top(node),
                    name=export_name,
                    writable=True,
                )
            except SourceError as err:
                self._release_nbd_server(qmp)
                desc = str(err.fields.get("desc", ""))
                if "ermission" in desc or "onflicts with use" in desc:
                    raise SourceError(
                        f"QEMU refuses a writable export of disk {disk!r} (node {node!r}): {desc}. "
                        "A VM's disk device keeps write access while paused unless it was started "
                        "with share-rw=on: power the VM off and write its image file instead "
                        "(adapters.compute.image.open_image_writer), or start it with share-rw=on.",
                        desc=desc,
                    ) from err
                raise
        try:
            writer = NbdDiskWriter(str(socket_path), export_name)
        except BaseException:
            self._remove_writer_export(export_id)
            raise
        try:
            yield writer
        finally:
            writer.close()
            self._remove_writer_export(export_id)

    # -- stopping and resuming --------------------------------------------------------------

    def _stop_vm(self, qmp: QmpClient) -> None:
        record = self._load_record()
        if record is None:
            running = bool(qmp.execute("query-status").get("running", False))
            # Recorded before stopping: a crash in between leaves a record that says to resume.
            self._save_record(
                {"version": RECORD_VERSION, "kind": "vm", "stopped_at": time.time(), "was_running": running}
            )
        qmp.execute("stop")
        deadline = time.monotonic() + self.timeout
        while qmp.execute("query-status").get("running", False):
            if time.monotonic() > deadline:
                raise SourceError(
                    f"the VM at {self.qmp_socket} still runs {self.timeout:g} s after QMP stop; check it."
                )
            time.sleep(_POLL)

    def _resume_vm(self, qmp: QmpClient, record: dict[str, Any] | None) -> None:
        if record is None or not record.get("was_running", True):
            # Not stopped by us, or it was paused before we stopped it: leave it as it was.
            return
        status = qmp.execute("query-status")
        if status.get("running", False):
            return
        try:
            qmp.execute("cont")
        except SourceError as err:
            raise SourceError(
                f"the VM at {self.qmp_socket} cannot continue (status {status.get('status')!r}): "
                f"{err.fields.get('desc', err)}. Start it again by hand.",
                desc=err.fields.get("desc", ""),
            ) from err

    def _stop_exports(self, qmp: QmpClient) -> None:
        record = self._load_record() or {
            "version": RECORD_VERSION,
            "kind": "storage-daemon",
            "stopped_at": time.time(),
            "exports": [],
        }
        graph = self._graph(qmp)
        exports = self._guest_exports(qmp, graph)
        foreign = [e for e in exports if e.get("type") != "nbd"]
        if foreign:
            raise SourceError(
                f"the storage daemon at {self.qmp_socket} exports the machine's disks as "
                f"{sorted({e['type'] for e in foreign})} ({sorted(e['id'] for e in foreign)}); QEMU "
                "does not report their settings, so they could not be re-created. Stop those "
                "clients yourself, or export the disks over NBD only."
            )
        by_id = {e["id"]: e for e in record["exports"]}
        node_disk = {node: disk for disk, node in self.disks.items()}
        for exp in exports:
            entry = by_id.get(exp["id"])
            if entry is None:
                disk_node = graph.writes_into(exp["node-name"], set(node_disk)) or exp["node-name"]
                entry = {
                    "id": exp["id"],
                    "type": exp["type"],
                    "disk": node_disk.get(disk_node, disk_node),
                    "disk_node": disk_node,
                    "node": exp["node-name"],
                    "candidates": None,
                    "settings": None,
                    "recovered_by": None,
                }
                record["exports"].append(entry)
                by_id[exp["id"]] = entry
            if not exp.get("shutting-down"):
                entry["candidates"] = self._candidates()
            self._save_record(record)
            with contextlib.suppress(SourceError):
                # Already being deleted (shutting down) or gone: the wait below decides.
                qmp.execute("block-export-del", id=exp["id"], mode="hard")
            self._wait_exports_gone(qmp, {exp["id"]})
            self._resolve(entry, record, self._candidates())
            self._save_record(record)
        unresolved = [e for e in record["exports"] if e.get("settings") is None]
        if unresolved:
            # A crash between deleting an export and recording its settings.
            after = self._candidates()
            for entry in unresolved:
                self._resolve(entry, record, after)
            self._save_record(record)

    def _resume_exports(self, qmp: QmpClient, record: dict[str, Any] | None) -> None:
        present = {e["id"]: e for e in qmp.execute("query-block-exports")}
        # Writers left open (a crashed process) must not write alongside the guest's clients.
        stale = [i for i in present if i.startswith(WRITER_EXPORT_PREFIX)]
        for export_id in stale:
            with contextlib.suppress(SourceError):
                qmp.execute("block-export-del", id=export_id, mode="hard")
        self._wait_exports_gone(qmp, set(stale))
        if record is None:
            return
        if record.get("kind") != "storage-daemon":
            raise SourceError(
                f"{self._record_path()} records a stopped {record.get('kind')!r}, but {self.qmp_socket} "
                "is a storage daemon; the machine was replaced. Check it and delete the record."
            )
        graph = self._graph(qmp)
        for entry in record["exports"]:
            if entry["id"] in present:
                continue
            if entry.get("settings") is None:
                self._resolve(entry, record, self._candidates())
            settings = entry["settings"]
            args: dict[str, Any] = {
                "type": "nbd",
                "id": entry["id"],
                "node-name": graph.top(entry["disk_node"]),
                "name": settings["name"],
                "writable": bool(settings["writable"]),
            }
            if settings.get("description"):
                args["description"] = settings["description"]
            if settings.get("bitmaps"):
                args["bitmaps"] = list(settings["bitmaps"])
            if settings.get("allocation_depth"):
                args["allocation-depth"] = True
            try:
                qmp.execute("block-export-add", **args)
            except SourceError as err:
                raise SourceError(
                    f"cannot re-create export {entry['id']!r} (NBD name {settings['name']!r}) of disk "
                    f"{entry['disk']!r}: {err.fields.get('desc', err)}. The record {self._record_path()} "
                    "is kept; fix the cause and call resume_writes() again.",
                    desc=err.fields.get("desc", ""),
                ) from err

    def _resolve(
        self, entry: dict[str, Any], record: dict[str, Any], after: dict[str, dict[str, Any]] | None
    ) -> None:
        """Decide the NBD settings of a deleted export (see the module docstring)."""
        if entry.get("settings") is not None:
            return
        before = entry.get("candidates")
        if before is not None and after is not None:
            taken = {e["settings"]["name"] for e in record["exports"] if e is not entry and e.get("settings")}
            gone = set(before) - set(after) - taken
            if len(gone) == 1:
                entry["settings"] = dict(before[gone.pop()])
                entry["recovered_by"] = "nbd-listing"
                return
        known = (before or {}).get(entry["disk"])
        entry["settings"] = (
            dict(known)
            if known
            else {
                "name": entry["disk"],
                "description": "",
                "writable": True,
                "bitmaps": [],
                "allocation_depth": False,
            }
        )
        entry["recovered_by"] = "inventory-name"

    def _candidates(self) -> dict[str, dict[str, Any]] | None:
        catalog = _nbd_catalog(self.nbd_socket)
        if catalog is None:
            return None
        return {n: s for n, s in catalog.items() if not n.startswith(_OUR_NBD_NAMES)}

    # -- QEMU helpers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _qmp(self) -> Iterator[QmpClient]:
        qmp = QmpClient(self.qmp_socket, timeout=self.timeout)
        try:
            yield qmp
        finally:
            qmp.close()

    def _detect_kind(self, qmp: QmpClient) -> MachineKind:
        if self._kind is not None:
            return self._kind
        try:
            qmp.execute("query-status")
            kind: MachineKind = "vm"
        except SourceError as err:
            if not _is_command_not_found(err):
                raise
            kind = "storage-daemon"
        self._kind = kind
        return kind

    def _graph(self, qmp: QmpClient) -> _Graph:
        try:
            return _Graph(qmp.execute("x-debug-query-block-graph"))
        except SourceError as err:
            if _is_command_not_found(err):
                return _Graph(None)
            raise

    def _guest_exports(self, qmp: QmpClient, graph: _Graph) -> list[dict[str, Any]]:
        """Exports whose writes reach one of the machine's disk nodes, ours excepted."""
        nodes = set(self.disks.values())
        return [
            e
            for e in qmp.execute("query-block-exports")
            if not e["id"].startswith(_OUR_EXPORT_IDS) and graph.writes_into(e["node-name"], nodes)
        ]

    def _wait_exports_gone(self, qmp: QmpClient, ids: set[str]) -> None:
        deadline = time.monotonic() + self.timeout
        while ids & {e["id"] for e in qmp.execute("query-block-exports")}:
            if time.monotonic() > deadline:
                raise SourceError(
                    f"exports {sorted(ids)} of {self.qmp_socket} were not gone {self.timeout:g} s after "
                    "block-export-del; a client may hang. Try again."
                )
            time.sleep(_POLL)

    def _node(self, disk: str) -> str:
        if disk not in self.disks:
            raise NotFound(kind="disk", name=disk, hint=f" This machine's disks are {sorted(self.disks)}.")
        return self.disks[disk]

    def _ensure_nbd_server(self, qmp: QmpClient) -> str:
        with self._lock:
            if self.nbd_socket is not None and self._own_nbd is None:
                self._writers += 1
                return self.nbd_socket
            path = self.state_dir / "nbd.sock"
            self.state_dir.mkdir(parents=True, exist_ok=True)
            # A socket file in our state dir is a server started by an earlier writer of ours.
            start_nbd_server(qmp, path, ours_if_running=self._own_nbd is not None or path.exists())
            self._own_nbd = str(path)
            self._writers += 1
            return str(path)

    def _release_nbd_server(self, qmp: QmpClient) -> None:
        with self._lock:
            self._writers = max(0, self._writers - 1)
            if self._writers or self._own_nbd is None:
                return
            self._own_nbd = None
        with contextlib.suppress(SourceError):
            qmp.execute("nbd-server-stop")

    def _remove_writer_export(self, export_id: str) -> None:
        with self._qmp() as qmp:
            with contextlib.suppress(SourceError):
                qmp.execute("block-export-del", id=export_id, mode="hard")
            self._wait_exports_gone(qmp, {export_id})
            self._release_nbd_server(qmp)

    def _listening(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.reach_timeout)
        try:
            sock.connect(self.qmp_socket)
        except OSError:
            return False
        finally:
            sock.close()
        return True

    # -- the stop record --------------------------------------------------------------------

    def _record_path(self) -> Path:
        return self.state_dir / STOPPED_RECORD

    def _load_record(self) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self._record_path().read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise SourceError(
                f"the stop record {self._record_path()} is unreadable ({err}); check the machine's "
                "exports by hand, then delete the record."
            ) from err
        if record.get("version") != RECORD_VERSION:
            raise SourceError(
                f"the stop record {self._record_path()} has version {record.get('version')!r}; this "
                f"version reads {RECORD_VERSION}. Resume the machine with the version that stopped it."
            )
        return record

    def _save_record(self, record: dict[str, Any]) -> None:
        write_atomic(self._record_path(), json.dumps(record, indent=1).encode(), make_parents=True)

    def _remove_record(self) -> None:
        try:
            self._record_path().unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.state_dir)
