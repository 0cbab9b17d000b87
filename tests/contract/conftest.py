"""Fixtures for the contract suites: one parameter per adapter of each port.

To add an adapter, add a parameter to ``chunk_store`` / ``object_store`` that builds it; every
test of ``test_chunk_store.py`` then runs against it too.

``s3`` runs against the session's SeaweedFS server (``tests/conftest.py``), each test in a fresh
prefix. Its packs are kept small (64 KiB) so that the tests go through sealed and uploaded
packs and ranged reads, not only the in-memory open pack.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.adapters.chunk_stores import (
    LocalChunkStore,
    LocalObjectStore,
    MemoryChunkStore,
    MemoryObjectStore,
)
from siterecovery.ports.chunk_store import ChunkStore, ObjectStore

S3_PACK_SIZE = 64 * 1024


@pytest.fixture(params=["local", "memory", "s3"])
def chunk_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    if request.param == "local":
        yield LocalChunkStore(tmp_path / "ds")
    elif request.param == "memory":
        yield MemoryChunkStore()
    else:
        from siterecovery.adapters.chunk_stores import S3ChunkStore

        yield S3ChunkStore(
            request.getfixturevalue("s3_location"),
            client=request.getfixturevalue("s3_client"),
            pack_size=S3_PACK_SIZE,
        )


@pytest.fixture(params=["local", "memory", "s3"])
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
    elif request.param == "memory":
        yield MemoryObjectStore()
    else:
        from siterecovery.adapters.chunk_stores import S3ObjectStore

        yield S3ObjectStore(
            request.getfixturevalue("s3_location").child("objects"),
            client=request.getfixturevalue("s3_client"),
        )
