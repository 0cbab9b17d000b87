"""A datastore on a real S3 server (SeaweedFS started by the fixtures): round trips through the
real replication engine, gc with repack, a crash between a pack and its index, an unreachable
server and refused credentials. The pack formats' round trips (no server) are at the end."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3server import ACCESS_KEY, SECRET_KEY, SeaweedS3, closed_port
from siterecovery.adapters.chunk_stores.s3 import (
    IndexData,
    S3ChunkStore,
    S3Location,
    decode_index,
    decode_tombstones,
    encode_index,
    encode_tombstones,
    make_client,
)
from siterecovery.adapters.sources.raw import RawSource
from siterecovery.bootstrap import embedded_agent
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.manifest import Manifest
from siterecovery.errors import ChunkMissing, DatastoreError, InvalidInput, NotFound

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
PACK = 1 * MIB  # small packs, so that a few MiB of disk make several of them


def url_of(loc: S3Location) -> str:
    return f"s3://{loc.bucket}/{loc.prefix}?endpoint={loc.endpoint_url}"


def open_ds(loc: S3Location, key: VaultKey, *, create: bool = False, pack_size: int = PACK) -> Datastore:
    return Datastore.open_s3(
        url_of(loc), key, create=create, access_key=ACCESS_KEY, secret_key=SECRET_KEY, pack_size=pack_size
    )


def keys_under(client: Any, loc: S3Location, sub: str) -> dict[str, int]:
    """Object key -> size of every object under the location's prefix + ``sub``."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix + sub):
        for obj in page.get("Contents", ()):
            out[obj["Key"]] = obj["Size"]
    return out


def write_image(path: Path, chunks: int, seed: int, *, zero_every: int = 5, repeat_every: int = 7) -> bytes:
    """A disk image of random chunks, with some all-zero chunks and some repeated ones (dedup)."""
    rng = random.Random(seed)
    img = bytearray(chunks * CHUNK_SIZE + 4096)  # a partial last chunk
    repeated = rng.randbytes(CHUNK_SIZE)
    for no in range(chunks):
        if no % zero_every == 0:
            continue
        piece = repeated if no % repeat_every == 0 else rng.randbytes(CHUNK_SIZE)
        img[no * CHUNK_SIZE : (no + 1) * CHUNK_SIZE] = piece
    img[-100:] = rng.randbytes(100)
    path.write_bytes(img)
    return bytes(img)


def change_chunks(path: Path, numbers: list[int], seed: int) -> bytes:
    rng = random.Random(seed)
    img = bytearray(path.read_bytes())
    for no in numbers:
        img[no * CHUNK_SIZE : (no + 1) * CHUNK_SIZE] = rng.randbytes(CHUNK_SIZE)
    path.write_bytes(img)
    return bytes(img)


def replicate(ds: Datastore, image: Path, base: IndexRef | None) -> IndexRef:
    """One point of a raw image through the real engine (agent + process server, threads)."""
    with RawSource({"disk0": image}).snapshot(["disk0"]) as snap:
        result = embedded_agent(ds, threads=3).replicate_disk(ds, snap.disks["disk0"], base, changed=None)
        snap.commit()
    return result.ref


def point(ds: Datastore, point_id: str, ref: IndexRef) -> None:
    ds.write_manifest(
        Manifest(point_id, "item-1", "vm-1", time.time(), "crash-consistent", "test", {"disk0": ref})
    )


def read_back(ds: Datastore, ref: IndexRef) -> bytes:
    out = bytearray(ref.size)
    for offset, data in ds.read_disk(ref, threads=3):
        out[offset : offset + len(data)] = data
    return bytes(out)


# -- round trip ---------------------------------------------------------------------------


def test_points_round_trip_byte_exact_and_verify(
    s3_location: S3Location, s3_client: Any, tmp_path: Path
) -> None:
    key = VaultKey.generate()
    ds = open_ds(s3_location, key, create=True)
    disk = tmp_path / "disk0.raw"
    img1 = write_image(disk, 96, seed=1)
    ref1 = replicate(ds, disk, None)
    point(ds, "p1", ref1)
    img2 = change_chunks(disk, [3, 4, 50, 95], seed=2)
    ref2 = replicate(ds, disk, ref1)
    point(ds, "p2", ref2)

    # A fresh open reads everything from S3, not from the writer's memory.
    again = open_ds(s3_location, key)
    assert again.list_manifests() == ["p1", "p2"]
    assert read_back(again, again.read_manifest("p1").disks["disk0"]) == img1
    assert read_back(again, again.read_manifest("p2").disks["disk0"]) == img2
    report = again.verify()
    assert report.ok, report.problems
    assert report.points_checked == 2

    # Chunks are packed: far fewer pack objects than chunks, each pack with its index.
    packs = keys_under(s3_client, s3_location, "packs/")
    indexes = keys_under(s3_client, s3_location, "index/")
    chunks = again.stats()["chunks"]
    assert chunks > 70 and 2 <= len(packs) <= chunks // 10
    assert {k.rsplit("/", 1)[1] for k in packs} <= {k.rsplit("/", 1)[1] for k in indexes}
    assert max(packs.values()) >= PACK


def test_open_missing_datastore_and_bad_urls(s3_location: S3Location) -> None:
    with pytest.raises(NotFound, match="Create it first"):
        open_ds(s3_location, VaultKey.generate())
    with pytest.raises(InvalidInput, match="s3://BUCKET/PREFIX"):
        Datastore.open_s3("http://bucket/x", VaultKey.generate())
    with pytest.raises(InvalidInput, match="unknown parameters"):
        S3Location.from_url("s3://bucket/x?endpoint=http://h:1&colour=red")
    loc = S3Location.from_url("s3://bucket//a/b/?endpoint=http://h:1&region=r1")
    assert (loc.bucket, loc.prefix, loc.endpoint_url, loc.region) == ("bucket", "a/b/", "http://h:1", "r1")
    assert S3Location.from_url(loc.url()) == loc


# -- gc and repack ------------------------------------------------------------------------


def test_gc_repacks_and_reclaims_space_remaining_points_verify(
    s3_location: S3Location, s3_client: Any, tmp_path: Path
) -> None:
    key = VaultKey.generate()
    ds = open_ds(s3_location, key, create=True)
    disk = tmp_path / "disk0.raw"
    write_image(disk, 128, seed=3, zero_every=1000, repeat_every=1000)  # all chunks distinct
    ref1 = replicate(ds, disk, None)
    point(ds, "p1", ref1)
    # p2 rewrites 70% of the disk: p1's packs hold 30% of what p2 still needs.
    img2 = change_chunks(disk, [n for n in range(128) if n % 10 < 7], seed=4)
    ref2 = replicate(ds, disk, ref1)
    point(ds, "p2", ref2)

    # Within the grace period no chunk goes (small packs may be merged).
    ds.delete_manifest("p1")
    chunks_before = ds.stats()["chunks"]
    young = ds.gc(grace_seconds=3600)
    assert young.chunks_removed == 0 and ds.stats()["chunks"] == chunks_before
    before = sum(keys_under(s3_client, s3_location, "packs/").values())

    stats = ds.gc(grace_seconds=60, now=time.time() + 120)
    assert stats.chunks_removed >= 85  # p1's own chunks and pages
    assert stats.packs_rewritten >= 1 and stats.packs_removed >= stats.packs_rewritten
    after = sum(keys_under(s3_client, s3_location, "packs/").values())
    assert stats.pack_bytes_freed == before - after
    assert (
        before - after >= 85 * CHUNK_SIZE * 0.9
    )  # ~the removed chunks' bytes (random data barely compresses)

    # The old packs and indexes are gone, nothing dangles, and p2 is whole, seen afresh.
    again = open_ds(s3_location, key)
    packs = {k.rsplit("/", 1)[1] for k in keys_under(s3_client, s3_location, "packs/")}
    indexes = {k.rsplit("/", 1)[1] for k in keys_under(s3_client, s3_location, "index/")}
    assert packs <= indexes
    assert again.stats()["chunks"] == ds.stats()["chunks"] == stats.chunks_marked
    assert read_back(again, ref2) == img2
    report = again.verify()
    assert report.ok and report.points_checked == 1, report.problems
    # A second gc finds nothing more to do.
    assert again.gc(grace_seconds=60, now=time.time() + 120).chunks_removed == 0


def test_a_deleted_chunk_can_be_stored_again_and_survives_repack(
    s3_location: S3Location, s3_client: Any
) -> None:
    store = S3ChunkStore(s3_location, client=s3_client, pack_size=64 * 1024)
    ids = [bytes([n]) * 32 for n in range(1, 9)]
    for cid in ids:
        store.insert(cid, cid * 1000)
    store.flush()
    store.delete(ids[0])
    assert store.insert(ids[0], b"new copy") is True  # a new copy, not hidden by the tombstone
    store.flush()
    for cid in ids[1:5]:
        store.delete(cid)
    store.repack(threshold=0.3)
    fresh = S3ChunkStore(s3_location, client=s3_client)
    assert fresh.get(ids[0]) == b"new copy"
    assert fresh.missing(ids) == set(ids[1:5])
    assert sorted(i.chunk_id for i in fresh.list()) == sorted([ids[0], *ids[5:]])
    with pytest.raises(ChunkMissing):
        fresh.get(ids[2])


def test_another_process_sees_deletions_after_sync(s3_location: S3Location, s3_client: Any) -> None:
    writer = S3ChunkStore(s3_location, client=s3_client)
    cid = b"\x07" * 32
    writer.insert(cid, b"blob")
    writer.flush()
    reader = S3ChunkStore(s3_location, client=s3_client)
    assert reader.contains(cid)
    writer.delete(cid)
    writer.repack()
    assert reader.contains(cid)  # a stale view until it syncs
    reader.sync()
    assert not reader.contains(cid)


def test_a_long_lived_reader_gets_what_another_process_wrote_since(
    s3_location: S3Location, s3_client: Any
) -> None:
    """A worker that opened the datastore before a process server stored new chunks still
    reads them (a failover, a verify): an unknown id makes it reload before it gives up."""
    reader = S3ChunkStore(s3_location, client=s3_client)
    cid = b"\x08" * 32
    with pytest.raises(ChunkMissing):
        reader.get(cid)
    writer = S3ChunkStore(s3_location, client=s3_client)
    writer.insert(cid, b"new since the reader loaded")
    writer.flush()
    assert reader.get(cid) == b"new since the reader loaded"
    with pytest.raises(ChunkMissing):
        reader.get(b"\x09" * 32)  # what nobody wrote is still missing, after one reload


# -- crash between a pack and its index ---------------------------------------------------

_CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    from siterecovery.adapters.chunk_stores.s3 import S3Location, make_client, open_stores
    from siterecovery.dataplane.datastore import Datastore
    from siterecovery.dataplane.keys import VaultKey
    from siterecovery.dataplane.manifest import Manifest

    bucket, prefix, endpoint, access, secret, key_path = sys.argv[1:]
    loc = S3Location(bucket, prefix, endpoint, access_key=access, secret_key=secret)
    client = make_client(loc)

    def crash_before_index(params, **_):
        if "/index/" in params["Key"]:
            os.kill(os.getpid(), signal.SIGKILL)  # the pack is uploaded; its index never will be

    client.meta.events.register("provide-client-params.s3.PutObject", crash_before_index)
    chunks, objects = open_stores(loc, client=client, pack_size=64 << 20)
    ds = Datastore.open(chunks, objects, VaultKey.load(key_path))
    w = ds.index_writer(64 * 65536)
    for no in range(64):
        w.set(no, ds.store_chunk(os.urandom(65536))[0])
    ref = w.commit()
    ds.write_manifest(Manifest("p2", "item-1", "vm-1", time.time(), "crash-consistent", "test", {"d": ref}))
    """
)


def test_crash_between_pack_and_index_loses_nothing_flushed(
    s3_location: S3Location, s3_client: Any, tmp_path: Path
) -> None:
    key = VaultKey.generate()
    key.save(tmp_path / "vault.key")
    ds = open_ds(s3_location, key, create=True)
    disk = tmp_path / "disk0.raw"
    img1 = write_image(disk, 40, seed=5)
    ref1 = replicate(ds, disk, None)
    point(ds, "p1", ref1)
    packs_before = set(keys_under(s3_client, s3_location, "packs/"))

    loc = s3_location
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CRASHING_WRITER,
            loc.bucket,
            loc.prefix,
            str(loc.endpoint_url),
            ACCESS_KEY,
            SECRET_KEY,
            str(tmp_path / "vault.key"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    orphans = set(keys_under(s3_client, s3_location, "packs/")) - packs_before
    assert len(orphans) == 1  # the crashed writer's pack, without its index

    again = open_ds(s3_location, key)
    assert again.list_manifests() == ["p1"]  # p2 was never written: its flush did not return
    assert read_back(again, ref1) == img1
    assert again.verify().ok
    # gc spares the unindexed pack within the grace period (it may be an upload in flight)...
    assert again.gc(grace_seconds=3600).temp_files_removed == 0
    assert set(keys_under(s3_client, s3_location, "packs/")) - packs_before == orphans
    # ...and removes it after.
    assert again.gc(grace_seconds=60, now=time.time() + 120).temp_files_removed == 1
    assert set(keys_under(s3_client, s3_location, "packs/")) == packs_before
    assert read_back(open_ds(s3_location, key), ref1) == img1


# -- unreachable server and refused credentials -------------------------------------------


def test_server_down_at_open_is_an_actionable_datastore_error() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(DatastoreError) as info:
        Datastore.open_s3(
            f"s3://sr-tests/x?endpoint={endpoint}", VaultKey.generate(), access_key="a", secret_key="b"
        )
    message = str(info.value)
    assert f"cannot reach the S3 endpoint {endpoint}" in message
    assert "'sr-tests'" in message and "server is running" in message and "retry" in message
    assert time.monotonic() - started < 30  # botocore's few retries, no retry loop of ours


def test_wrong_secret_names_the_access_key_to_check(s3_server: SeaweedS3, s3_location: S3Location) -> None:
    bad = S3Location(
        s3_location.bucket, s3_location.prefix, s3_location.endpoint_url, None, ACCESS_KEY, "wrong"
    )
    with pytest.raises(DatastoreError) as info:
        S3ChunkStore(bad, client=make_client(bad, max_attempts=1))
    message = str(info.value)
    assert "SignatureDoesNotMatch" in message and repr(ACCESS_KEY) in message
    assert "AWS_SECRET_ACCESS_KEY" in message


@pytest.fixture
def own_server() -> Iterator[SeaweedS3]:
    """A server of this test's own, which it may stop and restart."""
    root = Path(tempfile.mkdtemp(prefix="sr-s3-", dir="/tmp"))
    server = SeaweedS3(root)
    try:
        server.start()
        server.create_bucket("outage")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_outage_fails_flush_keeps_data_and_flush_succeeds_after(own_server: SeaweedS3) -> None:
    loc = S3Location("outage", "ds", own_server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    client = make_client(loc, max_attempts=1, connect_timeout=2)
    store = S3ChunkStore(loc, client=client, pack_size=64 * 1024)
    store.insert(b"\x01" * 32, b"durable")
    store.flush()
    store.insert(b"\x02" * 32, b"waiting")
    own_server.stop()
    with pytest.raises(DatastoreError, match=f"cannot reach the S3 endpoint {own_server.endpoint}"):
        store.flush()
    # Not lost: still readable, still known, and a full pack's failed upload is kept too.
    assert store.get(b"\x02" * 32) == b"waiting"
    with pytest.raises(DatastoreError, match="retry"):
        store.insert(b"\x03" * 32, os.urandom(70_000))  # fills a pack: its upload fails
    assert store.missing([b"\x02" * 32, b"\x03" * 32]) == set()
    own_server.start()
    store.flush()
    fresh = S3ChunkStore(loc, client=make_client(loc))
    assert fresh.get(b"\x01" * 32) == b"durable"
    assert fresh.get(b"\x02" * 32) == b"waiting"
    assert len(fresh.get(b"\x03" * 32)) == 70_000


# -- stored formats (no server) -----------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    entries=st.dictionaries(
        ids, st.tuples(st.integers(0, 2**63), st.integers(0, 2**32 - 1), times), max_size=20
    ),
    touches=st.dictionaries(ids, times, max_size=20),
    pack_size=st.integers(0, 2**63),
    created=times,
)
def test_index_round_trip(
    entries: dict[bytes, tuple[int, int, float]], touches: dict[bytes, float], pack_size: int, created: float
) -> None:
    ix = IndexData(pack_size, created, entries, touches)
    data = encode_index(ix)
    assert data[:5] == b"SRPI\x01"
    assert decode_index(data, "test") == ix


@settings(max_examples=60, deadline=None)
@given(st.sets(st.tuples(st.binary(min_size=16, max_size=16), ids), max_size=30))
def test_tombstones_round_trip(pairs: set[tuple[bytes, bytes]]) -> None:
    data = encode_tombstones(pairs)
    assert data[:5] == b"SRTB\x01"
    assert decode_tombstones(data, "test") == pairs


def test_damaged_or_newer_index_is_refused() -> None:
    data = encode_index(IndexData(10, 1.0, {b"a" * 32: (8, 2, 1.0)}, {}))
    with pytest.raises(DatastoreError, match="checksum"):
        decode_index(data[:20] + bytes([data[20] ^ 1]) + data[21:], "index/x")
    with pytest.raises(DatastoreError, match="format version 2"):
        decode_index(data[:4] + b"\x02" + data[5:], "index/x")
    with pytest.raises(DatastoreError, match="not ours"):
        decode_index(b"XXXX" + data[4:], "index/x")


def test_a_vault_on_s3_replicates_fails_over_and_verifies(lab_factory, s3_location, aws_credentials):
    """The whole path with the datastore on S3: enable, incremental points, a failover built
    from packs, datastore verify and GC (with repack)."""
    from siterecovery.control import failover
    from siterecovery.control.maintenance import run_gc, run_verify
    from siterecovery.control.replication import take_point
    from siterecovery.control.vault import open_vault

    lab = lab_factory(datastore=s3_location.url())
    assert lab.vault.datastore_location == s3_location.url()
    lab.enable("vm1")
    wl = lab.start_workload("vm1")
    time.sleep(0.5)
    wl.stop()
    r = take_point(lab.vault, "vm1")
    assert r.method == "dirty-bitmap" and r.stats.chunks_sent > 0
    # Another process (the CLI) opens the same vault and finds the datastore on S3.
    other = open_vault(lab.vault.root)
    try:
        assert run_verify(other).ok
    finally:
        other.close()
    job = lab.run_job(failover.request_failover(lab.vault, "vm1", planned=True)["job"])
    assert job["state"] == "Succeeded", job["error"]
    rec = lab.item("vm1")["recovered_machine"]
    from siterecovery.demo.verify import disk_specs, nbd_reader, verify_machine

    m = lab.machines["vm1"]
    with nbd_reader(Path(rec["nbd_socket"]), list(m.images)) as reader:
        v = verify_machine(reader, disk_specs(m.regions), wl.log_path, m.base())
    assert v.ok and v.max_seq >= v.last_logged_seq > 0, v.detail
    run_gc(lab.vault, 0)
    assert run_verify(lab.vault).ok
