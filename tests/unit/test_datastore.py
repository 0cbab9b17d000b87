"""Datastore: create/open, points written and read back byte-exact, verify, gc."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from siterecovery.adapters.chunk_stores import MemoryChunkStore, MemoryObjectStore
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ZERO_ID
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.manifest import Manifest
from siterecovery.errors import AlreadyExists, DatastoreError, NotFound, VaultError


def new_store() -> tuple[Datastore, MemoryChunkStore, MemoryObjectStore]:
    chunks, objects = MemoryChunkStore(), MemoryObjectStore()
    return Datastore.create(chunks, objects, VaultKey.generate()), chunks, objects


def write_disk(
    ds: Datastore, image: bytes, base: IndexRef | None = None, only: list[int] | None = None
) -> IndexRef:
    """Store a disk image (all chunks, or only the chunk numbers in ``only``) as an index."""
    w = ds.index_writer(len(image), base)
    numbers = range(-(-len(image) // CHUNK_SIZE)) if only is None else only
    for no in numbers:
        chunk_id, _ = ds.store_chunk(image[no * CHUNK_SIZE : (no + 1) * CHUNK_SIZE])
        w.set(no, chunk_id)
    return w.commit()


def read_image(ds: Datastore, ref: IndexRef) -> bytes:
    out = bytearray(ref.size)
    for offset, data in ds.read_disk(ref, threads=2):
        assert data is not None
        out[offset : offset + len(data)] = data
    return bytes(out)


def point(ds: Datastore, point_id: str, disks: dict[str, IndexRef]) -> Manifest:
    m = Manifest(point_id, "item-1", "vm-1", time.time(), "crash-consistent", "test", disks, {})
    ds.write_manifest(m)
    return m


def make_image(size: int, seed: int) -> bytearray:
    rnd = random.Random(seed)
    img = bytearray(size)
    for no in range(0, -(-size // CHUNK_SIZE), 3):  # every third chunk has data, the rest zeros
        img[no * CHUNK_SIZE : no * CHUNK_SIZE + 1000] = rnd.randbytes(1000)
    return img


def test_two_points_read_back_byte_exact() -> None:
    ds, chunks, _ = new_store()
    size = 40 * CHUNK_SIZE + 1234  # partial last chunk
    img1 = make_image(size, 1)
    img1[-10:] = b"0123456789"
    ref1 = write_disk(ds, bytes(img1))
    point(ds, "p1", {"vda": ref1})
    img2 = bytearray(img1)
    img2[5 * CHUNK_SIZE + 7 : 5 * CHUNK_SIZE + 20] = b"changed bytes"
    img2[3 * CHUNK_SIZE : 4 * CHUNK_SIZE] = bytes(CHUNK_SIZE)  # a chunk that became zero
    ref2 = write_disk(ds, bytes(img2), base=ref1, only=[3, 5])
    point(ds, "p2", {"vda": ref2})
    assert read_image(ds, ref1) == bytes(img1)
    assert read_image(ds, ref2) == bytes(img2)
    assert ds.list_manifests() == ["p1", "p2"]
    assert ds.read_manifest("p2").disks["vda"] == ref2
    assert list(ds.index_reader(ref2).diff(ref1)) == [3, 5]
    # Zero chunks are not stored and read back as zeros.
    assert ds.store_chunk(bytes(CHUNK_SIZE)) == (ZERO_ID, 0)
    assert ds.read_chunk(ZERO_ID) == bytes(CHUNK_SIZE)
    data = os.urandom(CHUNK_SIZE)
    cid, stored = ds.store_chunk(data)
    assert stored > 0 and ds.store_chunk(data) == (cid, 0)
    assert ds.stats()["points"] == 2 and ds.stats()["chunks"] == len(list(chunks.list()))


def test_read_disk_stops_early_without_hanging() -> None:
    ds, _, _ = new_store()
    ref = write_disk(ds, bytes(make_image(100 * CHUNK_SIZE, 2)))
    gen = ds.read_disk(ref, threads=2)
    assert next(gen)[0] == 0
    gen.close()


def test_create_refuses_existing_and_open_checks_key(tmp_path: Path) -> None:
    ds, chunks, objects = new_store()
    with pytest.raises(AlreadyExists):
        Datastore.create(chunks, objects, VaultKey.generate())
    with pytest.raises(VaultError, match="not the key of this datastore"):
        Datastore.open(chunks, objects, VaultKey.generate())
    assert Datastore.open(chunks, objects, ds.key).chunk_size == CHUNK_SIZE
    with pytest.raises(NotFound):
        Datastore.open(MemoryChunkStore(), MemoryObjectStore(), ds.key)


def test_open_local(tmp_path: Path) -> None:
    key = VaultKey.generate()
    with pytest.raises(NotFound):
        Datastore.open_local(tmp_path / "ds", key)
    ds = Datastore.open_local(tmp_path / "ds", key, create=True)
    ref = write_disk(ds, bytes(make_image(10 * CHUNK_SIZE, 3)))
    point(ds, "p1", {"vda": ref})
    again = Datastore.open_local(tmp_path / "ds", key)
    assert read_image(again, again.read_manifest("p1").disks["vda"]) == bytes(make_image(10 * CHUNK_SIZE, 3))
    with pytest.raises(VaultError):
        Datastore.open_local(tmp_path / "ds", VaultKey.generate())
    assert (tmp_path / "ds" / "objects" / "manifests" / "p1.json").exists()


def test_manifest_swapped_between_points_is_refused() -> None:
    ds, _, objects = new_store()
    point(ds, "p1", {})
    objects.put("manifests/p2.json", objects.get("manifests/p1.json"))
    with pytest.raises(DatastoreError, match="moved or copied"):
        ds.read_manifest("p2")
    with pytest.raises(NotFound):
        ds.read_manifest("p3")


def test_verify_detects_deleted_and_flipped_chunks() -> None:
    ds, chunks, _ = new_store()
    img = bytes(make_image(30 * CHUNK_SIZE, 4))
    ref = write_disk(ds, img)
    point(ds, "p1", {"vda": ref})
    point(ds, "p2", {"vda": ref, "vdb": ref})
    progress: list[tuple[int, int]] = []
    report = ds.verify(progress=lambda done, total: progress.append((done, total)))
    assert report.ok and report.points_checked == 2
    assert progress == [(1, 2), (2, 2)]
    n_chunks = len([1 for _ in ds.index_reader(ref).nonzero_entries()])
    assert report.chunks_checked == n_chunks + 1  # data chunks + one leaf page, each once

    entries = dict(ds.index_reader(ref).nonzero_entries())
    deleted, flipped = entries[3], entries[6]
    chunks.delete(deleted)
    blob = bytearray(chunks.get(flipped))
    blob[40] ^= 0x10
    chunks.corrupt(flipped, bytes(blob))
    report = ds.verify()
    assert not report.ok
    found = {(p.point_id, p.disk, p.offset, p.chunk_id, p.reason.split(":")[0]) for p in report.problems}
    expected = set()
    for pid, disk in (("p1", "vda"), ("p2", "vda"), ("p2", "vdb")):
        expected.add((pid, disk, 3 * CHUNK_SIZE, deleted.hex(), "missing"))
        expected.add((pid, disk, 6 * CHUNK_SIZE, flipped.hex(), "corrupt"))
    assert found == expected
    only = ds.verify(["p1"])
    assert only.points_checked == 1 and len(only.problems) == 2


def test_verify_reports_a_missing_page() -> None:
    ds, chunks, _ = new_store()
    ref = write_disk(ds, bytes(make_image(300 * CHUNK_SIZE, 5)))  # two levels
    point(ds, "p1", {"vda": ref})
    leaf = next(pid for level, _, pid in ds.index_reader(ref).pages() if level == 0)
    chunks.delete(leaf)
    ds.page_cache = type(ds.page_cache)()  # a fresh process would not have it cached
    report = ds.verify()
    assert [(p.offset, p.chunk_id) for p in report.problems] == [(None, leaf.hex())]
    assert "index page" in report.problems[0].reason
    with pytest.raises(DatastoreError, match="garbage collection stopped"):
        ds.gc(0, now=time.time() + 10)


def test_gc_removes_only_unreferenced_old_chunks() -> None:
    ds, chunks, _ = new_store()
    size = 600 * CHUNK_SIZE  # two index levels: pages to share
    img1 = make_image(size, 6)
    ref1 = write_disk(ds, bytes(img1))
    point(ds, "p1", {"vda": ref1})
    img2 = bytearray(img1)
    img2[0:5] = b"hello"
    img2[500 * CHUNK_SIZE : 500 * CHUNK_SIZE + 5] = b"world"
    ref2 = write_disk(ds, bytes(img2), base=ref1, only=[0, 500])
    point(ds, "p2", {"vda": ref2})
    before = {i.chunk_id for i in chunks.list()}

    # Nothing is garbage while both points live.
    stats = ds.gc(grace_seconds=0, now=time.time() + 10)
    assert stats.chunks_removed == 0 and stats.chunks_marked == len(before)

    # Delete p1: its old versions of chunks 0 and 500, its leaves and root go. Pages it
    # shares with p2 stay.
    p1_pages = set(ds.index_reader(ref1).page_ids())
    p2_pages = set(ds.index_reader(ref2).page_ids())
    shared = p1_pages & p2_pages
    assert shared  # an unchanged leaf
    ds.delete_manifest("p1")
    old_ids = {ds.index_reader(ref1).get(0), ds.index_reader(ref1).get(500)} - {ZERO_ID}

    # Within the grace period nothing is removed.
    stats = ds.gc(grace_seconds=3600)
    assert stats.chunks_removed == 0 and stats.chunks_kept_young == len(old_ids | (p1_pages - p2_pages))

    stats = ds.gc(grace_seconds=60, now=time.time() + 120)
    after = {i.chunk_id for i in chunks.list()}
    assert before - after == old_ids | (p1_pages - p2_pages)
    assert stats.chunks_removed == len(before - after)
    assert shared <= after
    assert read_image(ds, ref2) == bytes(img2)
    assert ds.verify().ok


def test_gc_spares_young_unreferenced_chunks_of_a_point_in_flight() -> None:
    ds, chunks, _ = new_store()
    now = time.time()
    old_id, _ = ds.store_chunk(b"old garbage".ljust(CHUNK_SIZE, b"\x01"))
    chunks.set_mtime(old_id, now - 7200)
    young_id, _ = ds.store_chunk(b"in flight".ljust(CHUNK_SIZE, b"\x02"))
    stats = ds.gc(grace_seconds=3600, now=now)
    assert (stats.chunks_removed, stats.chunks_kept_young) == (1, 1)
    assert chunks.contains(young_id) and not chunks.contains(old_id)
    # Re-storing an old chunk refreshes it: gc must then spare it.
    old_again, _ = ds.store_chunk(b"old garbage".ljust(CHUNK_SIZE, b"\x01"))
    assert old_again == old_id and ds.gc(grace_seconds=3600).chunks_removed == 0


@pytest.mark.integration
def test_local_datastore_gc_and_temp_cleanup(tmp_path: Path) -> None:
    key = VaultKey.generate()
    ds = Datastore.open_local(tmp_path / "ds", key, create=True)
    ref = write_disk(ds, bytes(make_image(20 * CHUNK_SIZE, 7)))
    point(ds, "p1", {"vda": ref})
    garbage, _ = ds.store_chunk(os.urandom(CHUNK_SIZE))
    tmp = tmp_path / "ds" / "packs" / ".tmp-1-1-abcd"  # a pack never sealed (a crash)
    tmp.write_bytes(b"partial")
    stats = ds.gc(grace_seconds=60, now=time.time() + 120)
    assert stats.chunks_removed == 1 and stats.temp_files_removed == 1
    assert not tmp.exists()
    assert ds.verify().ok and read_image(ds, ref) == bytes(make_image(20 * CHUNK_SIZE, 7))
