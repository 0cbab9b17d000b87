"""The agent's replication engine against in-memory stores and a fake disk view (no I/O)."""

from __future__ import annotations

import os
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.adapters.chunk_stores.memory import MemoryChunkStore, MemoryObjectStore
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ZERO_ID
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.process_server import ProcessServer
from siterecovery.dataplane.replicate import Agent, align_extents, clip_extents
from siterecovery.ports.source import Extent


class FakeDisk:
    """A disk view over a bytearray; allocated extents are the non-zero chunks."""

    def __init__(self, data: bytearray, name: str = "disk0") -> None:
        self.data = data
        self.name = name
        self.size = len(data)
        self.reads: list[Extent] = []
        self.lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.reads.append(Extent(offset, length))
        return bytes(self.data[offset : offset + length])

    def allocated_extents(self):
        for off in range(0, self.size, CHUNK_SIZE):
            if any(self.data[off : off + CHUNK_SIZE]):
                yield Extent(off, min(CHUNK_SIZE, self.size - off))

    def changed_extents(self):
        return None

    def bytes_read(self) -> int:
        return sum(e.length for e in self.reads)


@pytest.fixture
def ds() -> Datastore:
    return Datastore.create(MemoryChunkStore(), MemoryObjectStore(), VaultKey.generate())


def make_disk(chunks: int, filled: list[int], seed: int = 1) -> FakeDisk:
    rng = random.Random(seed)
    data = bytearray(chunks * CHUNK_SIZE)
    for c in filled:
        data[c * CHUNK_SIZE : (c + 1) * CHUNK_SIZE] = rng.randbytes(CHUNK_SIZE)
    return FakeDisk(data)


def restore(ds: Datastore, ref) -> bytearray:
    out = bytearray(ref.size)
    for off, data in ds.read_disk(ref):
        out[off : off + len(data)] = data
    return out


def agent(ds: Datastore) -> Agent:
    return Agent(ds.codec, ProcessServer(ds.chunks), threads=2)


def test_initial_replication_stores_every_nonzero_chunk_once(ds):
    disk = make_disk(200, [0, 1, 5, 64, 65, 199])
    disk.data[64 * CHUNK_SIZE : 65 * CHUNK_SIZE] = disk.data[0:CHUNK_SIZE]  # a duplicate chunk
    r = agent(ds).replicate_disk(ds, disk, None, changed=None)
    assert r.mode == "initial"
    assert restore(ds, r.ref) == disk.data
    assert r.stats.chunks_sent == 5  # 6 filled chunks, one a duplicate
    assert disk.bytes_read() == 6 * CHUNK_SIZE  # holes are never read


def test_dirty_bitmap_mode_reads_only_changed_extents(ds):
    disk = make_disk(100, list(range(0, 100, 3)))
    a = agent(ds)
    base = a.replicate_disk(ds, disk, None, changed=None).ref
    disk.reads.clear()
    disk.data[10 * CHUNK_SIZE + 5 : 10 * CHUNK_SIZE + 9] = b"abcd"
    disk.data[50 * CHUNK_SIZE : 51 * CHUNK_SIZE] = os.urandom(CHUNK_SIZE)
    changed = [Extent(10 * CHUNK_SIZE + 5, 4), Extent(50 * CHUNK_SIZE, 4096)]
    r = a.replicate_disk(ds, disk, base, changed=changed)
    assert r.mode == "dirty-bitmap"
    assert disk.bytes_read() == 2 * CHUNK_SIZE
    assert r.stats.chunks_changed == 2 and r.stats.chunks_sent == 2
    assert restore(ds, r.ref) == disk.data


def test_hash_resync_reads_everything_sends_only_differences_and_clears_holes(ds):
    disk = make_disk(100, list(range(0, 100, 2)))
    a = agent(ds)
    base = a.replicate_disk(ds, disk, None, changed=None).ref
    disk.reads.clear()
    disk.data[4 * CHUNK_SIZE : 5 * CHUNK_SIZE] = os.urandom(CHUNK_SIZE)  # rewritten
    disk.data[6 * CHUNK_SIZE : 7 * CHUNK_SIZE] = bytes(CHUNK_SIZE)  # discarded: now a hole
    disk.data[7 * CHUNK_SIZE : 8 * CHUNK_SIZE] = os.urandom(CHUNK_SIZE)  # new data in a hole
    r = a.replicate_disk(ds, disk, base, changed=None)
    assert r.mode == "hash-resync"
    assert r.stats.chunks_sent == 2
    assert disk.bytes_read() == 50 * CHUNK_SIZE  # every allocated chunk compared
    assert ds.index_reader(r.ref).get(6) == ZERO_ID
    assert restore(ds, r.ref) == disk.data


def test_interrupted_initial_replication_resumes_from_its_checkpoint(ds):
    disk = make_disk(400, list(range(400)))
    a = agent(ds)
    saved: list[tuple] = []

    class Stop(Exception):
        pass

    def checkpoint(ref, offset):
        saved.append((ref, offset))
        if offset >= 100 * CHUNK_SIZE:
            raise Stop

    with pytest.raises(Stop):
        a.replicate_disk(ds, disk, None, changed=None, checkpoint=checkpoint, checkpoint_every_s=0)
    ref, offset = saved[-1]
    sent_before = len(list(ds.chunks.list()))
    # Some chunks before the checkpoint changed meanwhile; without tracking they are found by hash.
    disk.data[3 * CHUNK_SIZE : 4 * CHUNK_SIZE] = os.urandom(CHUNK_SIZE)
    r = a.replicate_disk(ds, disk, ref, changed=None, resume_offset=offset)
    assert restore(ds, r.ref) == disk.data
    remaining = 400 - offset // CHUNK_SIZE
    # Chunks sent before the stop but past the checkpoint are already stored: not sent again.
    assert r.stats.chunks_sent <= remaining + 1
    assert sent_before > 100


def test_resume_with_tracking_rereads_only_changed_extents_below_the_checkpoint(ds):
    disk = make_disk(64, list(range(64)))
    a = agent(ds)
    full = a.replicate_disk(ds, disk, None, changed=None).ref
    disk.reads.clear()
    disk.data[2 * CHUNK_SIZE : 2 * CHUNK_SIZE + 10] = b"0123456789"
    r = a.replicate_disk(ds, disk, full, changed=[Extent(2 * CHUNK_SIZE, 10)], resume_offset=32 * CHUNK_SIZE)
    # Below the checkpoint: only the changed chunk; above it: everything allocated.
    assert disk.bytes_read() == CHUNK_SIZE + 32 * CHUNK_SIZE
    assert restore(ds, r.ref) == disk.data


def test_cancel_stops_replication(ds):
    disk = make_disk(300, list(range(300)))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(InterruptedError):
        agent(ds).replicate_disk(ds, disk, None, changed=None, cancel=cancel)


def test_disk_size_not_a_multiple_of_the_chunk_size(ds):
    data = bytearray(os.urandom(3 * CHUNK_SIZE + 1000))
    disk = FakeDisk(data)
    r = agent(ds).replicate_disk(ds, disk, None, changed=None)
    assert restore(ds, r.ref) == data


extents = st.lists(st.tuples(st.integers(0, 10_000_000), st.integers(1, 500_000)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(extents, st.integers(1, 12_000_000))
def test_align_extents_is_sorted_disjoint_aligned_and_covering(raw, size):
    exts = [Extent(o, n) for o, n in raw]
    out = align_extents(exts, size)
    for a, b in zip(out, out[1:], strict=False):
        assert a.end < b.offset
    for e in out:
        assert e.offset % CHUNK_SIZE == 0
        assert e.end % CHUNK_SIZE == 0 or e.end == size
        assert e.end <= size
    for e in exts:
        for pos in (e.offset, e.end - 1):
            if pos < size:
                assert any(o.offset <= pos < o.end for o in out)


@given(extents, st.integers(0, 5_000_000), st.integers(0, 5_000_000))
def test_clip_extents_stays_inside_the_window(raw, lo, span):
    hi = lo + span
    for e in clip_extents([Extent(o, n) for o, n in raw], lo, hi):
        assert lo <= e.offset < e.end <= hi
