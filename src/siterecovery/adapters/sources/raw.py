"""The raw source: raw image files or block devices read in place.

There is no change tracking and no point-in-time capture here: a snapshot is a *live* view
(``point_in_time`` False, ``tracking`` "none", ``changed_extents()`` None), so the engine reads
and hash-compares everything, and a view read while something writes the disk is fuzzy, not
crash-consistent. Use it for images of stopped machines or with writers quiesced.

* Reads use ``os.pread`` on one descriptor per disk, which is safe from many threads at once
  (no shared file position). ``read_into`` (what the agent uses) reads aligned requests through
  a second descriptor opened with ``O_DIRECT``: the data goes straight into the agent's buffer,
  neither copied through the page cache nor evicting the host's cached data on its way (a
  machine's whole disk would). Linux writes back dirty cached pages of the range before a
  direct read, so it sees what buffered writers wrote. Where ``O_DIRECT`` is not supported
  or a request is not aligned, the buffered descriptor serves it.
* ``allocated_extents()`` walks ``SEEK_DATA``/``SEEK_HOLE`` so holes of sparse files are
  skipped; where the filesystem or a block device does not support them, the whole disk is
  one extent.
* A block device's size is found by seeking to its end (``st_size`` is 0 for devices).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from siterecovery.errors import InvalidInput, NotFound, SourceError
from siterecovery.ports.source import Extent

_READ_PIECE = 4 * 1024 * 1024
_DIRECT_ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks


class RawDiskView:
    """One raw image file or block device, read live."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotFound(kind="disk image", name=str(self.path), hint=f" (disk {name!r})") from err
        except OSError as err:
            raise SourceError(f"cannot open disk {name!r} at {self.path}: {err.strerror}.") from err
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size
        self._lock = threading.Lock()
        self._direct_fd = -1
        with contextlib.suppress(OSError):  # not supported here: buffered reads only
            self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(
                f"read of {length} bytes at {offset} is outside disk {self.name!r} "
                f"(size {self.size}); allowed is 0 <= offset, offset + length <= size."
            )
        parts: list[bytes] = []
        pos, end = offset, offset + length
        try:
            while pos < end:
                data = os.pread(self._fd, min(_READ_PIECE, end - pos), pos)
                if not data:
                    # The file shrank under us; what is gone reads as zeros like a hole.
                    parts.append(bytes(end - pos))
                    break
                parts.append(data)
                pos += len(data)
        except OSError as err:
            raise SourceError(
                f"read of disk {self.name!r} ({self.path}) at {pos} failed: {err.strerror}."
            ) from err
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise InvalidInput(
                f"read of {length} bytes at {offset} is outside disk {self.name!r} "
                f"(size {self.size}); allowed is 0 <= offset, offset + length <= size."
            )
        direct = self._direct_fd >= 0 and not (offset | length) % _DIRECT_ALIGN
        pos = 0
        try:
            while pos < length:
                try:
                    n = os.preadv(self._direct_fd if direct else self._fd, [buf[pos:]], offset + pos)
                except OSError as err:
                    if not direct or err.errno != errno.EINVAL:
                        raise
                    direct = False  # the buffer or the device's block size does not suit it
                    continue
                if n == 0:
                    # The file shrank under us; what is gone reads as zeros like a hole.
                    buf[pos:] = bytes(length - pos)
                    break
                pos += n
        except OSError as err:
            raise SourceError(
                f"read of disk {self.name!r} ({self.path}) at {offset + pos} failed: {err.strerror}."
            ) from err

    def allocated_extents(self) -> Iterator[Extent]:
        if self.size == 0:
            return
        if self._is_block:
            yield Extent(0, self.size)
            return
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data after pos
                    return
                if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    yield Extent(pos, self.size - pos)
                    return
                raise SourceError(f"cannot map data of {self.path}: {err.strerror}.") from err
            if start >= self.size:
                return
            end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
            yield Extent(start, end - start)
            pos = end

    def changed_extents(self) -> list[Extent] | None:
        return None

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._direct_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._direct_fd = -1


class RawSnapshot:
    """A live view of raw disks; commit/abort have nothing to record."""

    point_in_time = False
    tracking = "none"

    def __init__(self, disks: dict[str, Path]) -> None:
        self.captured_at = time.time()
        self.disks: dict[str, RawDiskView] = {}
        try:
            for name, path in disks.items():
                self.disks[name] = RawDiskView(name, path)
        except BaseException:
            self.close()
            raise

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def close(self) -> None:
        for view in self.disks.values():
            view.close()

    def __enter__(self) -> RawSnapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        self.close()


class RawSource:
    """Raw image files / block devices: ``disks`` maps disk name -> path."""

    def __init__(self, disks: dict[str, Path]) -> None:
        if not disks:
            raise InvalidInput("a raw source needs at least one disk: give {disk name: path}.")
        self.disks = {name: Path(p) for name, p in disks.items()}

    def snapshot(self, disks: list[str]) -> RawSnapshot:
        if not disks:
            raise InvalidInput(f"name at least one disk to snapshot; this machine has {sorted(self.disks)}.")
        for name in disks:
            if name not in self.disks:
                raise NotFound(
                    kind="disk", name=name, hint=f" This machine's disks are {sorted(self.disks)}."
                )
        return RawSnapshot({name: self.disks[name] for name in disks})

    def reset_tracking(self) -> None:
        return None

    def close(self) -> None:
        return None
