"""Contract suite of the ChunkStore and ObjectStore ports: every adapter must pass it.

The adapters are the parameters of the fixtures in ``conftest.py``. Local-only behaviour (temp
files, ENOSPC) is tested at the end against the real filesystem.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.adapters.chunk_stores import LocalChunkStore, LocalObjectStore
from siterecovery.errors import ChunkMissing, StorageFull
from siterecovery.ports.chunk_store import ChunkStore, ObjectMissing, ObjectStore, insert_all


def cid(n: int) -> bytes:
    return n.to_bytes(2, "big") * 16


# -- ChunkStore ---------------------------------------------------------------------------


def test_insert_reports_new_then_existing(chunk_store: ChunkStore) -> None:
    assert chunk_store.insert(cid(1), b"blob one") is True
    assert chunk_store.insert(cid(1), b"blob one") is False
    assert chunk_store.get(cid(1)) == b"blob one"
    assert chunk_store.contains(cid(1))


def test_reinsert_does_not_rewrite(chunk_store: ChunkStore) -> None:
    chunk_store.insert(cid(1), b"first")
    chunk_store.insert(cid(1), b"second")
    assert chunk_store.get(cid(1)) == b"first"


def test_get_missing_raises_chunk_missing(chunk_store: ChunkStore) -> None:
    with pytest.raises(ChunkMissing, match=cid(9).hex()):
        chunk_store.get(cid(9))
    assert not chunk_store.contains(cid(9))


def test_missing_returns_the_absent_subset(chunk_store: ChunkStore) -> None:
    for n in (1, 2, 3):
        chunk_store.insert(cid(n), b"x%d" % n)
    assert chunk_store.missing([cid(n) for n in range(6)]) == {cid(0), cid(4), cid(5)}
    assert chunk_store.missing([]) == set()


def test_reinsert_refreshes_mtime(chunk_store: ChunkStore) -> None:
    chunk_store.insert(cid(1), b"blob")
    (before,) = [i.mtime for i in chunk_store.list()]
    time.sleep(0.02)
    chunk_store.insert(cid(1), b"blob")
    (after,) = [i.mtime for i in chunk_store.list()]
    assert after > before
    assert after == pytest.approx(time.time(), abs=5)


def test_list_gives_ids_and_sizes(chunk_store: ChunkStore) -> None:
    assert list(chunk_store.list()) == []
    blobs = {cid(n): os.urandom(n * 10 + 1) for n in range(300)}
    for k, v in blobs.items():
        chunk_store.insert(k, v)
    listed = {i.chunk_id: i.size for i in chunk_store.list()}
    assert listed == {k: len(v) for k, v in blobs.items()}


def test_list_while_inserting_and_deleting(chunk_store: ChunkStore) -> None:
    for n in range(50):
        chunk_store.insert(cid(n), b"x")
    seen = 0
    for i, info in enumerate(chunk_store.list()):
        chunk_store.insert(cid(1000 + i), b"y")
        chunk_store.delete(info.chunk_id)
        seen += 1
    assert seen >= 50


def test_delete_is_idempotent(chunk_store: ChunkStore) -> None:
    chunk_store.insert(cid(1), b"blob")
    chunk_store.delete(cid(1))
    chunk_store.delete(cid(1))
    chunk_store.delete(cid(2))
    assert not chunk_store.contains(cid(1))
    assert chunk_store.insert(cid(1), b"blob") is True


def test_flush(chunk_store: ChunkStore) -> None:
    chunk_store.flush()
    chunk_store.insert(cid(1), b"blob")
    chunk_store.flush()
    assert chunk_store.get(cid(1)) == b"blob"


def test_concurrent_inserts_of_one_id(chunk_store: ChunkStore) -> None:
    blob = os.urandom(70000)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        results.append(chunk_store.insert(cid(7), blob))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # At least one reports new (local and memory guarantee exactly one; an object store
    # without conditional writes may report more).
    assert results.count(True) >= 1 and len(results) == 8
    assert chunk_store.get(cid(7)) == blob
    assert [i.chunk_id for i in chunk_store.list()] == [cid(7)]


def test_concurrent_inserts_of_many_ids(chunk_store: ChunkStore) -> None:
    def work(base: int) -> None:
        for n in range(base, base + 100):
            chunk_store.insert(cid(n), n.to_bytes(4, "big"))

    threads = [threading.Thread(target=work, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list(chunk_store.list())) == 400
    assert chunk_store.get(cid(321)) == (321).to_bytes(4, "big")


def test_insert_all_is_insert_of_each_in_order(chunk_store: ChunkStore) -> None:
    chunk_store.insert(cid(1), b"old one")
    chunk_store.flush()  # sealed (in a pack, for the local store), not only written
    items = [(cid(1), b"new one"), (cid(2), b"two"), (cid(3), b"three"), (cid(2), b"two again")]
    assert insert_all(chunk_store, items) == [False, True, True, False]
    assert chunk_store.get(cid(1)) == b"old one"
    assert chunk_store.get(cid(2)) == b"two"
    assert insert_all(chunk_store, []) == []
    chunk_store.flush()
    assert sorted(i.chunk_id for i in chunk_store.list()) == [cid(1), cid(2), cid(3)]


def test_concurrent_insert_all_of_overlapping_batches(chunk_store: ChunkStore) -> None:
    barrier = threading.Barrier(4)
    flags: list[list[bool]] = []

    def work(k: int) -> None:
        batch = [(cid(n), n.to_bytes(4, "big") * 100) for n in range(k * 50, k * 50 + 100)]
        barrier.wait()
        flags.append(insert_all(chunk_store, batch))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list(chunk_store.list())) == 250
    assert chunk_store.get(cid(120)) == (120).to_bytes(4, "big") * 100
    # Every id was reported new by at least one batch (exactly one where the store can tell).
    assert sum(sum(f) for f in flags) >= 250


# -- ObjectStore --------------------------------------------------------------------------


def test_object_put_get_replace(object_store: ObjectStore) -> None:
    object_store.put("config", b"v1")
    assert object_store.get("config") == b"v1"
    object_store.put("config", b"v2")
    assert object_store.get("config") == b"v2"


def test_object_get_missing(object_store: ObjectStore) -> None:
    with pytest.raises(ObjectMissing):
        object_store.get("manifests/none.json")


def test_object_list_with_prefix_sorted(object_store: ObjectStore) -> None:
    for name in ("manifests/b.json", "manifests/a.json", "config", "manifestsX", "other/deep/x"):
        object_store.put(name, name.encode())
    assert list(object_store.list()) == sorted(
        ["manifests/b.json", "manifests/a.json", "config", "manifestsX", "other/deep/x"]
    )
    assert list(object_store.list("manifests/")) == ["manifests/a.json", "manifests/b.json"]
    assert list(object_store.list("manifests")) == ["manifests/a.json", "manifests/b.json", "manifestsX"]
    assert list(object_store.list("manifests/a")) == ["manifests/a.json"]
    assert list(object_store.list("nothing/")) == []


def test_object_delete_idempotent(object_store: ObjectStore) -> None:
    object_store.put("a/b", b"x")
    object_store.delete("a/b")
    object_store.delete("a/b")
    object_store.delete("never")
    assert list(object_store.list()) == []


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "../up", "a/./b", "a/", ".tmp-x"])
def test_object_bad_names_refused(object_store: ObjectStore, name: str) -> None:
    with pytest.raises(Exception, match="not allowed"):
        object_store.put(name, b"x")


# -- local only ---------------------------------------------------------------------------


def test_local_layout_packs_visible_after_flush_and_temp_files_cleaned(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path)
    store.insert(cid(1), b"blob")
    packs = tmp_path / "packs"
    # Until the flush the chunk is in this process's open pack (a temp file) only.
    assert [p.name[:5] for p in packs.iterdir() if p.suffix == ".pack"] == [".tmp-"]
    assert cid(1) not in {i.chunk_id for i in LocalChunkStore(tmp_path).list()}
    store.flush()
    sealed = [p for p in packs.iterdir() if p.suffix == ".pack" and not p.name.startswith(".tmp-")]
    assert len(sealed) == 1
    path, offset, length = store.locate(cid(1))
    assert path == sealed[0] and path.read_bytes()[offset : offset + length] == b"blob"
    assert LocalChunkStore(tmp_path).get(cid(1)) == b"blob"

    store.insert(cid(2), b"in flight")  # this process's open pack: young, and ours
    stale = packs / ".tmp-123-1-deadbeef"
    stale.write_bytes(b"partial")
    fresh = packs / ".tmp-123-2-deadbeef"
    fresh.write_bytes(b"in flight")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert sorted(i.chunk_id for i in store.list()) == [cid(1), cid(2)]
    assert store.cleanup_temp() == 1
    assert not stale.exists() and fresh.exists()
    assert store.cleanup_temp(older_than=time.time() + 1) == 1  # ours is never removed
    assert store.get(cid(2)) == b"in flight"
    store.flush()
    assert LocalChunkStore(tmp_path).get(cid(2)) == b"in flight"


def test_local_object_put_leaves_no_temp(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("manifests/p.json", b"{}")
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == ["p.json"]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs to test ENOSPC (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.integration
def test_local_enospc_raises_storage_full_and_leaves_nothing_partial(tiny_tmpfs: Path) -> None:
    store = LocalChunkStore(tiny_tmpfs)
    blob = os.urandom(100_000)
    stored = 0
    with pytest.raises(StorageFull, match="no space left"):
        for n in range(100):
            store.insert(cid(n), blob)
            stored += 1
    assert 0 < stored < 100
    # Every listed chunk is complete, also to a new reader; no temp file is left: the open pack
    # was sealed with the room reserved for its footer.
    infos = list(store.list())
    assert len(infos) == stored and all(i.size == len(blob) for i in infos)
    assert not [p for p in tiny_tmpfs.rglob(".tmp-*")]
    again = LocalChunkStore(tiny_tmpfs)
    assert sorted(i.chunk_id for i in again.list()) == [cid(n) for n in range(stored)]
    assert all(again.get(cid(n)) == blob for n in range(stored))
    # A batch that runs out of space mid-way: what fit is kept and complete, the rest is absent.
    more = [(cid(n), blob) for n in range(200, 300)]
    with pytest.raises(StorageFull, match="no space left"):
        store.insert_many(more)
    again = LocalChunkStore(tiny_tmpfs)
    infos = list(again.list())
    assert all(i.size == len(blob) for i in infos)
    assert all(again.get(i.chunk_id) == blob for i in infos)
    assert not [p for p in tiny_tmpfs.rglob(".tmp-*")]
    objects = LocalObjectStore(tiny_tmpfs / "objects")
    with pytest.raises(StorageFull):
        objects.put("big", os.urandom(200_000))
    assert list(objects.list()) == []
