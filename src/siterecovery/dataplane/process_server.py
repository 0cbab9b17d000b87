"""The process server role: receives encoded chunks from agents and writes them to the datastore.

Agents ask :meth:`ProcessServer.missing` before they encode and send, so a chunk that the
datastore already holds (from an earlier point, another disk or another machine) never travels
twice. In embedded mode the agent calls this object directly; the distributed transport puts a
wire protocol between the two without changing either side.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from siterecovery.ports.chunk_store import ChunkStore, insert_all


class ProcessServer:
    """Deduplicates and stores chunks; thread safe; counts what it received and stored."""

    def __init__(self, chunks: ChunkStore) -> None:
        self.chunks = chunks
        self._lock = threading.Lock()
        self.received_bytes = 0
        self.stored_bytes = 0

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        """Which of these ids the datastore lacks (the agent sends only those)."""
        return self.chunks.missing(chunk_ids)

    def put(self, chunk_id: bytes, blob: bytes) -> int:
        """Store one encoded chunk; return the bytes newly stored (0 if it was there already)."""
        return self.put_many([(chunk_id, blob)])

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """``put`` of each ``(chunk_id, blob)``, in one step of the store where it can."""
        flags = insert_all(self.chunks, items)
        received = sum(len(blob) for _, blob in items)
        stored = sum(len(blob) for (_, blob), new in zip(items, flags, strict=True) if new)
        with self._lock:
            self.received_bytes += received
            self.stored_bytes += stored
        return stored
