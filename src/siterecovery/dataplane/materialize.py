"""Materialization: writing a recovery point's disk out as an independent image.

The disk is written as a sparse raw file (zero chunks are never written, so they stay holes),
then converted to qcow2 when asked. The result shares nothing with the datastore: writing to it
never touches replicated data. The file appears under its final name only when complete
(written as ``<name>.partial`` and renamed), so a crash never leaves a half image that looks whole.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef
from siterecovery.errors import DatastoreError, StorageFull


def materialize_disk(datastore: Datastore, ref: IndexRef, out: Path, fmt: str = "qcow2") -> int:
    """Write the disk of ``ref`` to ``out`` (raw or qcow2); return the bytes of data written."""
    if fmt not in ("raw", "qcow2"):
        raise DatastoreError(f"disk format {fmt!r} is not supported: use raw or qcow2.")
    out.parent.mkdir(parents=True, exist_ok=True)
    raw_path = out.with_name(out.name + (".partial" if fmt == "raw" else ".raw.partial"))
    written = 0
    try:
        fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, ref.size)
            for offset, data in datastore.read_disk(ref):
                if data is None:
                    continue
                os.pwrite(fd, data, offset)
                written += len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if fmt == "raw":
            os.replace(raw_path, out)
        else:
            tmp = out.with_name(out.name + ".partial")
            proc = subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-W", "-m", "4", str(raw_path), str(tmp)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                if "No space left" in proc.stderr:
                    raise StorageFull(where=str(out.parent), detail=proc.stderr.strip())
                raise DatastoreError(f"qemu-img convert to {out} failed: {proc.stderr.strip()}")
            os.replace(tmp, out)
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            raise StorageFull(where=str(out.parent), detail=str(err)) from err
        raise DatastoreError(f"cannot write {out}: {err}") from err
    finally:
        raw_path.unlink(missing_ok=True)
    return written
