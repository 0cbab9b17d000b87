"""In-place resync: make a disk byte-identical to a recovery point, moving only what differs.

Reprotect and failback write a recovery point back onto disks that already hold most of it (the
original machine's disks, stopped since the failover). Instead of writing the whole point,
:func:`sync_disk_to_point` works chunk by chunk, with the datastore's chunk size and codec:

=====================================  ==========================================================
chunk                                  what happens
=====================================  ==========================================================
covered by ``known_changed``           the point's chunk is written (or zeroed) without reading
                                       the target: these are writes the target is known to lack
                                       (a dirty bitmap), so comparing would only cost a read
any other chunk                        the target's chunk is read and its id computed (keyed
                                       BLAKE3, ``ZERO_ID`` for all zeros, exactly as replication
                                       names chunks); only if the id differs from the point's
                                       index entry is the point's chunk written (or zeroed)
=====================================  ==========================================================

The last chunk of a disk may be shorter than the chunk size; it is read, hashed and written
with its real length, as replication hashed it. A chunk whose point entry is ``ZERO_ID`` is
written with ``write_zeroes`` (which lets the target deallocate it) and counted in
``bytes_zeroed``, not ``bytes_sent``.

Work is cut into blocks of :data:`BLOCK_CHUNKS` chunks handled by a thread pool (target reads,
BLAKE3, AES-GCM and zstd release the GIL); at most ``2 * threads`` blocks are in flight, so
memory stays around ``4 * threads`` block sizes whatever the disk size. Blocks are disjoint, so
their writes never overlap. The target is flushed once at the end: the disk equals the point
only when the function returns.

Cancellation (``cancel`` set) raises ``InterruptedError`` between blocks; the target is then
partly synced, and a later run finishes the job (it compares again, so nothing is lost).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

from siterecovery.dataplane.chunk_codec import ID_SIZE, ZERO_ID, is_zero
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import FANOUT, IndexRef
from siterecovery.errors import DatastoreError, InvalidInput, OutOfRange
from siterecovery.ports.compute import DiskWriter
from siterecovery.ports.source import Extent, coalesce

BLOCK_CHUNKS = 64  # chunks per work item: 4 MiB at 64 KiB chunks; divides FANOUT
assert FANOUT % BLOCK_CHUNKS == 0

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class SyncStats:
    """What a resync did. ``compared``: read from the target and hashed; ``sent``: point data
    written; ``zeroed``: ranges made zero with write_zeroes."""

    bytes_compared: int = 0
    bytes_sent: int = 0
    bytes_zeroed: int = 0
    chunks_compared: int = 0
    chunks_sent: int = 0
    chunks_zeroed: int = 0
    seconds: float = 0.0

    def add(self, other: SyncStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _chunk_ranges(extents: Iterable[Extent], chunk_size: int, size: int) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[first, end)`` chunk-number ranges covering ``extents`` on the disk."""
    out: list[tuple[int, int]] = []
    for ext in coalesce((e for e in extents if e.offset < size), chunk_size, size):
        out.append((ext.offset // chunk_size, -(-ext.end // chunk_size)))
    return out


def _forced_masks(ranges: list[tuple[int, int]], n: int) -> Iterator[list[bool]]:
    """Per block of BLOCK_CHUNKS chunks, which chunks lie in ``ranges``."""
    i = 0
    for first in range(0, n, BLOCK_CHUNKS):
        end = min(n, first + BLOCK_CHUNKS)
        mask = [False] * (end - first)
        while i < len(ranges) and ranges[i][1] <= first:
            i += 1
        j = i
        while j < len(ranges) and ranges[j][0] < end:
            lo, hi = max(ranges[j][0], first), min(ranges[j][1], end)
            for k in range(lo - first, hi - first):
                mask[k] = True
            j += 1
        yield mask


def _runs(numbers: list[int]) -> Iterator[list[int]]:
    """Split sorted numbers into runs of consecutive values."""
    run: list[int] = []
    for no in numbers:
        if run and no != run[-1] + 1:
            yield run
            run = []
        run.append(no)
    if run:
        yield run


class _Syncer:
    def __init__(self, datastore: Datastore, ref: IndexRef, target: DiskWriter) -> None:
        self.datastore = datastore
        self.codec = datastore.codec
        self.ref = ref
        self.target = target
        self.cs = ref.chunk_size
        self.size = ref.size

    def length(self, chunk_no: int) -> int:
        return min(self.cs, self.size - chunk_no * self.cs)

    def point_chunk(self, chunk_no: int, chunk_id: bytes) -> bytes:
        data = self.datastore.read_chunk(chunk_id)
        want = self.length(chunk_no)
        if len(data) < want:
            raise DatastoreError(
                f"chunk {chunk_no} of the point ({chunk_id.hex()}) holds {len(data)} bytes where the "
                f"disk needs {want}; the datastore is inconsistent. Run a datastore verify."
            )
        return data[:want]

    def block(self, first: int, ids: list[bytes], forced: list[bool]) -> SyncStats:
        """Sync chunks ``first .. first+len(ids)-1`` (see the module docstring)."""
        stats = SyncStats()
        todo = [i for i in range(len(ids)) if forced[i]]
        for run in _runs([i for i in range(len(ids)) if not forced[i]]):
            start = (first + run[0]) * self.cs
            end = min(self.size, (first + run[-1] + 1) * self.cs)
            data = memoryview(self.target.read(start, end - start))
            for i in run:
                pos = (first + i) * self.cs - start
                piece = data[pos : pos + self.length(first + i)]
                stats.bytes_compared += len(piece)
                stats.chunks_compared += 1
                cid = ZERO_ID if is_zero(piece) else self.codec.chunk_id(piece)
                if cid != ids[i]:
                    todo.append(i)
        todo.sort()
        # Write runs of consecutive chunks of one kind (data or zeros) with one request each.
        zero = [i for i in todo if ids[i] == ZERO_ID]
        data_chunks = [i for i in todo if ids[i] != ZERO_ID]
        for run in _runs(zero):
            start = (first + run[0]) * self.cs
            length = min(self.size, (first + run[-1] + 1) * self.cs) - start
            self.target.write_zeroes(start, length)
            stats.bytes_zeroed += length
            stats.chunks_zeroed += len(run)
        for run in _runs(data_chunks):
            buf = b"".join(self.point_chunk(first + i, ids[i]) for i in run)
            self.target.write(buf, (first + run[0]) * self.cs)
            stats.bytes_sent += len(buf)
            stats.chunks_sent += len(run)
        return stats


def sync_disk_to_point(
    datastore: Datastore,
    ref: IndexRef,
    target: DiskWriter,
    *,
    known_changed: list[Extent] | None = None,
    threads: int = 2,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> SyncStats:
    """Make ``target`` byte-identical to the disk of ``ref`` (see the module docstring)."""
    started = time.monotonic()
    if target.size != ref.size:
        raise InvalidInput(
            f"the target disk has {target.size} bytes but the recovery point's disk has {ref.size}; "
            "a resync needs disks of equal size. Resize the target to the point's size first, or "
            "fail over to a new disk."
        )
    if threads < 1:
        raise OutOfRange(field="threads", value=threads, allowed="1 or more")
    syncer = _Syncer(datastore, ref, target)
    reader = datastore.index_reader(ref)
    n = ref.chunks
    forced = _chunk_ranges(known_changed or [], ref.chunk_size, ref.size)
    stats = SyncStats()
    done = 0

    def consume(item: tuple[int, Future[SyncStats]]) -> None:
        nonlocal done
        end, fut = item
        stats.add(fut.result())
        done = end
        if progress is not None:
            progress(done, ref.size)

    window = 2 * threads
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resync") as pool:
        pending: deque[tuple[int, Future[SyncStats]]] = deque()
        try:
            body = b""
            for first, mask in zip(range(0, n, BLOCK_CHUNKS), _forced_masks(forced, n), strict=True):
                if cancel is not None and cancel.is_set():
                    raise InterruptedError("resync cancelled")
                slot = first % FANOUT
                if slot == 0:
                    body = reader.page_body_at(0, first // FANOUT)
                ids = [body[(slot + i) * ID_SIZE : (slot + i + 1) * ID_SIZE] for i in range(len(mask))]
                end = min(ref.size, (first + len(mask)) * ref.chunk_size)
                pending.append((end, pool.submit(syncer.block, first, ids, mask)))
                if len(pending) >= window:
                    consume(pending.popleft())
            while pending:
                consume(pending.popleft())
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            raise
    target.flush()
    if progress is not None:
        progress(ref.size, ref.size)
    stats.seconds = time.monotonic() - started
    return stats
