"""Disk writers over NBD, and image files opened for writing through a temporary QEMU.

:class:`NbdDiskWriter` is the :class:`~siterecovery.ports.compute.DiskWriter` of a writable NBD
export (a machine's disk exported by its own QEMU, or an image served by :func:`serve_image`).
Each thread writes over its own connection (``nbd.HandlePool``); ``flush()`` flushes every
connection, which is what makes their writes durable.

:func:`serve_image` exports one image file (qcow2 or raw) writable over NBD from a private
``qemu-storage-daemon``: the only correct way to write a qcow2 file's guest-visible contents
without QEMU's block layer in between. Layout of its run directory (a fresh ``/tmp/sr-img-*``,
short enough for unix socket paths, removed on exit)::

    nbd.sock     the NBD server; one writable export named "disk"
    daemon.log   the daemon's output (quoted in errors)

The file node is opened with ``O_DIRECT`` (``cache.direct=on``, ``aio=native``) where the file
system supports it: bulk writes then skip the page cache, which on the hosts we measured costs
more CPU than the copy itself (see ``dataplane/materialize.py`` for figures). The daemon takes
QEMU's image lock, so an image that a running machine holds open is refused instead of being
corrupted. On exit the daemon gets SIGTERM, on which QEMU flushes and closes the image cleanly
(qcow2 metadata included); if it does not exit in time it is killed and the exit raises, since
the image may then be incomplete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd

from siterecovery.adapters.compute.raw import RawFileWriter
from siterecovery.adapters.sources import nbd as nbdio
from siterecovery.errors import InvalidInput, NotFound, SourceError, StorageFull
from siterecovery.ports.compute import DiskWriter

DAEMON_BINARY = "qemu-storage-daemon"
EXPORT_NAME = "disk"
# NBD request lengths are 32-bit; zero large ranges in 1 GiB requests.
_ZERO_REQUEST = 1 << 30


class NbdDiskWriter:
    """A DiskWriter over a writable NBD export (see the module docstring)."""

    def __init__(self, socket_path: str, export_name: str) -> None:
        self.socket_path = str(socket_path)
        self.export_name = export_name
        self._pool = nbdio.HandlePool(self.socket_path, export_name)
        try:
            h = self._pool.handle()
            if h.is_read_only():
                raise SourceError(
                    f"NBD export {export_name!r} on {socket_path} is read-only; in-place writes need "
                    "a writable export."
                )
            self.size = int(h.get_size())
            self._can_zero = bool(h.can_zero())
        except BaseException:
            self._pool.close()
            raise

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(
                f"range of {length} bytes at {offset} is outside export {self.export_name!r} (size "
                f"{self.size}); allowed is 0 <= offset and offset + length <= size."
            )

    def _fail(self, what: str, err: nbd.Error) -> SourceError:
        # libnbd does not always carry the server's errno: its message names it.
        if err.errno == errno.ENOSPC or "ENOSPC" in str(err):
            return StorageFull(where=f"NBD export {self.export_name!r}", detail=f"{what}: {err}")
        return SourceError(f"NBD {what} on export {self.export_name!r} ({self.socket_path}) failed: {err}.")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        return self._pool.pread(offset, length)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        h = self._pool.handle()
        try:
            # libnbd takes any buffer: slices of a memoryview are sent without a copy.
            for pos in range(0, len(view), nbdio.IO_SIZE):
                h.pwrite(view[pos : pos + nbdio.IO_SIZE], offset + pos)
        except nbd.Error as err:
            raise self._fail(f"write of {len(view)} bytes at {offset}", err) from err

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if not self._can_zero:
            zeros = bytes(min(length, nbdio.IO_SIZE))
            for pos in range(offset, offset + length, len(zeros) or 1):
                self.write(zeros[: min(len(zeros), offset + length - pos)], pos)
            return
        h = self._pool.handle()
        try:
            # No NBD_CMD_FLAG_NO_HOLE: the server may deallocate, which keeps images sparse.
            for pos in range(offset, offset + length, _ZERO_REQUEST):
                h.zero(min(_ZERO_REQUEST, offset + length - pos), pos)
        except nbd.Error as err:
            raise self._fail(f"write of {length} zero bytes at {offset}", err) from err

    def flush(self) -> None:
        self._pool.flush()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> NbdDiskWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def supports_direct_io(path: Path) -> bool:
    """True when ``path`` can be opened with O_DIRECT (not on tmpfs, for instance)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return False
    os.close(fd)
    return True


def _daemon_command(image: Path, fmt: str, socket_path: Path, direct: bool) -> list[str]:
    file_node: dict[str, Any] = {
        "driver": "file",
        "node-name": "image-file",
        "filename": str(image),
        "discard": "unmap",
        "cache": {"direct": direct},
    }
    if direct:
        file_node["aio"] = "native"
    return [
        DAEMON_BINARY,
        "--blockdev",
        json.dumps(file_node),
        "--blockdev",
        json.dumps({"driver": fmt, "node-name": EXPORT_NAME, "file": "image-file", "discard": "unmap"}),
        "--nbd-server",
        json.dumps({"addr": {"type": "unix", "path": str(socket_path)}}),
        "--export",
        json.dumps(
            {"type": "nbd", "id": "export", "node-name": EXPORT_NAME, "name": EXPORT_NAME, "writable": True}
        ),
    ]


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM (QEMU closes the image cleanly), SIGKILL after ``timeout``; True if clean."""
    if proc.poll() is not None:
        return proc.returncode == 0
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return proc.returncode == 0


@contextlib.contextmanager
def serve_image(
    image: Path | str, fmt: str, *, direct: bool | None = None, timeout: float = 30
) -> Iterator[tuple[str, str]]:
    """Serve ``image`` writable over NBD; yield ``(socket path, export name)`` (module docstring).

    ``direct`` chooses O_DIRECT for the file (default: where the file system supports it).
    """
    image = Path(image).absolute()
    if fmt not in ("qcow2", "raw"):
        raise InvalidInput(f"image format {fmt!r} is not supported: use qcow2 or raw.")
    if not image.exists():
        raise NotFound(kind="disk image", name=str(image), hint=" Create it first (qemu-img create).")
    if direct is None:
        direct = supports_direct_io(image)
    run_dir = Path(tempfile.mkdtemp(prefix="sr-img-"))
    socket_path = run_dir / "nbd.sock"
    log_path = run_dir / "daemon.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(
                    _daemon_command(image, fmt, socket_path, direct),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except FileNotFoundError as err:
                raise SourceError(
                    f"{DAEMON_BINARY} is not installed; install it (Debian: qemu-storage-daemon)."
                ) from err
        _wait_ready(proc, socket_path, log_path, image, timeout)
        yield str(socket_path), EXPORT_NAME
        if not _stop(proc, timeout):
            raise SourceError(
                f"{DAEMON_BINARY} serving {image} did not close it cleanly (exit status "
                f"{proc.returncode}): {_tail(log_path)}. The image may be incomplete; write it again."
            )
    finally:
        if proc is not None and proc.poll() is None:
            _stop(proc, timeout)
        shutil.rmtree(run_dir, ignore_errors=True)


def _tail(log_path: Path) -> str:
    try:
        return log_path.read_text(errors="replace")[-2000:].strip() or "no output"
    except OSError:
        return "no output"


def _wait_ready(
    proc: subprocess.Popen[bytes], socket_path: Path, log_path: Path, image: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SourceError(
                f"{DAEMON_BINARY} could not open {image} for writing: {_tail(log_path)}. If a "
                "running machine holds the image, stop it first."
            )
        if socket_path.exists():
            try:
                h = nbdio.connect(str(socket_path), EXPORT_NAME)
            except SourceError:
                pass
            else:
                nbdio.close_handle(h)
                return
        if time.monotonic() > deadline:
            raise SourceError(
                f"{DAEMON_BINARY} did not serve {image} within {timeout:g} s: {_tail(log_path)}."
            )
        time.sleep(0.02)


@contextlib.contextmanager
def open_image_writer(image: Path | str, fmt: str, *, direct: bool | None = None) -> Iterator[DiskWriter]:
    """A DiskWriter to an image file: raw files directly, qcow2 through :func:`serve_image`.

    The caller flushes before leaving the context when the data must be durable; the writer is
    closed (and a daemon stopped, which closes the image cleanly) on exit.
    """
    if fmt == "raw":
        writer = RawFileWriter(image)
        try:
            yield writer
        finally:
            writer.close()
        return
    with serve_image(image, fmt, direct=direct) as (socket_path, export):
        nbd_writer = NbdDiskWriter(socket_path, export)
        try:
            yield nbd_writer
        finally:
            nbd_writer.close()
