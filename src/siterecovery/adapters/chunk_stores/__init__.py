"""Chunk store adapters: local directory, in-memory fakes, and S3 packs (``s3``).

The S3 names are imported on first use: boto3 takes ~0.4 s to import, which commands that
never touch S3 should not pay.
"""

from typing import Any

from siterecovery.adapters.chunk_stores.local import LocalChunkStore, LocalObjectStore
from siterecovery.adapters.chunk_stores.memory import MemoryChunkStore, MemoryObjectStore

__all__ = [
    "LocalChunkStore",
    "LocalObjectStore",
    "MemoryChunkStore",
    "MemoryObjectStore",
    "S3ChunkStore",
    "S3Location",
    "S3ObjectStore",
]

_S3_NAMES = frozenset({"S3ChunkStore", "S3Location", "S3ObjectStore"})


def __getattr__(name: str) -> Any:
    if name in _S3_NAMES:
        from siterecovery.adapters.chunk_stores import s3

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
