"""Does exactly one siterecovery data-plane operation, so the benchmark can measure it as a process.

Run with the project's Python; prints one JSON object on stdout. The operations drive the same
code the control plane drives (``Agent.replicate_disk`` through the embedded process server,
``materialize_disk``) against a local :class:`~siterecovery.dataplane.datastore.Datastore`, but
without the vault database: the point id, the base point and the datastore are given on the
command line.

Operations::

    init         create the datastore (a directory, or s3://BUCKET/PREFIX?endpoint=URL with
                 the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and its key file
    replicate    one recovery point of one disk:
                   --raw PATH                     RawSource (no change tracking: the engine
                                                  does "initial" without --base, "hash-resync"
                                                  (labelled hash-scan) with it)
                   --qmp SOCK --nbd SOCK --node N QemuSource on a running qemu-storage-daemon
                                                  or VM: point-in-time view, changes from the
                                                  persistent dirty bitmap ("dirty-bitmap")
                 --base POINT makes the point incremental; --keep-tracking aborts the QEMU
                 snapshot instead of committing it, so the same changes are reported again
                 next time (the benchmark uses it to profile the same work a second time)
    materialize  write a point's disk to a raw or qcow2 file (failover)
    metadata     index metadata of a point: a synthetic, fully populated index of --size bytes,
                 then a point that changes --changed chunks; reports the bytes that point adds

Output (``replicate``)::

    {"op": "replicate", "point_id", "mode", "method", "tracking", "seconds", "logical_bytes",
     "manifest_bytes", "stats": {"bytes_read", "bytes_sent", "bytes_stored", "chunks_read",
     "chunks_changed", "chunks_sent", "zero_chunks"}}

``seconds`` is the time of the operation inside this process (after imports); the benchmark's
wall time is measured from outside and includes the interpreter's start-up.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from siterecovery.bootstrap import embedded_agent
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ZERO_ID
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.manifest import Manifest, manifest_name


def new_point_id(t: float) -> str:
    """Same form as the control plane's point ids."""
    return f"rp-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t))}-{secrets.token_hex(3)}"


def open_datastore(a: argparse.Namespace, create: bool = False) -> Datastore:
    """A local directory, or ``s3://BUCKET/PREFIX?endpoint=URL`` (credentials from the AWS
    environment variables)."""
    key = VaultKey.load(Path(a.key))
    if a.datastore.startswith("s3://"):
        return Datastore.open_s3(a.datastore, key, create=create)
    return Datastore.open_local(Path(a.datastore), key, create=create)


def op_init(a: argparse.Namespace) -> dict[str, Any]:
    key_path = Path(a.key)
    if not key_path.exists():
        VaultKey.generate().save(key_path)
    open_datastore(a, create=True)
    return {"op": "init", "datastore": a.datastore}


def op_replicate(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    ds = open_datastore(a)
    base = None
    if a.base:
        base = ds.read_manifest(a.base).disks[a.disk]
    if a.raw:
        from siterecovery.adapters.sources.raw import RawSource

        source: Any = RawSource({a.disk: Path(a.raw)})
        consistency = "fuzzy"
    else:
        from siterecovery.adapters.sources.qemu import QemuSource

        source = QemuSource(a.qmp, {a.disk: a.node}, Path(a.work), nbd_socket=a.nbd)
        consistency = "crash-consistent"
    agent = embedded_agent(ds)
    try:
        snap = source.snapshot([a.disk])
        with snap:
            view = snap.disks[a.disk]
            changed = view.changed_extents() if base is not None else None
            result = agent.replicate_disk(ds, view, base, changed=changed)
            method = {"hash-resync": "hash-scan" if snap.tracking == "none" else "hash-resync"}.get(
                result.mode, result.mode
            )
            point_id = new_point_id(snap.captured_at)
            manifest = Manifest(
                point_id=point_id,
                item=a.disk,
                machine="bench",
                created_at=snap.captured_at,
                consistency=consistency,
                method=method,
                disks={a.disk: result.ref},
                stats={**result.stats.as_dict(), "logical_bytes": result.ref.size},
            )
            ds.write_manifest(manifest)
            if a.keep_tracking:
                snap.abort()
            else:
                snap.commit()
            tracking = snap.tracking
    finally:
        source.close()
    manifest_bytes = len(ds.objects.get(manifest_name(point_id)))
    return {
        "op": "replicate",
        "point_id": point_id,
        "mode": result.mode,
        "method": method,
        "tracking": tracking,
        "seconds": time.monotonic() - t0,
        "logical_bytes": result.ref.size,
        "manifest_bytes": manifest_bytes,
        "stats": result.stats.as_dict(),
    }


def op_materialize(a: argparse.Namespace) -> dict[str, Any]:
    from siterecovery.dataplane.materialize import materialize_disk

    t0 = time.monotonic()
    ds = open_datastore(a)
    ref = ds.read_manifest(a.point).disks[a.disk]
    written = materialize_disk(ds, ref, Path(a.out), a.format)
    return {
        "op": "materialize",
        "point_id": a.point,
        "seconds": time.monotonic() - t0,
        "logical_bytes": ref.size,
        "data_bytes_written": written,
    }


def op_metadata(a: argparse.Namespace) -> dict[str, Any]:
    """Stored bytes of the index pages and manifest of a point that changes ``--changed`` chunks
    of a disk of ``--size`` bytes whose every chunk holds data.

    The base index is filled with random chunk ids (no chunk data is stored: the index does not
    look at it), which is the worst case for the index (no zero pages, nothing compresses).
    """
    import random

    ds = open_datastore(a)
    n = -(-a.size // CHUNK_SIZE)
    rng = random.Random(a.seed)
    t0 = time.monotonic()
    writer = ds.index_writer(a.size)
    step = 1 << 16
    for first in range(0, n, step):
        writer.set_many((first + i, rng.randbytes(32)) for i in range(min(step, n - first)))
    base = writer.commit()
    base_manifest = Manifest(
        point_id=new_point_id(time.time()),
        item="meta",
        machine="bench",
        created_at=time.time(),
        consistency="crash-consistent",
        method="initial",
        disks={"disk0": base},
    )
    ds.write_manifest(base_manifest)
    base_seconds = time.monotonic() - t0

    counted = _CountingInserts(ds)
    t1 = time.monotonic()
    writer = ds.index_writer(a.size, base)
    changed = sorted(rng.sample(range(n), a.changed))
    for chunk_no in changed:
        cid = rng.randbytes(32)
        assert cid != ZERO_ID
        writer.set(chunk_no, cid)
    ref = writer.commit()
    point = Manifest(
        point_id=new_point_id(time.time()),
        item="meta",
        machine="bench",
        created_at=time.time(),
        consistency="crash-consistent",
        method="dirty-bitmap",
        disks={"disk0": ref},
        stats={"chunks_changed": a.changed, "logical_bytes": a.size},
    )
    ds.write_manifest(point)
    manifest_bytes = len(ds.objects.get(manifest_name(point.point_id)))
    return {
        "op": "metadata",
        "disk_bytes": a.size,
        "chunks": n,
        "changed_chunks": a.changed,
        "base_index_seconds": base_seconds,
        "point_seconds": time.monotonic() - t1,
        "pages_written": counted.new,
        "page_bytes": counted.new_bytes,
        "manifest_bytes": manifest_bytes,
        "metadata_bytes": counted.new_bytes + manifest_bytes,
    }


class _CountingInserts:
    """Counts what the chunk store newly stores from now on (the point's own index pages)."""

    def __init__(self, ds: Datastore) -> None:
        self.new = 0
        self.new_bytes = 0
        inner = ds.chunks.insert

        def insert(chunk_id: bytes, blob: bytes) -> bool:
            stored = inner(chunk_id, blob)
            if stored:
                self.new += 1
                self.new_bytes += len(blob)
            return stored

        ds.chunks.insert = insert  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sr_runner", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="op", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--datastore", required=True, help="datastore directory or s3:// URL")
        sp.add_argument("--key", required=True, help="vault key file")

    common(sub.add_parser("init"))
    rp = sub.add_parser("replicate")
    common(rp)
    rp.add_argument("--disk", default="disk0")
    rp.add_argument("--raw", help="raw image file (RawSource)")
    rp.add_argument("--qmp", help="QMP socket (QemuSource)")
    rp.add_argument("--nbd", help="NBD socket of the daemon (QemuSource)")
    rp.add_argument("--node", help="qcow2 node name of the disk (QemuSource)")
    rp.add_argument("--work", help="QemuSource work directory (keep it per machine)")
    rp.add_argument("--base", help="base point id (incremental)")
    rp.add_argument("--keep-tracking", action="store_true", help="abort the QEMU snapshot instead of commit")
    mp = sub.add_parser("materialize")
    common(mp)
    mp.add_argument("--point", required=True)
    mp.add_argument("--disk", default="disk0")
    mp.add_argument("--out", required=True)
    mp.add_argument("--format", default="qcow2", choices=("qcow2", "raw"))
    xp = sub.add_parser("metadata")
    common(xp)
    xp.add_argument("--size", type=int, default=100 * 1024**3)
    xp.add_argument("--changed", type=int, default=10)
    xp.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.op == "replicate" and not a.raw and not (a.qmp and a.node and a.work):
        p.error("replicate needs --raw PATH, or --qmp, --node and --work for a QEMU source")
    fn = {"init": op_init, "replicate": op_replicate, "materialize": op_materialize, "metadata": op_metadata}
    out = fn[a.op](a)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
