"""Datastore maintenance and the lock that keeps it from racing replication.

Garbage collection marks from the manifests it lists, then sweeps. A replication cycle writes
a new point whose index shares unchanged pages with its base point without re-inserting them,
so a sweep must never overlap a cycle (or retention deleting manifests). The rule, across
processes of one vault (the worker, CLI commands):

=====================  ==================
who                    lock on run/datastore.lock
=====================  ==================
replication cycle      shared
test failover (read)   shared
verify                 shared
garbage collection     exclusive
=====================  ==================
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def datastore_lock(vault: Any, *, exclusive: bool = False) -> Iterator[None]:
    run = Path(vault.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / "datastore.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def run_gc(vault: Any, grace_seconds: float) -> Any:
    with datastore_lock(vault, exclusive=True):
        return vault.datastore.gc(grace_seconds)


def run_verify(vault: Any, progress: Callable[[int, int], None] | None = None) -> Any:
    with datastore_lock(vault):
        return vault.datastore.verify(progress=progress)
