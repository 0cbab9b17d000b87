"""The stand-in VM: one ``qemu-storage-daemon`` process that owns a machine's qcow2 disks.

A QEMU VM and qemu-storage-daemon share the block layer and QMP, so the daemon behaves like a
VM for replication (dirty bitmaps, fleecing, transactions) without a guest. A workload writes
through the daemon's NBD exports as a guest would write through its virtual disks.

Layout of a run directory (``run_dir``)::

    qmp.sock     QMP monitor (unix socket; one client at a time, keep connections short)
    nbd.sock     NBD server; one writable export per disk, export name = disk name
    daemon.json  {"version": 1, "pid", "qmp_socket", "nbd_socket", "disks": {name: path},
                  "nodes": {name: node-name}}   - written atomically after start
    daemon.log   the daemon's stdout/stderr

Block graph per disk: a ``file`` node ``<node>-file`` under a ``qcow2`` node ``<node>``. The
node name is the disk name when it is a valid QEMU node name (letter first, then letters,
digits, ``-``, ``.``, ``_``; at most 31 characters), otherwise a sanitised form; ``nodes``
in daemon.json gives the mapping.

Stopping: :meth:`MachineDaemon.stop` sends QMP ``quit`` so QEMU closes the qcow2 images cleanly
and stores persistent dirty bitmaps; :meth:`MachineDaemon.kill` is SIGKILL, an unclean stop
after which QEMU loads those bitmaps as *inconsistent*. The process runs in its own session so
a terminal's Ctrl-C aimed at the caller does not take the "VM" down with it; whoever starts it
stops it (tests do so in fixtures).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from siterecovery.adapters.sources.qmp import QmpClient
from siterecovery.errors import InvalidInput, SourceError

DAEMON_BINARY = "qemu-storage-daemon"
STATE_FILE = "daemon.json"
STATE_VERSION = 1
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")


def node_name(disk: str) -> str:
    """The QEMU node name used for ``disk`` (the disk name itself when that is valid)."""
    if _NODE_NAME.match(disk):
        return disk
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", disk)
    if not safe or not safe[0].isalpha():
        safe = "d" + safe
    # Leave room for the "-file" suffix of the protocol node.
    return safe[:26]


def create_qcow2(path: Path | str, size: int) -> Path:
    """Create an empty qcow2 image of ``size`` bytes with qemu-img."""
    path = Path(path)
    if size <= 0 or size % 512:
        raise InvalidInput(f"disk size {size} is not allowed: use a positive multiple of 512 bytes.")
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SourceError(f"qemu-img create {path} failed: {proc.stderr.strip()}")
    return path


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise InvalidInput(
            f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes, the limit of unix "
            "sockets; use a shorter run directory."
        )


def _pid_alive(pid: int) -> bool:
    """True while any thread of process ``pid`` still runs.

    The main thread of a multi-threaded process that is exiting shows as a zombie before its
    other threads have finished (they may still hold the images' locks), so every task counts.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The state letter follows the parenthesised command name; a zombie has exited.
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            return True
    return False


class MachineDaemon:
    """Controls one qemu-storage-daemon process (see the module docstring)."""

    def __init__(self, run_dir: Path, disks: dict[str, Path]) -> None:
        if not disks:
            raise InvalidInput("a machine needs at least one disk; give disks as {name: qcow2 path}.")
        self.run_dir = Path(run_dir).resolve()
        self.disks = {name: Path(p).resolve() for name, p in disks.items()}
        self.nodes = {name: node_name(name) for name in self.disks}
        if len(set(self.nodes.values())) != len(self.nodes):
            raise InvalidInput(
                f"disk names {sorted(self.disks)} map to clashing QEMU node names; rename the disks."
            )
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def qmp_socket(self) -> str:
        return str(self.run_dir / "qmp.sock")

    @property
    def nbd_socket(self) -> str:
        return str(self.run_dir / "nbd.sock")

    @property
    def log_path(self) -> Path:
        return self.run_dir / "daemon.log"

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def start(cls, run_dir: Path, disks: dict[str, Path], timeout: float = 30) -> MachineDaemon:
        """Start a daemon for ``disks`` in ``run_dir`` and wait until QMP answers."""
        daemon = cls(run_dir, disks)
        daemon._launch(timeout)
        return daemon

    @classmethod
    def attach(cls, run_dir: Path) -> MachineDaemon:
        """Control a daemon started by another process, found through ``run_dir/daemon.json``."""
        state_path = Path(run_dir) / STATE_FILE
        try:
            state = json.loads(state_path.read_text())
        except FileNotFoundError as err:
            raise SourceError(
                f"no machine daemon state at {state_path}; start the daemon first "
                "(MachineDaemon.start) or give its run directory."
            ) from err
        except json.JSONDecodeError as err:
            raise SourceError(f"{state_path} is not valid JSON ({err}); restart the daemon.") from err
        if state.get("version") != STATE_VERSION:
            raise SourceError(
                f"{state_path} has format version {state.get('version')!r}; this version reads "
                f"{STATE_VERSION}. Restart the daemon with this version."
            )
        daemon = cls(Path(run_dir), {k: Path(v) for k, v in state["disks"].items()})
        daemon.pid = int(state["pid"])
        return daemon

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and _pid_alive(self.pid) and self._is_our_process(self.pid)

    def stop(self, timeout: float = 10) -> None:
        """Clean stop: QMP ``quit`` (bitmaps are stored), then SIGKILL if it does not exit."""
        if not self.is_running():
            self._reap()
            return
        try:
            with QmpClient(self.qmp_socket, timeout=timeout) as qmp:
                qmp.execute("quit")
        except SourceError:
            # The monitor may close before answering quit; the wait below decides.
            pass
        if not self._wait_exit(timeout):
            self.kill()
            return
        self._reap()

    def kill(self) -> None:
        """Unclean stop (SIGKILL): persistent dirty bitmaps become inconsistent."""
        if self.pid is not None and self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait_exit(10)
        self._reap()

    def restart(self, timeout: float = 30) -> MachineDaemon:
        """Start again with the same disks (stopping cleanly first if it runs)."""
        self.stop()
        self._launch(timeout)
        return self

    # -- internals --------------------------------------------------------------------------

    def _is_our_process(self, pid: int) -> bool:
        # Guards against pid reuse after the daemon exited.
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if not raw:
            # An exiting process has already released its memory (and so its cmdline) but has
            # not exited yet: still ours.
            return True
        cmdline = raw.split(b"\0")
        return os.path.basename(cmdline[0]) == DAEMON_BINARY.encode() and any(
            os.fsencode(self.qmp_socket) in arg for arg in cmdline
        )

    def _command(self) -> list[str]:
        qmp = Path(self.qmp_socket)
        nbd = Path(self.nbd_socket)
        args = [
            DAEMON_BINARY,
            "--chardev",
            f"socket,id=qmp0,path={qmp},server=on,wait=off",
            "--monitor",
            "chardev=qmp0",
        ]
        for name, path in self.disks.items():
            node = self.nodes[name]
            args += [
                "--blockdev",
                json.dumps(
                    {
                        "driver": "qcow2",
                        "node-name": node,
                        "discard": "unmap",
                        "file": {
                            "driver": "file",
                            "node-name": f"{node}-file",
                            "filename": str(path),
                            "discard": "unmap",
                        },
                    }
                ),
            ]
        args += ["--nbd-server", json.dumps({"addr": {"type": "unix", "path": str(nbd)}})]
        for name in self.disks:
            args += [
                "--export",
                json.dumps(
                    {
                        "type": "nbd",
                        "id": f"export-{self.nodes[name]}",
                        "node-name": self.nodes[name],
                        "name": name,
                        "writable": True,
                    }
                ),
            ]
        return args

    def _launch(self, timeout: float) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for sock in (Path(self.qmp_socket), Path(self.nbd_socket)):
            _check_socket_path(sock)
            sock.unlink(missing_ok=True)
        for name, path in self.disks.items():
            if not path.exists():
                raise SourceError(f"disk {name!r} image {path} does not exist; create it first.")
        with open(self.log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except FileNotFoundError as err:
                raise SourceError(
                    f"{DAEMON_BINARY} is not installed; install it (Debian: qemu-system-common)."
                ) from err
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                log_tail = self.log_path.read_text(errors="replace")[-2000:]
                self._reap()
                raise SourceError(f"{DAEMON_BINARY} exited at start-up: {log_tail.strip()}")
            if os.path.exists(self.qmp_socket) and os.path.exists(self.nbd_socket):
                try:
                    with QmpClient(self.qmp_socket, timeout=5) as qmp:
                        qmp.execute("query-version")
                    break
                except SourceError:
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise SourceError(
                    f"{DAEMON_BINARY} did not answer QMP within {timeout:g} s; see {self.log_path}."
                )
            time.sleep(0.02)
        self._write_state()

    def _write_state(self) -> None:
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "pid": self.pid,
            "qmp_socket": self.qmp_socket,
            "nbd_socket": self.nbd_socket,
            "disks": {name: str(p) for name, p in self.disks.items()},
            "nodes": self.nodes,
        }
        tmp = self.run_dir / f".{STATE_FILE}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.run_dir / STATE_FILE)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=0.05)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not self.is_running():
                return True
            time.sleep(0.05)
        return not self.is_running()

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return
            self._proc = None
