"""The local chunk store's pack files on a real filesystem: crashes, format 1 chunk files,
several processes, repacking, damaged packs (the port's contract is in tests/contract)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.adapters.chunk_stores.local import (
    PACK_SUFFIX,
    LocalChunkStore,
    decode_tombstones,
    encode_footer,
    encode_tombstone,
    footer_entries,
    read_footer,
)
from siterecovery.errors import ChunkMissing


def cid(n: int) -> bytes:
    return hashlib.sha256(b"chunk %d" % n).digest()


def blob(n: int, size: int = 3000) -> bytes:
    """Deterministic content for chunk ``n``, so that any process can check what it reads."""
    seed = hashlib.sha256(b"blob %d" % n).digest()
    return (seed * (size // len(seed) + 1))[:size]


def sealed_packs(root: Path) -> list[Path]:
    return sorted(
        p for p in (root / "packs").iterdir() if p.suffix == PACK_SUFFIX and not p.name.startswith(".")
    )


def temp_files(root: Path) -> list[Path]:
    return [p for p in (root / "packs").iterdir() if p.name.startswith(".tmp-")]


WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from siterecovery.adapters.chunk_stores.local import LocalChunkStore

    def cid(n): return hashlib.sha256(b"chunk %d" % n).digest()
    def blob(n, size=3000):
        seed = hashlib.sha256(b"blob %d" % n).digest()
        return (seed * (size // len(seed) + 1))[:size]

    store = LocalChunkStore(Path(sys.argv[1]), pack_size=64 * 1024)
    n = 0
    while True:
        store.insert(cid(n), blob(n))
        n += 1
        if n % 50 == 0:
            store.flush()
            print(n, flush=True)  # every chunk below n is durable
    """
)


def test_a_killed_writer_loses_only_what_it_had_not_flushed(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    flushed = 0
    try:
        while flushed < 400:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            flushed = int(line)
        # Let it write on (into an unsealed pack, or sealing one) and kill it at once.
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for line in proc.stdout:
            flushed = max(flushed, int(line))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    store = LocalChunkStore(root)
    listed = {i.chunk_id: i.size for i in store.list()}
    # Everything flushed is there; everything listed is complete and reads back as written.
    assert all(cid(n) in listed for n in range(flushed))
    by_id = {cid(n): n for n in range(flushed + 10_000)}
    for chunk_id, size in listed.items():
        assert store.get(chunk_id) == blob(by_id[chunk_id]) and size == 3000
    # A crash leaves at most temp files: gc's cleanup removes them once they are old.
    left = len(temp_files(root))
    assert store.cleanup_temp(older_than=time.time() + 1) == left
    assert temp_files(root) == []
    assert {i.chunk_id for i in LocalChunkStore(root).list()} == set(listed)


def test_format_1_chunk_files_are_read_listed_refreshed_and_deleted(tmp_path: Path) -> None:
    old = {cid(n): blob(n, 100 + n) for n in range(5)}
    for chunk_id, data in old.items():
        h = chunk_id.hex()
        (tmp_path / "chunks" / h[:2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "chunks" / h[:2] / h).write_bytes(data)
    store = LocalChunkStore(tmp_path)
    assert all(store.get(k) == v for k, v in old.items())
    assert store.missing([*old, cid(99)]) == {cid(99)}
    assert store.insert(cid(0), b"not written again") is False
    assert store.get(cid(0)) == old[cid(0)]
    assert store.insert(cid(99), blob(99)) is True  # new chunks go into packs
    store.flush()
    assert {i.chunk_id: i.size for i in store.list()} == {
        **{k: len(v) for k, v in old.items()},
        cid(99): len(blob(99)),
    }
    store.delete(cid(1))
    assert not store.contains(cid(1))
    h = cid(1).hex()
    assert not (tmp_path / "chunks" / h[:2] / h).exists()
    path, offset, length = store.locate(cid(2))
    assert path.read_bytes()[offset : offset + length] == old[cid(2)]


def test_a_delete_reaches_other_processes_after_flush(tmp_path: Path) -> None:
    a = LocalChunkStore(tmp_path)
    for n in range(10):
        a.insert(cid(n), blob(n))
    a.flush()
    b = LocalChunkStore(tmp_path)
    assert b.contains(cid(3))
    a.delete(cid(3))
    a.flush()
    b.sync()  # the datastore calls it before it starts an index
    assert not b.contains(cid(3))
    assert not LocalChunkStore(tmp_path).contains(cid(3))
    # Storing it again makes a new copy that the old tombstone does not hide.
    assert a.insert(cid(3), blob(3)) is True
    a.flush()
    assert LocalChunkStore(tmp_path).get(cid(3)) == blob(3)


def test_another_process_sees_new_packs_when_it_reads_or_lists(tmp_path: Path) -> None:
    reader = LocalChunkStore(tmp_path)
    writer = LocalChunkStore(tmp_path)
    writer.insert(cid(1), blob(1))
    writer.flush()
    assert reader.get(cid(1)) == blob(1)
    writer.insert(cid(2), blob(2))
    writer.flush()
    assert cid(2) in {i.chunk_id for i in reader.list()}


def test_repack_frees_garbage_and_keeps_every_live_chunk(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path, pack_size=64 * 1024)
    for n in range(200):
        store.insert(cid(n), blob(n))
    store.flush()
    packs_before = sealed_packs(tmp_path)
    bytes_before = sum(p.stat().st_size for p in packs_before)
    assert len(packs_before) >= 8
    other = LocalChunkStore(tmp_path)  # loaded before the repack: must keep finding chunks
    live = [n for n in range(200) if n % 4 == 0]
    for n in range(200):
        if n % 4:
            store.delete(cid(n))

    stats = store.repack()
    assert stats.packs_rewritten >= 6 and stats.packs_removed == len(packs_before)
    assert stats.bytes_freed > 0.6 * bytes_before
    after = sealed_packs(tmp_path)
    assert sum(p.stat().st_size for p in after) < 0.4 * bytes_before
    assert not set(after) & set(packs_before)
    assert all(store.get(cid(n)) == blob(n) for n in live)
    assert all(other.get(cid(n)) == blob(n) for n in live)
    fresh = LocalChunkStore(tmp_path)
    assert sorted(i.chunk_id for i in fresh.list()) == sorted(cid(n) for n in live)
    # The tombstones named removed packs only: consolidated away.
    assert list((tmp_path / "packs").glob("*.tomb")) == []
    assert store.repack().packs_rewritten == 0  # nothing left to do


def test_repack_merges_small_packs(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path, pack_size=1024 * 1024)
    for n in range(6):  # one small pack per flush, as frequent recovery points make
        store.insert(cid(n), blob(n))
        store.flush()
    assert len(sealed_packs(tmp_path)) == 6
    stats = store.repack()
    assert stats.packs_rewritten == 6 and len(sealed_packs(tmp_path)) == 1
    assert all(LocalChunkStore(tmp_path).get(cid(n)) == blob(n) for n in range(6))


def test_a_damaged_pack_costs_its_own_chunks_only(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path, pack_size=16 * 1024)
    for n in range(30):
        store.insert(cid(n), blob(n))
    store.flush()
    victim = sealed_packs(tmp_path)[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 10)  # its trailer is gone
    again = LocalChunkStore(tmp_path)
    present = [n for n in range(30) if again.contains(cid(n))]
    assert 0 < len(present) < 30
    assert all(again.get(cid(n)) == blob(n) for n in present)
    with pytest.raises(ChunkMissing):
        again.get(cid(next(n for n in range(30) if n not in present)))
    assert victim.exists()  # left for an operator to look at


def test_concurrent_inserts_across_many_seals(tmp_path: Path) -> None:
    store = LocalChunkStore(tmp_path, pack_size=32 * 1024)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for n in range(k * 300, (k + 1) * 300):
                assert store.insert(cid(n), blob(n, 1000 + n % 500))
                if n % 97 == 0:
                    assert store.get(cid(n - 50 if n >= k * 300 + 50 else n)) is not None
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.flush()
    fresh = LocalChunkStore(tmp_path)
    assert len(list(fresh.list())) == 1200
    assert all(fresh.get(cid(n)) == blob(n, 1000 + n % 500) for n in range(0, 1200, 7))
    assert temp_files(tmp_path) == []


def test_batches_spanning_packs_are_written_whole_and_sealed(tmp_path: Path) -> None:
    """insert_many writes a pack's share of a batch in one vectored write: batches that span
    several packs, and a batch of more buffers than one system call takes, all read back."""
    store = LocalChunkStore(tmp_path, pack_size=40 * 1024)
    sizes = {n: 700 + (n * 37) % 5000 for n in range(1500)}
    done: list[int] = []
    for start, count in ((0, 3), (3, 40), (43, 900), (943, 557)):  # 900 buffers > one call's 512
        batch = [(cid(n), blob(n, sizes[n])) for n in range(start, start + count)]
        assert store.insert_many(batch) == [True] * count
        done += range(start, start + count)
        assert all(store.get(cid(n)) == blob(n, sizes[n]) for n in done[-count:][::13])
    assert store.insert_many([(cid(5), b"other"), (cid(2000), b"new"), (cid(2000), b"new")]) == [
        False,
        True,
        False,
    ]
    store.flush()
    packs = sealed_packs(tmp_path)
    assert len(packs) > 10
    with open(packs[0], "rb") as f:
        names = {e[0] for e in footer_entries(read_footer(f.fileno(), packs[0])[1])}
    assert names and names <= {cid(n) for n in done}
    fresh = LocalChunkStore(tmp_path)
    assert len(list(fresh.list())) == 1501
    assert all(fresh.get(cid(n)) == blob(n, sizes[n]) for n in done)
    assert fresh.get(cid(5)) == blob(5, sizes[5]) and fresh.get(cid(2000)) == b"new"
    assert temp_files(tmp_path) == []


entries = st.lists(
    st.tuples(st.binary(min_size=32, max_size=32), st.integers(8, 2**31), st.integers(0, 2**24)), max_size=60
)


@settings(max_examples=50, deadline=None)
@given(entries)
def test_footer_round_trip(
    tmp_path_factory: pytest.TempPathFactory, items: list[tuple[bytes, int, int]]
) -> None:
    path = tmp_path_factory.mktemp("footer") / "p.pack"
    end = 8 + 1000
    path.write_bytes(b"SRLP\x02\x00\x00\x00" + bytes(1000) + encode_footer(items, end))
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, body = read_footer(fd, path)
    finally:
        os.close(fd)
    assert offset == end and list(footer_entries(body)) == items


@given(
    st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32))),
    st.integers(1, 51),
)
def test_tombstones_round_trip_and_a_torn_record_is_dropped(
    pairs: list[tuple[bytes, bytes]], cut: int
) -> None:
    data = b"SRLD\x02\x00\x00\x00" + b"".join(encode_tombstone(p, c) for p, c in pairs)
    assert decode_tombstones(data) == pairs
    if pairs:
        assert decode_tombstones(data[:-cut]) == pairs[:-1]
