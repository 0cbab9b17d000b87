"""A :class:`~siterecovery.ports.compute.DiskWriter` for raw image files and block devices.

Raw sites keep each disk as a raw file (or a block device); nothing owns it but the file system,
so in-place writes are plain ``pread``/``pwrite`` on one descriptor (thread-safe: positional I/O
does not share a file offset). ``write_zeroes`` punches a hole (``fallocate`` with
``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``) so zeroed ranges stay sparse, and falls back to
writing zeros where the file system or device cannot. Nothing is durable before ``flush()``
(``fsync``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from pathlib import Path
from typing import Any

from siterecovery.errors import InvalidInput, NotFound, SourceError, StorageFull

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_PIECE = 4 * 1024 * 1024
_ZEROS = bytes(_ZERO_PIECE)


def _load_fallocate() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` of ``fd`` so it reads as zeros; False when the file
    system or device does not support it (the caller then writes zeros)."""
    if _fallocate is None or length <= 0:
        return length <= 0
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


class RawFileWriter:
    """Positional reads and writes on an existing raw image file or block device."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotFound(
                kind="disk image", name=str(self.path), hint=" Check the disk's path in the inventory."
            ) from err
        except OSError as err:
            raise SourceError(f"cannot open {self.path} for writing: {err.strerror or err}.") from err
        # st_size is 0 for a block device; seeking to the end works for both.
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self._can_punch = True
        self._lock = threading.Lock()

    def _require_fd(self) -> int:
        fd = self._fd
        if fd is None:
            raise SourceError(f"the writer of {self.path} is closed; open a new one.")
        return fd

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(
                f"range of {length} bytes at {offset} is outside {self.path} (size {self.size}); "
                "allowed is 0 <= offset and offset + length <= size."
            )

    def _fail(self, what: str, err: OSError) -> SourceError:
        if err.errno == errno.ENOSPC:
            return StorageFull(where=str(self.path.parent), detail=f"{what} {self.path}: {err}")
        return SourceError(f"cannot {what} {self.path}: {err.strerror or err}.")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        fd = self._require_fd()
        parts: list[bytes] = []
        pos, end = offset, offset + length
        try:
            while pos < end:
                piece = os.pread(fd, end - pos, pos)
                if not piece:
                    # A file shorter than at open time: what is gone reads as zeros.
                    parts.append(bytes(end - pos))
                    break
                parts.append(piece)
                pos += len(piece)
        except OSError as err:
            raise self._fail("read", err) from err
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        fd = self._require_fd()
        try:
            while len(view):
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as err:
            raise self._fail("write", err) from err

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        fd = self._require_fd()
        try:
            if self._can_punch and punch_hole(fd, offset, length):
                return
            self._can_punch = False
            end = offset + length
            while offset < end:
                n = min(_ZERO_PIECE, end - offset)
                self.write(_ZEROS[:n], offset)
                offset += n
        except OSError as err:
            raise self._fail("zero a range of", err) from err

    def flush(self) -> None:
        try:
            os.fsync(self._require_fd())
        except OSError as err:
            raise self._fail("flush", err) from err

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> RawFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
