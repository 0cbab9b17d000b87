"""Fixtures for the contract suites: one parameter per adapter of each port.

To add an adapter (e.g. S3 packs), add a parameter to ``chunk_store`` / ``object_store`` that
builds it; every test of ``test_chunk_store.py`` then runs against it too.
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


@pytest.fixture(params=["local", "memory"])
def chunk_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    if request.param == "local":
        yield LocalChunkStore(tmp_path / "ds")
    else:
        yield MemoryChunkStore()


@pytest.fixture(params=["local", "memory"])
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
    else:
        yield MemoryObjectStore()
