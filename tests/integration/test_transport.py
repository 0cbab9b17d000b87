"""Agent and process server over real TLS on loopback: replication through the wire, mutual
authentication, resending after a broken connection, backpressure and the bandwidth limit."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.adapters.chunk_stores import MemoryChunkStore
from siterecovery.adapters.sources.raw import RawDiskView
from siterecovery.adapters.transport import query_status
from siterecovery.adapters.transport.bandwidth import BandwidthSchedule, TokenBucket
from siterecovery.adapters.transport.remote import RemoteProcessServer
from siterecovery.adapters.transport.server import ProcessServerService
from siterecovery.adapters.transport.tls import (
    FrameClient,
    FrameServer,
    TransportError,
    client_context,
    server_context,
)
from siterecovery.control.certificates import Bundle, VaultCA, write_bundle
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.manifest import Manifest
from siterecovery.dataplane.replicate import Agent
from siterecovery.dataplane.spool import Spool
from siterecovery.entrypoints.process_server import ProcessServerConfig, RunningProcessServer
from siterecovery.errors import DatastoreError

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@dataclass
class Pki:
    ps: Bundle
    agent: Bundle
    ca: VaultCA


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = VaultCA.load_or_create(tmp_path / "vault", "lab")
    return Pki(
        write_bundle(
            tmp_path / "ps-certs", ca.issue("ps1", "process-server", hosts=["127.0.0.1", "localhost"])
        ),
        write_bundle(tmp_path / "agent-certs", ca.issue("vault-lab", "agent")),
        ca,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_for(bundle: Bundle, port: int, agent: str = "vault-lab", **kw: object) -> FrameClient:
    return FrameClient("127.0.0.1", port, client_context(bundle.cert, bundle.key, bundle.ca), agent, **kw)  # type: ignore[arg-type]


@pytest.fixture
def datastore(tmp_path: Path) -> Datastore:
    return Datastore.open_local(tmp_path / "ds", VaultKey.generate(), create=True)


@pytest.fixture
def server(tmp_path: Path, pki: Pki, datastore: Datastore) -> Iterator[RunningProcessServer]:
    cfg = ProcessServerConfig(
        datastore=str(tmp_path / "ds"),
        spool=tmp_path / "spool",
        spool_limit=64 * MIB,
        certs=pki.ps.cert.parent,
        data="127.0.0.1:0",
        control="127.0.0.1:0",
    )
    srv = RunningProcessServer(cfg)
    yield srv
    srv.close()


def manifest_of(point_id: str, ref: IndexRef) -> Manifest:
    """The manifest of a one-disk point of a raw image (what the control plane would write)."""
    return Manifest(
        format=1,
        point_id=point_id,
        item="vm1",
        machine="vm1",
        created_at=time.time(),
        consistency="fuzzy",
        method="initial",
        disks={"disk0": ref},
        stats={},
    )


def disk_image(path: Path, size: int, seed: int) -> Path:
    rnd = __import__("random").Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 5 * 65536):
            f.seek(off)
            f.write(rnd.randbytes(65536))
    return path


def test_replication_through_a_process_server_is_byte_exact_and_deduplicated(
    tmp_path: Path, pki: Pki, datastore: Datastore, server: RunningProcessServer
) -> None:
    img = disk_image(tmp_path / "disk0.img", 8 * MIB, seed=1)
    remote = RemoteProcessServer(client_for(pki.agent, server.data_address[1]), batch_bytes=256 * 1024)
    view_ds = Datastore(remote, datastore.objects, datastore.key, datastore.chunk_size)  # type: ignore[arg-type]
    agent = Agent(view_ds.codec, remote)  # type: ignore[arg-type]
    view = RawDiskView("disk0", img)
    try:
        result = agent.replicate_disk(view_ds, view, None, changed=None)
        view_ds.write_manifest(manifest_of("rp-1", result.ref))  # flushes through the process server first
        assert result.stats.chunks_sent == len(range(0, 8 * MIB, 5 * 65536))

        # Everything is durable in the datastore itself, not only in the spool.
        assert server.status()["spool"]["not_durable_chunks"] == 0
        assert datastore.verify().ok
        data = img.read_bytes()
        for off, chunk in datastore.read_disk(datastore.read_manifest("rp-1").disks["disk0"]):
            assert chunk == data[off : off + len(chunk)]

        # A second point of the same disk sends nothing: the process server has every chunk.
        again = agent.replicate_disk(view_ds, view, result.ref, changed=None)
        assert again.stats.chunks_sent == 0 and again.ref == result.ref
    finally:
        view.close()
        remote.close()


def test_chunks_a_gc_elsewhere_removed_are_sent_again(
    tmp_path: Path, pki: Pki, datastore: Datastore, server: RunningProcessServer
) -> None:
    """The process server's view of the datastore is refreshed (SYNC) when an index starts, so
    a gc run by the vault between two points never leaves a point referring to a chunk that
    the process server still believed it had."""
    img = disk_image(tmp_path / "disk0.img", 4 * MIB, seed=3)
    remote = RemoteProcessServer(client_for(pki.agent, server.data_address[1]), batch_bytes=256 * 1024)
    view_ds = Datastore(remote, datastore.objects, datastore.key, datastore.chunk_size)  # type: ignore[arg-type]
    view = RawDiskView("disk0", img)

    def point(point_id: str) -> int:
        agent = Agent(view_ds.codec, remote)  # type: ignore[arg-type]  # one per cycle, as the worker does
        result = agent.replicate_disk(view_ds, view, None, changed=None)
        view_ds.write_manifest(manifest_of(point_id, result.ref))
        return result.stats.chunks_sent

    try:
        sent = point("rp-1")
        assert sent > 0
        # The vault drops the point and collects its chunks (another datastore instance: another
        # process as far as the process server's chunk store can tell).
        datastore.delete_manifest("rp-1")
        gc = datastore.gc(grace_seconds=0, now=time.time() + 1)
        assert gc.chunks_removed >= sent
        # The same disk again: every chunk must travel again, and the point must be whole.
        assert point("rp-2") == sent
        report = Datastore.open_local(tmp_path / "ds", datastore.key).verify()
        assert report.ok and report.points_checked == 1, report.problems[:3]
    finally:
        view.close()
        remote.close()


def test_status_on_the_control_port(pki: Pki, server: RunningProcessServer) -> None:
    st = query_status(f"127.0.0.1:{server.control_address[1]}", pki.agent.cert.parent)
    assert st["name"] == "ps1"
    assert st["spool"]["state"] == "ok" and st["spool"]["backlog_chunks"] == 0


def test_an_agent_from_another_vault_is_refused(
    tmp_path: Path, pki: Pki, server: RunningProcessServer
) -> None:
    other = VaultCA.load_or_create(tmp_path / "other-vault", "other")
    stranger = write_bundle(tmp_path / "stranger", other.issue("vault-lab", "agent"))
    stranger.ca.write_bytes(pki.ca.ca_pem)  # it trusts our process server, but we do not trust it
    client = client_for(stranger, server.data_address[1], retry_for=0)
    with pytest.raises(TransportError, match="refused this agent's certificate"):
        RemoteProcessServer(client).missing([bytes(32)])


def test_an_agent_must_hello_with_its_certificate_name(pki: Pki, server: RunningProcessServer) -> None:
    client = client_for(pki.agent, server.data_address[1], agent="someone-else", retry_for=0)
    with pytest.raises(TransportError, match="certificate is issued to 'vault-lab'"):
        RemoteProcessServer(client).missing([bytes(32)])


def test_an_agent_certificate_cannot_act_as_a_process_server(tmp_path: Path, pki: Pki) -> None:
    # The agent's certificate lacks serverAuth: a client refuses a server presenting it.
    fake = FrameServer(
        "127.0.0.1",
        0,
        server_context(pki.agent.cert, pki.agent.key, pki.agent.ca),
        lambda f, a: (f.type, b""),
        name="fake",
    ).start()
    try:
        client = FrameClient(
            "localhost",
            fake.address[1],
            client_context(pki.agent.cert, pki.agent.key, pki.agent.ca),
            "vault-lab",
        )
        with pytest.raises(TransportError, match="not trusted"):
            RemoteProcessServer(client).missing([bytes(32)])
    finally:
        fake.close()


def _service(
    tmp_path: Path, pki: Pki, store: MemoryChunkStore, port: int, limit: int = 64 * MIB
) -> FrameServer:
    spool = Spool(tmp_path / "spool", store, limit, flush_interval=0.05, retry_max=0.2)
    service = ProcessServerService(spool, "ps1", max_batch=1 * MIB)
    srv = FrameServer(
        "127.0.0.1", port, server_context(pki.ps.cert, pki.ps.key, pki.ps.ca), service.handle_data, name="ps1"
    ).start()
    srv.spool = spool  # type: ignore[attr-defined]
    return srv


def _stop(srv: FrameServer) -> None:
    srv.close()
    srv.spool.close()  # type: ignore[attr-defined]


def test_a_batch_interrupted_by_a_process_server_restart_is_sent_again(tmp_path: Path, pki: Pki) -> None:
    store = MemoryChunkStore()
    port = free_port()
    srv = _service(tmp_path, pki, store, port)
    client = client_for(pki.agent, port)
    remote = RemoteProcessServer(client, batch_bytes=1 * MIB)
    items = [(os.urandom(32), os.urandom(50_000)) for _ in range(60)]
    for cid, blob in items[:30]:
        remote.put(cid, blob)
    remote.flush()
    _stop(srv)  # the process server goes away; the pooled connection is now dead

    restarted: list[FrameServer] = []

    def restart() -> None:
        time.sleep(1.0)
        restarted.append(_service(tmp_path, pki, store, port))

    t = threading.Thread(target=restart)
    t.start()
    try:
        for cid, blob in items[30:]:
            remote.put(cid, blob)
        remote.flush()  # blocks, reconnects and resends until the new process server acknowledges
        t.join()
        assert client.reconnects > 0
        assert all(store.get(cid) == blob for cid, blob in items)
    finally:
        t.join()
        for s in restarted:
            _stop(s)
        remote.close()


class OutageStore(MemoryChunkStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()

    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        if self.down.is_set():
            raise DatastoreError("the S3 endpoint does not answer")
        return super().insert(chunk_id, blob)

    def flush(self) -> None:
        if self.down.is_set():
            raise DatastoreError("the S3 endpoint does not answer")


def test_a_full_spool_slows_the_agent_down_and_nothing_is_dropped(tmp_path: Path, pki: Pki) -> None:
    store = OutageStore()
    store.down.set()
    port = free_port()
    srv = _service(tmp_path, pki, store, port, limit=2 * MIB)
    client = client_for(pki.agent, port)
    remote = RemoteProcessServer(client, batch_bytes=256 * 1024)
    items = [(os.urandom(32), os.urandom(64 * 1024)) for _ in range(64)]  # 4 MiB through a 2 MiB spool
    threading.Timer(1.5, store.down.clear).start()
    try:
        for cid, blob in items:
            remote.put(cid, blob)
        remote.flush()
        assert client.busy_waits > 0
        assert all(store.get(cid) == blob for cid, blob in items)
    finally:
        remote.close()
        _stop(srv)


def test_a_datastore_outage_fails_the_flush_with_the_reason(tmp_path: Path, pki: Pki) -> None:
    store = OutageStore()
    store.down.set()
    port = free_port()
    srv = _service(tmp_path, pki, store, port)
    remote = RemoteProcessServer(client_for(pki.agent, port), flush_timeout=1.0)
    try:
        remote.put(os.urandom(32), b"x" * 1000)
        with pytest.raises(DatastoreError, match="S3 endpoint does not answer.*Nothing is lost"):
            remote.flush()
        store.down.clear()
        remote.flush()
    finally:
        remote.close()
        _stop(srv)


def test_the_bandwidth_limit_paces_the_sender(tmp_path: Path, pki: Pki) -> None:
    store = MemoryChunkStore()
    port = free_port()
    srv = _service(tmp_path, pki, store, port)
    limiter = TokenBucket(BandwidthSchedule.parse("2"))  # 2 MB/s
    remote = RemoteProcessServer(client_for(pki.agent, port, limiter=limiter), batch_bytes=256 * 1024)
    try:
        t0 = time.monotonic()
        for _ in range(64):
            remote.put(os.urandom(32), os.urandom(64 * 1024))  # 4.2 MB
        remote.flush()
        elapsed = time.monotonic() - t0
        # 4.2 MB at 2 MB/s, with at most one second of burst: at least ~1.1 s.
        assert elapsed >= 1.0
    finally:
        remote.close()
        _stop(srv)
