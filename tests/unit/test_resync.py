"""In-place resync and point writing against an in-memory datastore and a memory disk (no I/O)."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.adapters.chunk_stores.memory import MemoryChunkStore, MemoryObjectStore
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ZERO_ID
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.materialize import write_point
from siterecovery.dataplane.resync import BLOCK_CHUNKS, SyncStats, sync_disk_to_point
from siterecovery.errors import InvalidInput
from siterecovery.ports.compute import DiskWriter
from siterecovery.ports.source import Extent


class MemoryDisk:
    """A DiskWriter over a bytearray that records every request (thread-safe)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.size = len(self.data)
        self.reads: list[Extent] = []
        self.writes: list[Extent] = []
        self.zeroes: list[Extent] = []
        self.flushes = 0
        self.closed = False
        self.lock = threading.Lock()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(f"range {offset}+{length} outside {self.size}")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        with self.lock:
            self.reads.append(Extent(offset, length))
            return bytes(self.data[offset : offset + length])

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._check(offset, len(data))
        with self.lock:
            self.writes.append(Extent(offset, len(data)))
            self.data[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        with self.lock:
            self.zeroes.append(Extent(offset, length))
            self.data[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        with self.lock:
            self.flushes += 1

    def close(self) -> None:
        self.closed = True

    def chunks_touched(self) -> set[int]:
        """Chunk numbers that a write or a zero write covered."""
        out: set[int] = set()
        for ext in self.writes + self.zeroes:
            out.update(range(ext.offset // CHUNK_SIZE, -(-ext.end // CHUNK_SIZE)))
        return out

    def chunks_read(self) -> set[int]:
        out: set[int] = set()
        for ext in self.reads:
            out.update(range(ext.offset // CHUNK_SIZE, -(-ext.end // CHUNK_SIZE)))
        return out


def _writer_type_check(disk: MemoryDisk) -> DiskWriter:
    return disk  # the fake satisfies the port (checked by mypy when run on tests)


def new_store() -> Datastore:
    return Datastore.create(MemoryChunkStore(), MemoryObjectStore(), VaultKey.generate())


def store_image(ds: Datastore, image: bytes) -> IndexRef:
    w = ds.index_writer(len(image))
    for no in range(-(-len(image) // CHUNK_SIZE)):
        chunk_id, _ = ds.store_chunk(image[no * CHUNK_SIZE : (no + 1) * CHUNK_SIZE])
        w.set(no, chunk_id)
    return w.commit()


def chunk(image: bytes | bytearray, no: int) -> bytes:
    return bytes(image[no * CHUNK_SIZE : (no + 1) * CHUNK_SIZE])


def differing(a: bytes | bytearray, b: bytes | bytearray) -> set[int]:
    n = -(-len(a) // CHUNK_SIZE)
    return {no for no in range(n) if chunk(a, no) != chunk(b, no)}


def image_of(kinds: list[int], tail: int, seed: int) -> bytearray:
    """An image with one chunk per entry of ``kinds`` (0 zeros, 1..3 patterned data), the last
    chunk ``tail`` bytes long if tail > 0."""
    rnd = random.Random(seed)
    size = len(kinds) * CHUNK_SIZE - (CHUNK_SIZE - tail if tail else 0)
    img = bytearray(size)
    for no, kind in enumerate(kinds):
        if kind:
            start = no * CHUNK_SIZE
            end = min(size, start + CHUNK_SIZE)
            img[start:end] = rnd.randbytes(end - start)
    return img


# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(st.integers(0, 2), min_size=1, max_size=BLOCK_CHUNKS + 20),
    tail=st.integers(0, CHUNK_SIZE - 1).map(lambda t: t - t % 512),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["byte", "zero", "copy", "random"])), max_size=12
    ),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_target_equals_point_and_only_differing_chunks_are_written(
    kinds: list[int], tail: int, edits: list[tuple[int, str]], threads: int, seed: int
) -> None:
    ds = new_store()
    point = image_of(kinds, tail, seed)
    ref = store_image(ds, bytes(point))
    target = bytearray(point)
    rnd = random.Random(seed + 1)
    n = len(kinds)
    for where, how in edits:
        no = where % n
        start, end = no * CHUNK_SIZE, min(len(target), (no + 1) * CHUNK_SIZE)
        if how == "byte":
            pos = start + rnd.randrange(end - start)
            target[pos] ^= 0x5A
        elif how == "zero":
            target[start:end] = bytes(end - start)
        elif how == "copy":  # another chunk's data: same bytes elsewhere must still be written
            src = rnd.randrange(n) * CHUNK_SIZE
            piece = bytes(point[src : src + (end - start)])
            target[start : start + len(piece)] = piece
        else:
            target[start:end] = rnd.randbytes(end - start)
    expected = differing(point, target)
    disk = MemoryDisk(target)

    stats = sync_disk_to_point(ds, ref, _writer_type_check(disk), threads=threads)

    assert disk.data == point
    assert disk.chunks_touched() == expected
    assert stats.chunks_sent + stats.chunks_zeroed == len(expected)
    assert stats.bytes_sent == sum(len(chunk(point, no)) for no in expected if any(chunk(point, no)))
    assert stats.bytes_zeroed == sum(len(chunk(point, no)) for no in expected if not any(chunk(point, no)))
    assert stats.bytes_compared == len(point)
    assert stats.chunks_compared == n
    assert disk.flushes == 1


def test_known_changed_chunks_are_written_without_reading() -> None:
    ds = new_store()
    kinds = [1] * 10 + [0] * 5 + [2] * 10
    point = image_of(kinds, 0, 3)
    ref = store_image(ds, bytes(point))
    target = bytearray(point)
    target[20 * CHUNK_SIZE + 5] ^= 1  # differs, not in the known set: found by comparing
    disk = MemoryDisk(target)
    # Chunks 2..4 (equal to the point!) and 11 (a zero chunk) are declared changed.
    known = [Extent(2 * CHUNK_SIZE + 100, 2 * CHUNK_SIZE), Extent(11 * CHUNK_SIZE, 1)]

    stats = sync_disk_to_point(ds, ref, disk, known_changed=known)

    assert disk.data == point
    assert disk.chunks_read().isdisjoint({2, 3, 4, 11})
    assert disk.chunks_touched() == {2, 3, 4, 11, 20}
    assert stats.chunks_compared == len(kinds) - 4
    assert stats.bytes_compared == (len(kinds) - 4) * CHUNK_SIZE
    assert stats.chunks_sent == 4 and stats.bytes_sent == 4 * CHUNK_SIZE
    assert stats.chunks_zeroed == 1 and stats.bytes_zeroed == CHUNK_SIZE


def test_known_changed_beyond_the_disk_is_ignored() -> None:
    ds = new_store()
    point = image_of([1, 1, 1], 1024, 4)
    ref = store_image(ds, bytes(point))
    disk = MemoryDisk(point)
    stats = sync_disk_to_point(ds, ref, disk, known_changed=[Extent(2 * CHUNK_SIZE, 10 * CHUNK_SIZE)])
    assert disk.data == point
    assert disk.chunks_touched() == {2}
    assert stats.bytes_sent == 1024


def test_equal_disk_sends_nothing() -> None:
    ds = new_store()
    point = image_of([1, 0, 2, 0, 1], 0, 5)
    ref = store_image(ds, bytes(point))
    disk = MemoryDisk(point)
    stats = sync_disk_to_point(ds, ref, disk)
    assert (stats.bytes_sent, stats.bytes_zeroed, stats.chunks_sent) == (0, 0, 0)
    assert stats.bytes_compared == len(point)
    assert not disk.writes and not disk.zeroes


def test_large_disk_across_index_leaves() -> None:
    # More than one index leaf (256 chunks) and several blocks; sparse differences.
    ds = new_store()
    n = 600
    kinds = [1 if no % 7 == 0 else 0 for no in range(n)]
    point = image_of(kinds, 4096, 6)
    ref = store_image(ds, bytes(point))
    target = bytearray(len(point))
    for no in (0, 255, 256, 257, 511, 599):
        target[no * CHUNK_SIZE : no * CHUNK_SIZE + 10] = b"0123456789"
    disk = MemoryDisk(target)
    progress: list[tuple[int, int]] = []
    stats = sync_disk_to_point(ds, ref, disk, threads=2, progress=lambda d, t: progress.append((d, t)))
    assert disk.data == point
    assert disk.chunks_touched() == differing(point, target)
    assert progress[-1] == (len(point), len(point))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert isinstance(stats, SyncStats) and stats.seconds >= 0


def test_size_mismatch_is_refused() -> None:
    ds = new_store()
    ref = store_image(ds, bytes(image_of([1, 1], 0, 7)))
    disk = MemoryDisk(bytes(3 * CHUNK_SIZE))
    with pytest.raises(InvalidInput, match="equal size"):
        sync_disk_to_point(ds, ref, disk)
    assert not disk.reads and not disk.writes


def test_cancel_stops_between_blocks() -> None:
    ds = new_store()
    point = image_of([1] * (4 * BLOCK_CHUNKS), 0, 8)
    ref = store_image(ds, bytes(point))
    disk = MemoryDisk(bytes(len(point)))
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        cancel.set()

    with pytest.raises(InterruptedError):
        sync_disk_to_point(ds, ref, disk, threads=1, progress=progress, cancel=cancel)
    assert disk.data != point
    assert disk.flushes == 0
    # A second run finishes the job.
    sync_disk_to_point(ds, ref, disk)
    assert disk.data == point


def test_all_zero_point_zeroes_the_target() -> None:
    ds = new_store()
    ref = IndexRef.empty(5 * CHUNK_SIZE)
    assert ref.root == ZERO_ID
    disk = MemoryDisk(image_of([1, 0, 1, 1, 0], 0, 9))
    stats = sync_disk_to_point(ds, ref, disk)
    assert disk.data == bytes(5 * CHUNK_SIZE)
    assert stats.chunks_zeroed == 3 and stats.bytes_sent == 0
    # Consecutive zero chunks go out as one request.
    assert disk.zeroes == [Extent(0, CHUNK_SIZE), Extent(2 * CHUNK_SIZE, 2 * CHUNK_SIZE)]


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.integers(0, 1), min_size=1, max_size=BLOCK_CHUNKS * 2 + 5),
    tail=st.integers(0, CHUNK_SIZE - 1).map(lambda t: t - t % 512),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_write_point_fills_a_blank_disk(kinds: list[int], tail: int, threads: int, seed: int) -> None:
    ds = new_store()
    point = image_of(kinds, tail, seed)
    ref = store_image(ds, bytes(point))
    disk = MemoryDisk(bytes(len(point)))
    written = write_point(ds, ref, disk, threads=threads)
    assert disk.data == point
    assert written == sum(len(chunk(point, no)) for no in range(len(kinds)) if any(chunk(point, no)))
    assert disk.chunks_touched() == {no for no in range(len(kinds)) if any(chunk(point, no))}
    assert all(ext.length <= 64 * CHUNK_SIZE for ext in disk.writes)
    assert not disk.reads
