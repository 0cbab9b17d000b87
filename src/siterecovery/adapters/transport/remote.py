"""A process server on the other end of the wire, as the agent sees it.

:class:`RemoteProcessServer` plays two parts for an agent in distributed mode:

* the process server of :class:`~siterecovery.dataplane.replicate.Agent` (``missing``, ``put``);
* the :class:`~siterecovery.ports.chunk_store.ChunkStore` of the agent's datastore view, through
  which the agent's ``IndexWriter`` stores index pages, its ``IndexReader`` reads the base
  point's pages, ``Datastore.index_writer`` has the process server refresh its view of the
  datastore (SYNC, as it syncs a shared chunk store) and ``Datastore.write_manifest`` flushes
  (FLUSH: everything acknowledged is durable in the datastore) before the control plane writes
  the manifest. So the agent never touches the datastore itself.

Batching and the order of durability: ``put`` only queues a chunk; a batch goes out (PUT, then
ACK after the process server's spool fsync'ed it) when it reaches ``batch_bytes``. Before an
index page is stored (``insert``), and in ``flush``, every queued and in-flight batch is sent
and acknowledged first. An index page therefore never becomes durable before the data chunks it
refers to, which keeps every checkpoint of an interrupted initial replication and every
manifest valid even if the agent dies at any moment.

``put`` returns ``len(blob)`` as the bytes stored: the agent sends only what the process server
just reported lacking, so that is what it will store (a chunk racing in from another agent
makes the figure slightly high, never the data wrong).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence

from siterecovery.adapters.transport.tls import FrameClient, TransportError
from siterecovery.dataplane.wire import (
    MAX_BODY,
    FrameType,
    decode_ack,
    decode_ids,
    encode_ids,
    encode_json,
    encode_put,
    put_size,
)
from siterecovery.errors import OperationNotAllowed
from siterecovery.ports.chunk_store import ChunkInfo

MISSING_IDS_PER_FRAME = 65536  # 2 MiB of ids


class RemoteProcessServer:
    """The agent's side of a process server (see the module docstring). Thread safe."""

    def __init__(
        self, client: FrameClient, *, batch_bytes: int = 4 * 1024 * 1024, flush_timeout: float = 120.0
    ):
        self.client = client
        self.batch_bytes = min(batch_bytes, MAX_BODY // 2)
        self.flush_timeout = flush_timeout
        self._cv = threading.Condition()
        self._queued: list[tuple[bytes, bytes]] = []
        self._queued_bytes = 0
        self._inflight: dict[int, list[tuple[bytes, bytes]]] = {}
        self._failed: dict[int, BaseException] = {}
        self._next_batch = 1
        self.received_bytes = 0
        self.stored_bytes = 0

    def close(self) -> None:
        self.client.close()

    # -- the process-server part ----------------------------------------------------------

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        ids = list(chunk_ids)
        lacking: set[bytes] = set()
        for i in range(0, len(ids), MISSING_IDS_PER_FRAME):
            reply = self.client.call(
                FrameType.MISSING, encode_ids(ids[i : i + MISSING_IDS_PER_FRAME]), FrameType.LACKING
            )
            lacking.update(decode_ids(reply.body))
        return lacking

    def put(self, chunk_id: bytes, blob: bytes) -> int:
        """Queue an encoded chunk; the batch goes out when full (see the module docstring)."""
        return self.put_many([(chunk_id, blob)])

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Queue encoded chunks; a batch goes out whenever the queue is full."""
        total = 0
        for chunk_id, blob in items:
            batch: list[tuple[bytes, bytes]] | None = None
            with self._cv:
                self._queued.append((chunk_id, blob))
                self._queued_bytes += len(blob) + 36
                self.received_bytes += len(blob)
                self.stored_bytes += len(blob)
                if self._queued_bytes >= self.batch_bytes:
                    batch_no, batch = self._take_queue()
            if batch is not None:
                self._send(batch_no, batch)
            total += len(blob)
        return total

    def send_queued(self) -> None:
        """Send what is queued and wait until every batch queued so far is acknowledged."""
        with self._cv:
            batch_no, batch = self._take_queue()
            waiting_for = set(self._inflight) - {batch_no}
        if batch:
            self._send(batch_no, batch)
        with self._cv:
            while waiting_for & set(self._inflight):
                self._cv.wait(1.0)
            failed = [self._failed[n] for n in waiting_for if n in self._failed]
        if failed:
            raise TransportError(
                f"a batch of chunks sent by another thread was not acknowledged: {failed[0]}"
            ) from failed[0]

    def _take_queue(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Move the queue to a new in-flight batch (lock held)."""
        batch_no = self._next_batch
        self._next_batch += 1
        batch, self._queued, self._queued_bytes = self._queued, [], 0
        if batch:
            self._inflight[batch_no] = batch
        return batch_no, batch

    def _send(self, batch_no: int, batch: list[tuple[bytes, bytes]]) -> list[bool]:
        flags: list[bool] = []
        try:
            for part in _split(batch, self.batch_bytes):
                reply = self.client.call(FrameType.PUT, encode_put(part), FrameType.ACK)
                got = decode_ack(reply.body)
                if len(got) != len(part):
                    raise TransportError(
                        f"the process server acknowledged {len(got)} chunks of a batch of {len(part)}."
                    )
                flags += got
        except BaseException as err:
            with self._cv:
                self._failed[batch_no] = err
                self._inflight.pop(batch_no, None)
                self._cv.notify_all()
            raise
        with self._cv:
            self._inflight.pop(batch_no, None)
            self._cv.notify_all()
        return flags

    # -- the chunk-store part (index pages, base index reads, flush) -----------------------

    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        """Store an index page, after every data chunk queued before it (durable on return)."""
        self.send_queued()
        with self._cv:
            batch_no = self._next_batch
            self._next_batch += 1
            self._inflight[batch_no] = [(chunk_id, blob)]
        return self._send(batch_no, [(chunk_id, blob)])[0]

    def get(self, chunk_id: bytes) -> bytes:
        with self._cv:
            for cid, blob in self._queued:
                if cid == chunk_id:
                    return blob
            for batch in self._inflight.values():
                for cid, blob in batch:
                    if cid == chunk_id:
                        return blob
        return self.client.call(FrameType.GET, encode_ids([chunk_id]), FrameType.CHUNK).body

    def contains(self, chunk_id: bytes) -> bool:
        return not self.missing([chunk_id])

    def flush(self) -> None:
        """Everything put or inserted so far is durable in the datastore when this returns."""
        self.send_queued()
        self.client.call(FrameType.FLUSH, encode_json({"timeout": self.flush_timeout}), FrameType.FLUSHED)

    def sync(self) -> None:
        """The process server reloads its view of the datastore if a gc changed it (SYNC); the
        datastore calls this before it starts an index, as it does for a shared chunk store."""
        self.client.call(FrameType.SYNC, b"", FrameType.SYNCED)

    def delete(self, chunk_id: bytes) -> None:
        raise OperationNotAllowed(
            "an agent cannot delete chunks through a process server; garbage collection runs where "
            "the datastore is ('siterecovery datastore gc')."
        )

    def list(self) -> Iterator[ChunkInfo]:
        raise OperationNotAllowed(
            "an agent cannot list the datastore through a process server; run datastore commands "
            "where the datastore is."
        )


def _split(batch: list[tuple[bytes, bytes]], limit: int) -> Iterator[list[tuple[bytes, bytes]]]:
    part: list[tuple[bytes, bytes]] = []
    size = 0
    for item in batch:
        n = put_size([item])
        if part and size + n > limit:
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        yield part
