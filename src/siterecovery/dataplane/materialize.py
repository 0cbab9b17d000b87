"""Materialization: writing a recovery point's disk out as an independent image.

The image is created empty (``qemu-img create`` for qcow2 with 64 KiB clusters, a sparse file
for raw) and only the point's non-zero chunks are written into it, once: raw files directly,
qcow2 through a private ``qemu-storage-daemon`` export (``adapters.compute.image``), so QEMU
lays out the qcow2 clusters. Zero chunks are never written: they stay holes (raw) or unallocated
clusters (qcow2). The result shares nothing with the datastore: writing to it never touches
replicated data. The file appears under its final name only when complete and flushed (written
as ``<name>.partial`` and renamed), so a crash never leaves a half image that looks whole.

Work items are runs of up to :data:`RUN_CHUNKS` consecutive non-zero chunks; each worker thread
fetches and decodes its run's chunks and writes the run with one request, so decoding (AES-GCM,
zstd, BLAKE3 check: all release the GIL) and writing overlap on every core, and at most
``2 * threads`` runs are in memory.

Measured on the development host (2 vCPUs shared with other work, load 1.6-2.5; warm page
cache; local datastore) for a 4 GiB point with 63 % data (41,125 chunks of host files, 1.2 GiB
stored), wall time and CPU time (ours + QEMU's), two runs each:

======  ===========================================  ========================================
format  before (raw file, then qemu-img convert)     after (this module, 2 threads)
======  ===========================================  ========================================
qcow2   14.1-19.5 s (220-305 MB/s), 15.5-17.6 s CPU  7.4-8.4 s (510-579 MB/s), 7.7-9.1 s CPU
raw     7.2-8.1 s (528-594 MB/s), 6.2-10.0 s CPU     7.1-8.7 s (495-606 MB/s), 8.8-10.5 s CPU
======  ===========================================  ========================================

The qcow2 gain is writing once (no raw copy, no convert) and O_DIRECT in the daemon (the page
cache cost QEMU 3-4 s of CPU per run); raw is unchanged within the noise of a shared host.
"""

from __future__ import annotations

import os
import subprocess
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef
from siterecovery.errors import DatastoreError, OutOfRange, StorageFull
from siterecovery.ports.compute import DiskWriter

RUN_CHUNKS = 64  # chunks per write request: 4 MiB at 64 KiB chunks
DEFAULT_THREADS = 2


def _runs(datastore: Datastore, ref: IndexRef) -> Iterator[list[tuple[int, bytes]]]:
    """Runs of consecutive non-zero chunks ``[(chunk_no, id), ...]``, at most RUN_CHUNKS long."""
    run: list[tuple[int, bytes]] = []
    for chunk_no, chunk_id in datastore.index_reader(ref).nonzero_entries():
        if run and (run[-1][0] + 1 != chunk_no or len(run) >= RUN_CHUNKS):
            yield run
            run = []
        run.append((chunk_no, chunk_id))
    if run:
        yield run


def write_point(
    datastore: Datastore, ref: IndexRef, target: DiskWriter, *, threads: int = DEFAULT_THREADS
) -> int:
    """Write the non-zero chunks of ``ref`` into ``target``, which must read as zeros elsewhere
    (a new image); return the bytes written. Does not flush."""
    if threads < 1:
        raise OutOfRange(field="threads", value=threads, allowed="1 or more")
    if target.size != ref.size:
        raise DatastoreError(
            f"the target image has {target.size} bytes but the point's disk has {ref.size}; "
            "create the image with the point's size."
        )
    cs = ref.chunk_size

    def write_run(run: list[tuple[int, bytes]]) -> int:
        first = run[0][0]
        buf = b"".join(datastore.read_chunk(cid) for _, cid in run)
        # A stored chunk is never longer than its place on the disk; cut defensively anyway,
        # as read_disk does, so a damaged index cannot write past the end.
        buf = buf[: ref.size - first * cs]
        target.write(buf, first * cs)
        return len(buf)

    written = 0
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="materialize") as pool:
        pending: deque[Future[int]] = deque()
        try:
            for run in _runs(datastore, ref):
                pending.append(pool.submit(write_run, run))
                if len(pending) >= 2 * threads:
                    written += pending.popleft().result()
            while pending:
                written += pending.popleft().result()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return written


def _create_image(path: Path, fmt: str, size: int) -> None:
    if fmt == "raw":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return
    path.unlink(missing_ok=True)
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        if "No space left" in proc.stderr:
            raise StorageFull(where=str(path.parent), detail=proc.stderr.strip())
        raise DatastoreError(f"qemu-img create {path} failed: {proc.stderr.strip()}")


def materialize_disk(datastore: Datastore, ref: IndexRef, out: Path, fmt: str = "qcow2") -> int:
    """Write the disk of ``ref`` to ``out`` (raw or qcow2); return the bytes of data written."""
    # Adapters are imported here: the data plane names the DiskWriter port, the image writer
    # (a qemu-storage-daemon for qcow2) is the adapter that fills it.
    from siterecovery.adapters.compute.image import open_image_writer

    if fmt not in ("raw", "qcow2"):
        raise DatastoreError(f"disk format {fmt!r} is not supported: use raw or qcow2.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        _create_image(tmp, fmt, ref.size)
        with open_image_writer(tmp, fmt) as writer:
            written = write_point(datastore, ref, writer)
            writer.flush()
        os.replace(tmp, out)
    except StorageFull as err:
        raise StorageFull(where=str(out.parent), detail=str(err.fields.get("detail", err))) from err
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            raise StorageFull(where=str(out.parent), detail=str(err)) from err
        raise DatastoreError(f"cannot write {out}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return written
