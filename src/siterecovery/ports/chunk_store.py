"""The chunk store port: content-addressed storage of encoded chunks.

A chunk is identified by its id (32 bytes: keyed BLAKE3 of the plaintext). The store holds the
*encoded* form (header, zstd, AES-256-GCM; see ``dataplane.chunk_codec``) and never looks inside.
Index pages are stored as chunks too, so one store and one garbage collector serve both.

Every adapter (local directory, S3 packs, the in-memory fake) must pass
``tests/contract/test_chunk_store.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ChunkInfo:
    """One stored chunk as listed by :meth:`ChunkStore.list`."""

    chunk_id: bytes
    size: int
    mtime: float  # seconds since the epoch of the last insert (or re-insert) of this chunk


class ChunkStore(Protocol):
    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        """Store ``blob`` under ``chunk_id``; return True if it was new, False if it existed.

        Atomic: after a crash at any moment the chunk is either absent or complete. Idempotent:
        inserting an id that exists does not rewrite it but refreshes its mtime, so that a
        garbage collection running at the same time (which spares chunks newer than its grace
        period) cannot sweep a chunk that a new recovery point just referred to.
        Raises ``StorageFull`` when there is no room (nothing partial is left behind) and
        ``DatastoreError`` for other failures.
        """
        ...

    def get(self, chunk_id: bytes) -> bytes:
        """Return the stored blob. Raises ``ChunkMissing`` if absent."""
        ...

    def contains(self, chunk_id: bytes) -> bool:
        """True if the chunk is stored."""
        ...

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        """Return the subset of ``chunk_ids`` that is not stored (the dedup question)."""
        ...

    def flush(self) -> None:
        """Make every chunk inserted so far durable (survive a power loss).

        ``insert`` need not fsync each chunk; the datastore calls ``flush`` once before it
        writes a manifest that refers to them, which keeps every manifest valid after a crash.
        """
        ...

    def delete(self, chunk_id: bytes) -> None:
        """Remove the chunk; removing an absent chunk is not an error."""
        ...

    def list(self) -> Iterator[ChunkInfo]:
        """Every stored chunk, in no particular order. Safe to call while inserts run."""
        ...


def insert_all(store: ChunkStore, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
    """``store.insert`` of each ``(chunk_id, blob)`` in order; a store that can do a batch in one
    step (``insert_many``, same result) does it so."""
    many = getattr(store, "insert_many", None)
    if many is not None:
        flags: list[bool] = many(items)
        return flags
    return [store.insert(chunk_id, blob) for chunk_id, blob in items]


class ObjectMissing(KeyError):
    """An object name that is not in the object store."""


class ObjectStore(Protocol):
    """Named small objects: datastore config and recovery point manifests."""

    def put(self, name: str, data: bytes) -> None:
        """Write ``data`` under ``name`` atomically (replacing any previous object)."""
        ...

    def get(self, name: str) -> bytes:
        """Return the object. Raises ``ObjectMissing`` if absent."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Names that start with ``prefix``, sorted."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object; removing an absent object is not an error."""
        ...
