"""Index writer/reader: round trips over real fan-out (256) with large sparse disks, page
sharing between points, resizing, diff, checkpoints."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.adapters.chunk_stores import MemoryChunkStore
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ZERO_ID, ChunkCodec
from siterecovery.dataplane.index import (
    FANOUT,
    IndexReader,
    IndexRef,
    IndexWriter,
    chunk_count,
    tree_depth,
)
from siterecovery.dataplane.keys import VaultKey
from siterecovery.errors import ChunkCorrupt, ChunkMissing, OperationNotAllowed, OutOfRange

GIB = 1 << 30
CODEC = ChunkCodec(VaultKey.generate())


def fake_id(n: int) -> bytes:
    return hashlib.blake2b(n.to_bytes(8, "little"), digest_size=32).digest()


def build(
    store: MemoryChunkStore, size: int, entries: dict[int, bytes], base: IndexRef | None = None
) -> IndexRef:
    w = IndexWriter(store, CODEC, size, base)
    w.set_many(entries.items())
    return w.commit()


# Sizes: small, non-multiples of the chunk size, and large sparse ones spanning 2-4 levels.
sizes = st.one_of(
    st.integers(0, 3 * CHUNK_SIZE + 7),
    st.integers(1, 300 * CHUNK_SIZE),
    st.integers(1, 10 * GIB),
    st.integers(5 * GIB, 1200 * GIB),
)


@st.composite
def disk_entries(draw: st.DrawFn, size: int) -> dict[int, bytes]:
    n = chunk_count(size)
    if n == 0:
        return {}
    numbers = draw(st.lists(st.integers(0, n - 1), max_size=40))
    # Some at the very end and in the first chunk: the edges of pages and of the disk.
    numbers += draw(st.lists(st.sampled_from([0, n - 1, min(n - 1, FANOUT), n // 2]), max_size=3))
    zero = draw(st.lists(st.booleans(), min_size=len(numbers), max_size=len(numbers)))
    seed = draw(st.integers(0, 2**32))
    return {no: (ZERO_ID if z else fake_id(seed + no)) for no, z in zip(numbers, zero, strict=True)}


def expected_nonzero(entries: dict[int, bytes], n: int) -> dict[int, bytes]:
    return {k: v for k, v in entries.items() if v != ZERO_ID and k < n}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_write_read_round_trip(data: st.DataObject) -> None:
    size = data.draw(sizes)
    entries = data.draw(disk_entries(size))
    store = MemoryChunkStore()
    ref = build(store, size, entries)
    reader = IndexReader(store, CODEC, ref)
    n = chunk_count(size)
    assert dict(reader.nonzero_entries()) == expected_nonzero(entries, n)
    for no, cid in entries.items():
        assert reader.get(no) == cid
    if n <= 3 * FANOUT:
        full = list(reader.entries())
        assert [no for no, _ in full] == list(range(n))
        assert dict(full) == {no: entries.get(no, ZERO_ID) for no in range(n)}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_base_plus_changes_equals_expected_and_is_canonical(data: st.DataObject) -> None:
    size1 = data.draw(sizes)
    size2 = data.draw(st.one_of(st.just(size1), sizes))
    first = data.draw(disk_entries(size1))
    changes = data.draw(disk_entries(size2))
    store = MemoryChunkStore()
    ref1 = build(store, size1, first)
    ref2 = build(store, size2, changes, base=ref1)
    n2 = chunk_count(size2)
    expected = expected_nonzero({**first, **changes}, n2)
    reader = IndexReader(store, CODEC, ref2)
    assert dict(reader.nonzero_entries()) == expected
    # Canonical: the same entries written from scratch give the same root.
    assert build(MemoryChunkStore(), size2, expected) == ref2
    # diff is exactly the set of chunk numbers whose ids differ (beyond a disk's end: zero).
    n1 = chunk_count(size1)
    old = expected_nonzero(first, n1)
    want = sorted(no for no in set(old) | set(expected) if old.get(no, ZERO_ID) != expected.get(no, ZERO_ID))
    assert list(reader.diff(ref1)) == want
    assert list(IndexReader(store, CODEC, ref1).diff(ref2)) == want


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_set_run_equals_setting_each_chunk(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 2000 * CHUNK_SIZE))
    n = chunk_count(size)
    store = MemoryChunkStore()
    base = build(store, size, data.draw(disk_entries(size)))
    runs = data.draw(
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 700), st.integers(0, 2**32)), max_size=6)
    )
    spill = data.draw(st.sampled_from([2, 8192]))  # also across spilled leaves
    by_run = IndexWriter(store, CODEC, size, base, max_dirty_leaves=spill)
    by_one = IndexWriter(store, CODEC, size, base, max_dirty_leaves=spill)
    for first, length, seed in runs:
        ids = [ZERO_ID if (seed + i) % 5 == 0 else fake_id(seed + i) for i in range(min(length, n - first))]
        by_run.set_run(first, ids)
        by_one.set_many((first + i, cid) for i, cid in enumerate(ids))
    assert by_run.commit() == by_one.commit()


def test_set_run_beyond_the_disk_is_refused_and_changes_nothing() -> None:
    store = MemoryChunkStore()
    w = IndexWriter(store, CODEC, 10 * CHUNK_SIZE, None)
    with pytest.raises(OutOfRange):
        w.set_run(8, [fake_id(1), fake_id(2), fake_id(3)])
    assert w.commit() == build(MemoryChunkStore(), 10 * CHUNK_SIZE, {})


def test_never_written_disk_costs_nothing() -> None:
    store = MemoryChunkStore()
    w = IndexWriter(store, CODEC, 100 * GIB, None)
    ref = w.commit()
    assert ref.root == ZERO_ID and ref.size == 100 * GIB
    assert w.pages_written == 0 and list(store.list()) == []
    assert list(IndexReader(store, CODEC, ref).nonzero_entries()) == []
    assert list(IndexReader(store, CODEC, ref).page_ids()) == []
    # Writing only zero ids stores nothing either.
    assert build(store, 100 * GIB, {5: ZERO_ID, 10**6: ZERO_ID}).root == ZERO_ID


def test_tree_depth() -> None:
    assert [tree_depth(n) for n in (0, 1, 256, 257, 65536, 65537, 256**3 + 1)] == [1, 1, 1, 2, 2, 3, 4]
    assert IndexRef.empty(100 * GIB).depth == 3


def test_page_sharing_100gib_ten_changes() -> None:
    """A second point of a 100 GiB disk with 10 changed chunks writes < 256 KiB of pages and at
    most 2 pages per level per changed chunk."""
    size = 100 * GIB
    n = chunk_count(size)
    depth = tree_depth(n)
    assert depth == 3
    store = MemoryChunkStore()
    # First point: 60 leaves full of random-looking ids (incompressible pages) spread over the disk.
    leaves = [(k * 1_000_003) % (n // FANOUT) for k in range(60)]
    first = {leaf * FANOUT + i: fake_id(leaf * FANOUT + i) for leaf in leaves for i in range(FANOUT)}
    w1 = IndexWriter(store, CODEC, size, None)
    w1.set_many(first.items())
    ref1 = w1.commit()
    changed = [leaves[k] * FANOUT + 7 * k for k in range(10)]
    w2 = IndexWriter(store, CODEC, size, ref1)
    for no in changed:
        w2.set(no, fake_id(10**9 + no))
    ref2 = w2.commit()
    assert w2.page_bytes_written < 256 * 1024
    assert w2.pages_written <= 2 * depth * len(changed)
    # Leaves (10) + level-1 pages (<= 10) + the root.
    assert w2.pages_written <= 21
    # Everything else is shared: the two points together hold few more pages than one.
    shared = set(IndexReader(store, CODEC, ref1).page_ids()) & set(IndexReader(store, CODEC, ref2).page_ids())
    assert len(shared) >= 60 - 10
    assert list(IndexReader(store, CODEC, ref2).diff(ref1)) == sorted(changed)
    # Unchanged point: nothing is written.
    w3 = IndexWriter(store, CODEC, size, ref2)
    assert w3.commit() == ref2 and w3.pages_written == 0


def test_pages_are_deduplicated_by_id() -> None:
    store = MemoryChunkStore()
    entries = {i: fake_id(i) for i in range(0, 2000, 3)}
    build(store, GIB, entries)
    before = len(list(store.list()))
    w = IndexWriter(store, CODEC, GIB, None)
    w.set_many(entries.items())
    w.commit()
    assert w.pages_written == 0 and len(list(store.list())) == before


def test_checkpoint_keeps_writer_usable_and_commit_closes_it() -> None:
    store = MemoryChunkStore()
    w = IndexWriter(store, CODEC, 4 * GIB + 5, None)
    w.set(1, fake_id(1))
    cp = w.checkpoint()
    assert dict(IndexReader(store, CODEC, cp).nonzero_entries()) == {1: fake_id(1)}
    w.set(65536, fake_id(2))
    w.set(1, fake_id(3))
    ref = w.commit()
    assert dict(IndexReader(store, CODEC, ref).nonzero_entries()) == {1: fake_id(3), 65536: fake_id(2)}
    with pytest.raises(OperationNotAllowed):
        w.set(2, fake_id(4))


def test_memory_bound_spills_leaves_and_stays_correct() -> None:
    store = MemoryChunkStore()
    w = IndexWriter(store, CODEC, 10 * GIB, None, max_dirty_leaves=3)
    entries = {leaf * FANOUT + 5: fake_id(leaf) for leaf in range(0, 40, 2)}
    w.set_many(entries.items())
    # Touch spilled leaves again: the second write must see the first.
    w.set(5, fake_id(999))
    entries[5] = fake_id(999)
    w.set(6, fake_id(1000))
    entries[6] = fake_id(1000)
    ref = w.commit()
    assert dict(IndexReader(store, CODEC, ref).nonzero_entries()) == entries
    assert ref == build(MemoryChunkStore(), 10 * GIB, entries)


def test_set_out_of_range_is_refused() -> None:
    w = IndexWriter(MemoryChunkStore(), CODEC, 10 * CHUNK_SIZE + 1, None)
    w.set(10, fake_id(1))  # the partial last chunk
    with pytest.raises(OutOfRange):
        w.set(11, fake_id(1))
    with pytest.raises(OutOfRange):
        IndexReader(MemoryChunkStore(), CODEC, IndexRef.empty(CHUNK_SIZE)).get(1)


def test_missing_and_corrupt_pages_are_reported() -> None:
    store = MemoryChunkStore()
    ref = build(store, GIB, {i: fake_id(i) for i in range(0, 16384, 100)})
    reader_pages = list(IndexReader(store, CODEC, ref).pages())
    level, _, leaf_id = next(p for p in reader_pages if p[0] == 0)
    blob = store.get(leaf_id)
    store.corrupt(leaf_id, blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ChunkCorrupt):
        dict(IndexReader(store, CODEC, ref).nonzero_entries())
    store.delete(leaf_id)
    with pytest.raises(ChunkMissing):
        dict(IndexReader(store, CODEC, ref).nonzero_entries())


def test_a_data_chunk_cannot_pose_as_a_page() -> None:
    store = MemoryChunkStore()
    data = b"not a page"
    cid = CODEC.chunk_id(data)
    store.insert(cid, CODEC.encode(cid, data))
    with pytest.raises(ChunkCorrupt, match="not an index page"):
        IndexReader(store, CODEC, IndexRef(CHUNK_SIZE, cid)).get(0)


def test_index_ref_json_round_trip() -> None:
    ref = IndexRef(12345, fake_id(1))
    assert IndexRef.from_json(ref.to_json()) == ref
