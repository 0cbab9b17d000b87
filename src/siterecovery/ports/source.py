"""The source port: reading a machine's disks at a point in time.

A *source* is one protectable machine at a site (a QEMU process or qemu-storage-daemon reached
over QMP, or raw image files / block devices). Replication asks it for a :class:`Snapshot`: a
view of all of the machine's disks at one moment, plus, per disk, which extents changed since
the previous committed snapshot when the source can tell (dirty bitmaps).

Contract for the replication engine:

* ``snapshot()`` captures the view of *all* disks together. ``Snapshot.point_in_time`` says
  whether the view is frozen at the capture instant (QEMU fleecing: True) or is the live disk
  read over time (raw files: False). Only a point-in-time view is crash-consistent; a live view
  is crash-consistent only if the writers were quiesced for the whole read.
* ``DiskView.changed_extents()`` returns the extents written since the previous committed
  snapshot, or ``None`` when that is unknown (first snapshot, lost or inconsistent bitmap, raw
  files): the engine then compares chunk hashes against the previous recovery point.
* Exactly one of ``commit()`` (the point was stored: start tracking from this snapshot) or
  ``abort()`` (the point was not stored: keep every change since the previous committed
  snapshot tracked) must be called; ``close()`` releases the view and is idempotent. Using the
  snapshot as a context manager calls ``abort()`` on an exception and ``close()`` always.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(extents: Iterable[Extent], align: int = 1, size: int | None = None) -> list[Extent]:
    """Sort, widen to ``align`` boundaries (clipped to ``size``), and merge touching extents."""
    widened: list[tuple[int, int]] = []
    for ext in extents:
        if ext.length <= 0:
            continue
        start = ext.offset - ext.offset % align
        end = -(-ext.end // align) * align
        if size is not None:
            end = min(end, size)
        widened.append((start, end))
    widened.sort()
    out: list[Extent] = []
    cur_start = cur_end = -1
    for start, end in widened:
        if start <= cur_end:
            cur_end = max(cur_end, end)
            continue
        if cur_end > cur_start:
            out.append(Extent(cur_start, cur_end - cur_start))
        cur_start, cur_end = start, end
    if cur_end > cur_start:
        out.append(Extent(cur_start, cur_end - cur_start))
    return out


def split(extents: Iterable[Extent], piece: int) -> Iterator[Extent]:
    """Cut extents into pieces of at most ``piece`` bytes (for bounded, parallel requests)."""
    for ext in extents:
        pos = ext.offset
        while pos < ext.end:
            n = min(piece, ext.end - pos)
            yield Extent(pos, n)
            pos += n


class DiskView(Protocol):
    name: str  # the disk's name in the machine's inventory (e.g. "disk0")
    size: int  # virtual size in bytes

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` from the view (holes read as zeros)."""
        ...

    def allocated_extents(self) -> Iterator[Extent]:
        """Extents that may hold data; everything outside them reads as zeros."""
        ...

    def changed_extents(self) -> list[Extent] | None:
        """Extents changed since the previous committed snapshot, or None if unknown."""
        ...


class ReadsInto(Protocol):
    """A :class:`DiskView` may also offer ``read_into``; the agent then reads into buffers it
    reuses (no allocation per read, and for raw files no copy through the page cache)."""

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the ``len(buf)`` bytes at ``offset`` (holes read as zeros).
        ``buf`` is page-aligned when ``offset`` and ``len(buf)`` are multiples of 4096."""
        ...


class Snapshot(Protocol):
    disks: dict[str, DiskView]
    point_in_time: bool
    captured_at: float  # epoch seconds of the capture instant (the recovery point's time)
    tracking: str  # "dirty-bitmap", "none" (no tracking), or "lost: <reason>"

    def commit(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Snapshot: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Source(Protocol):
    def snapshot(self, disks: list[str]) -> Snapshot:
        """Capture a view of the named disks together (see module docstring)."""
        ...

    def reset_tracking(self) -> None:
        """Forget change tracking; the next snapshot reports changed_extents() None."""
        ...

    def close(self) -> None: ...
