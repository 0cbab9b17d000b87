"""Chunk store adapters: local directory and in-memory fakes (S3 packs live in ``s3``)."""

from siterecovery.adapters.chunk_stores.local import LocalChunkStore, LocalObjectStore
from siterecovery.adapters.chunk_stores.memory import MemoryChunkStore, MemoryObjectStore

__all__ = ["LocalChunkStore", "LocalObjectStore", "MemoryChunkStore", "MemoryObjectStore"]
