"""In-memory chunk and object stores: fakes for unit tests and embedded experiments.

They keep everything in dicts behind one lock each, so they are thread safe, and they pass the
same contract suite (``tests/contract/test_chunk_store.py``) as the real adapters. Nothing is
durable: ``flush`` does nothing because there is nothing to make durable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

from siterecovery.adapters.chunk_stores.local import check_object_name
from siterecovery.errors import ChunkMissing, InvalidInput
from siterecovery.ports.chunk_store import ChunkInfo, ObjectMissing


def _check_id(chunk_id: bytes) -> None:
    if len(chunk_id) != 32:
        raise InvalidInput(f"a chunk id is 32 bytes, got {len(chunk_id)}.")


class MemoryChunkStore:
    """A :class:`~siterecovery.ports.chunk_store.ChunkStore` held in a dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[bytes, tuple[bytes, float]] = {}

    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        _check_id(chunk_id)
        now = time.time()
        with self._lock:
            old = self._blobs.get(chunk_id)
            if old is not None:
                self._blobs[chunk_id] = (old[0], now)
                return False
            self._blobs[chunk_id] = (bytes(blob), now)
            return True

    def get(self, chunk_id: bytes) -> bytes:
        with self._lock:
            entry = self._blobs.get(chunk_id)
        if entry is None:
            raise ChunkMissing(chunk_id=chunk_id.hex())
        return entry[0]

    def contains(self, chunk_id: bytes) -> bool:
        with self._lock:
            return chunk_id in self._blobs

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        with self._lock:
            return {c for c in chunk_ids if c not in self._blobs}

    def flush(self) -> None:
        return None

    def delete(self, chunk_id: bytes) -> None:
        with self._lock:
            self._blobs.pop(chunk_id, None)

    def list(self) -> Iterator[ChunkInfo]:
        # A snapshot, so callers may insert or delete while iterating.
        with self._lock:
            items = [ChunkInfo(k, len(v[0]), v[1]) for k, v in self._blobs.items()]
        return iter(items)

    def set_mtime(self, chunk_id: bytes, mtime: float) -> None:
        """Test helper: pretend the chunk was last inserted at ``mtime``."""
        with self._lock:
            blob, _ = self._blobs[chunk_id]
            self._blobs[chunk_id] = (blob, mtime)

    def corrupt(self, chunk_id: bytes, blob: bytes) -> None:
        """Test helper: replace a stored blob (simulates bit rot)."""
        with self._lock:
            _, mtime = self._blobs[chunk_id]
            self._blobs[chunk_id] = (bytes(blob), mtime)


class MemoryObjectStore:
    """An :class:`~siterecovery.ports.chunk_store.ObjectStore` held in a dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, bytes] = {}

    def put(self, name: str, data: bytes) -> None:
        check_object_name(name)
        with self._lock:
            self._objects[name] = bytes(data)

    def get(self, name: str) -> bytes:
        with self._lock:
            data = self._objects.get(name)
        if data is None:
            raise ObjectMissing(name)
        return data

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            names = sorted(n for n in self._objects if n.startswith(prefix))
        return iter(names)

    def delete(self, name: str) -> None:
        with self._lock:
            self._objects.pop(name, None)
