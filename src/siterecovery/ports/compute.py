"""The compute port: controlling a protected machine and writing its disks in place.

Failover, reprotect and failback need two things from a site besides the datastore:

* :class:`MachineControl` - make a machine stop writing to its disks and start again, tell
  whether it is reachable, power it off; used to stop the source before a planned failover (and
  start it again if the failover fails or is cancelled) and to hold a machine still while its
  disks are rewritten.
* :class:`DiskWriter` - read and write one disk in place: a disk of a stopped machine (through
  the machine's own block layer, so caches and dirty bitmaps stay right) or an image file.

Contract shared by every implementation:

* ``MachineControl.stop_writes()`` returns only when no write of the machine's own writers (its
  guest, or its storage daemon's clients) can reach its disks any more, and everything they
  wrote before is visible to a :class:`DiskWriter` of that disk. It is idempotent and safe to
  call again after a crash part-way through; what is needed to undo it survives a restart of
  the calling process (it is recorded on disk before anything is changed).
* ``MachineControl.resume_writes()`` undoes ``stop_writes()``; idempotent (a no-op when writes
  are not stopped). It ends in-place writers left open (e.g. by a crashed process): call it
  after closing the writers.
* ``MachineControl.open_writer(disk)`` refuses (``SourceError``) unless the machine's writes are
  stopped, so a guest and a resync never write the same disk at once. The writer is closed by
  the context manager.
* ``DiskWriter.read``/``write``/``write_zeroes`` may be called from several threads at once (the
  resync is parallel); writes to disjoint ranges do not interfere. Data is durable only after
  ``flush()``. ``close()`` is idempotent and does not flush.
* Errors are ``siterecovery.errors.SiteRecoveryError`` subclasses (``SourceError`` for a machine
  or disk that cannot be reached or written, ``InvalidInput`` for a range outside the disk).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal, Protocol

MachineKind = Literal["vm", "storage-daemon"]


class DiskWriter(Protocol):
    """Random access to one disk, for in-place writes (see the module docstring)."""

    size: int  # the disk's size in bytes; reads and writes stay within [0, size)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (holes read as zeros)."""
        ...

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``."""
        ...

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros, deallocating it where the storage can."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (on every connection the writer uses)."""
        ...

    def close(self) -> None:
        """Release the disk; idempotent; does not flush."""
        ...


class MachineControl(Protocol):
    """Stop and resume a machine's writes, power it off, write its disks in place."""

    def kind(self) -> MachineKind:
        """``"vm"`` (a QEMU system emulator with a guest) or ``"storage-daemon"``."""
        ...

    def stop_writes(self) -> None:
        """Stop the machine's own writers; idempotent, crash-safe (see the module docstring)."""
        ...

    def resume_writes(self) -> None:
        """Let the machine's own writers write again; idempotent."""
        ...

    def writes_stopped(self) -> bool:
        """True when none of the machine's own writers can write to its disks."""
        ...

    def is_reachable(self) -> bool:
        """True when the machine answers its control channel within a short timeout."""
        ...

    def power_off(self) -> bool:
        """Turn the machine off; True once it is gone, False if it still answers at the timeout."""
        ...

    def open_writer(self, disk: str) -> AbstractContextManager[DiskWriter]:
        """A writer to the disk named ``disk`` (inventory name); only while writes are stopped."""
        ...
