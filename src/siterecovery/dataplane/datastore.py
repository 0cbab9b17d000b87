"""The datastore: where recovery points live (chunks + indexes + manifests).

Pieces:

* a :class:`~siterecovery.ports.chunk_store.ChunkStore` holding encoded chunks: disk data and
  index pages alike (``dataplane.chunk_codec``, ``dataplane.index``);
* an :class:`~siterecovery.ports.chunk_store.ObjectStore` holding ``config`` and one
  ``manifests/<point_id>.json`` per recovery point (``dataplane.manifest``).

``config`` (JSON, written once by :meth:`Datastore.create`)::

    {"format": 1, "kind": "siterecovery-datastore", "chunk_size": 65536,
     "key_fingerprint": "<32 hex>", "key_check": "<hex of an encoded known chunk>"}

``key_check`` is a known plaintext encoded with the vault key: opening with another key fails
with a clear ``VaultError`` instead of every chunk failing later.

Crash consistency: chunks and pages are inserted without fsync; :meth:`write_manifest` flushes
the chunk store first and then writes the manifest atomically, so a manifest never refers to
data that a power loss could take away.

Garbage collection (mark and sweep with a grace period), and the rules that keep it safe:

=============================  ============================================================
who                            rule
=============================  ============================================================
replication writing a point    inserts every chunk and page it refers to, even existing ones
                               (insert refreshes the mtime); unchanged subtrees of its base
                               index are not re-inserted, they are kept by the base's manifest
gc                             marks everything reachable from the manifests it lists, then
                               removes unmarked chunks whose mtime is older than
                               ``now - grace``; a point in flight writes young chunks
retention (deleting points)    must not delete the manifest that a replication in flight
                               uses as its base while gc runs (the control plane runs
                               retention and gc as one serialized job)
grace                          must exceed the longest time between a replication inserting
                               a chunk and writing its manifest (hours, not seconds)
=============================  ============================================================
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ID_SIZE, ZERO_ID, ChunkCodec, is_zero
from siterecovery.dataplane.index import FANOUT, IndexReader, IndexRef, IndexWriter, PageCache, decode_page
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.manifest import MANIFEST_PREFIX, Manifest, check_point_id, manifest_name
from siterecovery.errors import (
    AlreadyExists,
    ChunkCorrupt,
    ChunkMissing,
    DatastoreError,
    NotFound,
    VaultError,
)
from siterecovery.ports.chunk_store import ChunkStore, ObjectMissing, ObjectStore

CONFIG_NAME = "config"
CONFIG_FORMAT = 1
CONFIG_KIND = "siterecovery-datastore"
_KEY_CHECK_PLAINTEXT = b"siterecovery datastore key check v1"


@dataclass(frozen=True)
class Problem:
    """One thing :meth:`Datastore.verify` found wrong.

    ``offset`` is the byte offset in the disk of a data chunk, or None for an index page (the
    reason then says which part of the disk the page covers)."""

    point_id: str
    disk: str
    offset: int | None
    chunk_id: str
    reason: str


@dataclass
class VerifyReport:
    """Outcome of :meth:`Datastore.verify`. ``chunks_checked``/``bytes_checked`` count distinct
    stored chunks (data and index pages) and their stored bytes."""

    points_checked: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcStats:
    chunks_marked: int = 0
    chunks_removed: int = 0
    bytes_removed: int = 0
    chunks_kept_young: int = 0
    temp_files_removed: int = 0
    packs_rewritten: int = 0  # chunk stores with packs (S3): packs repacked after the sweep
    packs_removed: int = 0
    pack_bytes_freed: int = 0


class Datastore:
    """Chunks, indexes and manifests of recovery points, encrypted with one vault key."""

    def __init__(self, chunks: ChunkStore, objects: ObjectStore, key: VaultKey, chunk_size: int = CHUNK_SIZE):
        self.chunks = chunks
        self.objects = objects
        self.key = key
        self.codec = ChunkCodec(key)
        self.chunk_size = chunk_size
        self.page_cache = PageCache()
        self._zero_chunk = bytes(chunk_size)

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, chunks: ChunkStore, objects: ObjectStore, key: VaultKey) -> Datastore:
        """Initialise an empty datastore; refuse if one exists there."""
        try:
            objects.get(CONFIG_NAME)
        except ObjectMissing:
            pass
        else:
            raise AlreadyExists(
                kind="datastore",
                name=CONFIG_NAME,
                hint=" Open it with Datastore.open (and its vault key) instead of creating it.",
            )
        codec = ChunkCodec(key)
        check_id = codec.chunk_id(_KEY_CHECK_PLAINTEXT)
        config = {
            "format": CONFIG_FORMAT,
            "kind": CONFIG_KIND,
            "chunk_size": CHUNK_SIZE,
            "key_fingerprint": key.fingerprint(),
            "key_check": codec.encode(check_id, _KEY_CHECK_PLAINTEXT).hex(),
        }
        objects.put(CONFIG_NAME, json.dumps(config, indent=1).encode())
        return cls(chunks, objects, key, CHUNK_SIZE)

    @classmethod
    def open(cls, chunks: ChunkStore, objects: ObjectStore, key: VaultKey) -> Datastore:
        """Open an existing datastore, checking its format and that ``key`` is its key."""
        try:
            raw = objects.get(CONFIG_NAME)
        except ObjectMissing as err:
            raise NotFound(
                kind="datastore config",
                name=CONFIG_NAME,
                hint=" There is no datastore here: create one, or point to the right location.",
            ) from err
        try:
            config: dict[str, Any] = json.loads(raw)
            fmt = config["format"]
            kind = config["kind"]
        except (ValueError, KeyError, TypeError) as err:
            raise DatastoreError(
                "the datastore config is not valid JSON with 'format' and 'kind'; it is damaged."
            ) from err
        if kind != CONFIG_KIND:
            raise DatastoreError(f"this is a {kind!r}, not a {CONFIG_KIND!r}.")
        if fmt != CONFIG_FORMAT:
            raise DatastoreError(
                f"datastore format {fmt!r} is unknown; this version reads format {CONFIG_FORMAT}. "
                "Upgrade siterecovery."
            )
        if config.get("key_fingerprint") != key.fingerprint():
            raise VaultError(
                f"the vault key (fingerprint {key.fingerprint()}) is not the key of this datastore "
                f"(fingerprint {config.get('key_fingerprint')}). Use the key file of the vault that "
                "created the datastore."
            )
        codec = ChunkCodec(key)
        try:
            check_id = codec.chunk_id(_KEY_CHECK_PLAINTEXT)
            if codec.decode(check_id, bytes.fromhex(config["key_check"])) != _KEY_CHECK_PLAINTEXT:
                raise ChunkCorrupt(chunk_id=check_id.hex(), reason="wrong plaintext")
        except (ChunkCorrupt, KeyError, ValueError, TypeError) as err:
            raise VaultError(
                "the vault key matches the datastore's fingerprint but does not decrypt its key "
                "check value: the config or the key file is damaged. Restore the key file from backup."
            ) from err
        return cls(chunks, objects, key, int(config.get("chunk_size", CHUNK_SIZE)))

    @classmethod
    def open_local(cls, path: Path, key: VaultKey, create: bool = False) -> Datastore:
        """A datastore in a local directory: chunks in ``path/chunks``, objects in
        ``path/objects``. With ``create``, initialise it if it does not exist yet."""
        from siterecovery.adapters.chunk_stores.local import LocalChunkStore, LocalObjectStore

        path = Path(path)
        if not create and not (path / "objects" / CONFIG_NAME).exists():
            raise NotFound(
                kind="datastore",
                name=str(path),
                hint=" Create it first (create=True), or check the path.",
            )
        chunks = LocalChunkStore(path)
        objects = LocalObjectStore(path / "objects")
        if create and not (path / "objects" / CONFIG_NAME).exists():
            return cls.create(chunks, objects, key)
        return cls.open(chunks, objects, key)

    @classmethod
    def open_s3(
        cls,
        url: str,
        key: VaultKey,
        *,
        create: bool = False,
        access_key: str | None = None,
        secret_key: str | None = None,
        pack_size: int | None = None,
    ) -> Datastore:
        """A datastore on S3-compatible storage at ``s3://BUCKET/PREFIX?endpoint=URL``: packs
        under ``PREFIX``, objects under ``PREFIX/objects/``. Credentials default to the AWS
        environment variables. With ``create``, create the bucket and initialise the datastore
        if they do not exist yet."""
        from siterecovery.adapters.chunk_stores.s3 import DEFAULT_PACK_SIZE, S3Location, open_stores

        location = S3Location.from_url(url, access_key=access_key, secret_key=secret_key)
        size = pack_size or DEFAULT_PACK_SIZE
        chunks, objects = open_stores(location, create_bucket=create, pack_size=size)
        try:
            objects.get(CONFIG_NAME)
        except ObjectMissing as err:
            if not create:
                raise NotFound(
                    kind="datastore",
                    name=location.url(),
                    hint=" Create it first (create=True), or check the bucket, prefix and endpoint.",
                ) from err
            return cls.create(chunks, objects, key)
        return cls.open(chunks, objects, key)

    # -- chunks and indexes ---------------------------------------------------------------

    def store_chunk(self, plaintext: bytes) -> tuple[bytes, int]:
        """Store one chunk; return ``(chunk_id, stored_bytes)``; ``stored_bytes`` is 0 for an
        all-zero chunk (id ``ZERO_ID``, nothing stored) or a chunk already present."""
        if is_zero(plaintext):
            return ZERO_ID, 0
        chunk_id = self.codec.chunk_id(plaintext)
        blob = self.codec.encode(chunk_id, plaintext)
        return chunk_id, (len(blob) if self.chunks.insert(chunk_id, blob) else 0)

    def read_chunk(self, chunk_id: bytes) -> bytes:
        """The plaintext of a chunk (``chunk_size`` zeros for ``ZERO_ID``)."""
        if chunk_id == ZERO_ID:
            return self._zero_chunk
        return self.codec.decode(chunk_id, self.chunks.get(chunk_id))

    def index_writer(self, size: int, base: IndexRef | None = None) -> IndexWriter:
        # A chunk store shared by processes (S3) refreshes its view of what exists, so that a
        # new point does not dedup against chunks that a gc elsewhere removed.
        sync = getattr(self.chunks, "sync", None)
        if sync is not None:
            sync()
        return IndexWriter(
            self.chunks, self.codec, size, base, chunk_size=self.chunk_size, cache=self.page_cache
        )

    def index_reader(self, ref: IndexRef) -> IndexReader:
        return IndexReader(self.chunks, self.codec, ref, self.page_cache)

    def read_disk(self, ref: IndexRef, *, threads: int = 2) -> Generator[tuple[int, bytes], None, None]:
        """``(offset, data)`` of every non-zero chunk of the disk, in order. The last chunk is cut
        to the disk's size. Chunks are fetched and decoded ahead by ``threads`` threads, at most
        ``4 * threads`` at a time (bounded memory)."""
        reader = self.index_reader(ref)
        window = max(1, 4 * threads)
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="read-disk") as pool:
            queue: deque[tuple[int, Future[bytes]]] = deque()
            try:
                for chunk_no, chunk_id in reader.nonzero_entries():
                    queue.append((chunk_no, pool.submit(self.read_chunk, chunk_id)))
                    if len(queue) >= window:
                        yield self._cut(ref, *queue.popleft())
                while queue:
                    yield self._cut(ref, *queue.popleft())
            finally:
                for _, fut in queue:
                    fut.cancel()

    @staticmethod
    def _cut(ref: IndexRef, chunk_no: int, fut: Future[bytes]) -> tuple[int, bytes]:
        offset = chunk_no * ref.chunk_size
        data = fut.result()
        end = ref.size - offset
        return offset, (data[:end] if len(data) > end else data)

    # -- manifests ------------------------------------------------------------------------

    def write_manifest(self, m: Manifest) -> None:
        """Flush the chunk store, then write the manifest atomically (replacing one of the
        same point id)."""
        self.chunks.flush()
        self.objects.put(manifest_name(m.point_id), m.to_bytes(self.key))

    def read_manifest(self, point_id: str) -> Manifest:
        check_point_id(point_id)
        try:
            data = self.objects.get(manifest_name(point_id))
        except ObjectMissing as err:
            raise NotFound(kind="recovery point", name=point_id) from err
        m = Manifest.from_bytes(data, self.key)
        if m.point_id != point_id:
            raise DatastoreError(
                f"manifest stored as point {point_id!r} is the manifest of point {m.point_id!r}: "
                "it was moved or copied. Delete it."
            )
        return m

    def list_manifests(self) -> list[str]:
        """Point ids of every manifest, sorted."""
        suffix = ".json"
        return [
            name[len(MANIFEST_PREFIX) : -len(suffix)]
            for name in self.objects.list(MANIFEST_PREFIX)
            if name.endswith(suffix) and "/" not in name[len(MANIFEST_PREFIX) :]
        ]

    def delete_manifest(self, point_id: str) -> None:
        """Delete a recovery point's manifest; its chunks go at the next gc."""
        check_point_id(point_id)
        self.objects.delete(manifest_name(point_id))

    # -- verify ---------------------------------------------------------------------------

    def verify(
        self,
        point_ids: list[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        threads: int = 2,
    ) -> VerifyReport:
        """Check that every chunk and page of the given (default: all) points is present and
        decodes to its id. Each stored chunk is read once; a bad chunk is reported for every
        point, disk and offset that refers to it. ``progress(done, total)`` counts points."""
        report = VerifyReport()
        ids = self.list_manifests() if point_ids is None else list(point_ids)
        checked: dict[bytes, str | None] = {}  # chunk id -> None if good, else the reason
        clean_pages: set[bytes] = set()  # pages whose whole subtree is good
        pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="verify")

        def check_blob(chunk_id: bytes) -> tuple[bytes, str | None, int]:
            try:
                blob = self.chunks.get(chunk_id)
            except ChunkMissing:
                return chunk_id, "missing", 0
            try:
                self.codec.decode(chunk_id, blob)
            except ChunkCorrupt as err:
                return chunk_id, f"corrupt: {err.fields.get('reason', err)}", len(blob)
            return chunk_id, None, len(blob)

        def note(chunk_id: bytes, reason: str | None, size: int) -> None:
            checked[chunk_id] = reason
            report.chunks_checked += 1
            report.bytes_checked += size

        def walk(point_id: str, disk: str, reader: IndexReader, level: int, p: int, page_id: bytes) -> bool:
            if page_id == ZERO_ID or page_id in clean_pages:
                return True
            first = p << (8 * (level + 1))
            if page_id not in checked:
                # Read from the store, not the page cache: the stored copy is what we check.
                _, reason, size = check_blob(page_id)
                body = b""
                if reason is None:
                    try:
                        body = decode_page(
                            page_id, level, self.codec.decode(page_id, self.chunks.get(page_id))
                        )
                        self.page_cache.put(page_id, level, body)
                    except (ChunkMissing, ChunkCorrupt) as err:
                        reason = f"corrupt: {err.fields.get('reason', err)}"
                note(page_id, reason, size)
            else:
                reason = checked[page_id]
                if reason is None:
                    try:
                        body = reader.read_page(page_id, level)
                    except (ChunkMissing, ChunkCorrupt) as err:
                        reason = f"corrupt: {err.fields.get('reason', err)}"
            if reason is not None:
                last = min(reader.n, (p + 1) << (8 * (level + 1))) - 1
                report.problems.append(
                    Problem(
                        point_id,
                        disk,
                        None,
                        page_id.hex(),
                        f"index page (level {level}) {reason}; bytes {first * reader.ref.chunk_size}.."
                        f"{min(reader.ref.size, (last + 1) * reader.ref.chunk_size) - 1} cannot be read",
                    )
                )
                return False
            clean = True
            if level > 0:
                for i in range(FANOUT):
                    child = body[i * ID_SIZE : (i + 1) * ID_SIZE]
                    if not walk(point_id, disk, reader, level - 1, (p << 8) | i, child):
                        clean = False
            else:
                slots = [(first + i, body[i * ID_SIZE : (i + 1) * ID_SIZE]) for i in range(FANOUT)]
                slots = [(no, cid) for no, cid in slots if cid != ZERO_ID and no < reader.n]
                todo = list({cid for _, cid in slots if cid not in checked})
                for result in pool.map(check_blob, todo):
                    note(*result)
                for chunk_no, cid in slots:
                    reason = checked[cid]
                    if reason is not None:
                        clean = False
                        report.problems.append(
                            Problem(point_id, disk, chunk_no * reader.ref.chunk_size, cid.hex(), reason)
                        )
            if clean:
                clean_pages.add(page_id)
            return clean

        try:
            for done, point_id in enumerate(ids):
                try:
                    m = self.read_manifest(point_id)
                except (NotFound, DatastoreError) as err:
                    report.problems.append(Problem(point_id, "", None, "", f"manifest: {err}"))
                    continue
                for disk, ref in sorted(m.disks.items()):
                    reader = self.index_reader(ref)
                    walk(point_id, disk, reader, reader.depth - 1, 0, ref.root)
                report.points_checked += 1
                if progress is not None:
                    progress(done + 1, len(ids))
        finally:
            pool.shutdown()
        return report

    # -- garbage collection ---------------------------------------------------------------

    def _mark(self) -> set[bytes]:
        marked: set[bytes] = set()  # every reachable chunk and page id
        pages_done: set[bytes] = set()  # pages whose subtree is marked or on the stack
        for point_id in self.list_manifests():
            try:
                m = self.read_manifest(point_id)
            except NotFound:
                continue  # deleted since we listed it
            for ref in m.disks.values():
                reader = self.index_reader(ref)
                stack = [(reader.depth - 1, ref.root)]
                while stack:
                    level, page_id = stack.pop()
                    if page_id == ZERO_ID or page_id in pages_done:
                        continue  # a marked page has its whole subtree marked already
                    try:
                        body = reader.read_page(page_id, level)
                    except (ChunkMissing, ChunkCorrupt) as err:
                        raise DatastoreError(
                            f"garbage collection stopped before removing anything: recovery point "
                            f"{point_id!r} has an unreadable index page ({err}). Run verify, then "
                            "delete or repair that point."
                        ) from err
                    for i in range(FANOUT):
                        child = body[i * ID_SIZE : (i + 1) * ID_SIZE]
                        if child == ZERO_ID:
                            continue
                        if level == 0:
                            marked.add(child)
                        else:
                            stack.append((level - 1, child))
                    marked.add(page_id)
                    pages_done.add(page_id)
        return marked

    def gc(self, grace_seconds: float, now: float | None = None) -> GcStats:
        """Remove chunks and pages that no manifest refers to and that are older than the grace
        period. Also removes temp files of crashed inserts (unindexed packs on S3) older than the
        grace period, and repacks packs that are mostly garbage if the chunk store has packs."""
        if now is None:
            now = time.time()
        cutoff = now - grace_seconds
        stats = GcStats()
        marked = self._mark()
        stats.chunks_marked = len(marked)
        for info in self.chunks.list():
            if info.chunk_id in marked:
                continue
            if info.mtime >= cutoff:
                stats.chunks_kept_young += 1
                continue
            self.chunks.delete(info.chunk_id)
            stats.chunks_removed += 1
            stats.bytes_removed += info.size
        cleanup = getattr(self.chunks, "cleanup_temp", None)
        if cleanup is not None:
            stats.temp_files_removed = int(cleanup(cutoff))
        # A chunk store with packs (S3) frees space only by rewriting packs that are mostly garbage.
        repack = getattr(self.chunks, "repack", None)
        if repack is not None:
            packs = repack()
            stats.packs_rewritten = int(packs.packs_rewritten)
            stats.packs_removed = int(packs.packs_removed)
            stats.pack_bytes_freed = int(packs.bytes_freed)
        return stats

    def stats(self) -> dict[str, int]:
        """Number of stored chunks (data and pages), their stored bytes, and points."""
        count = size = 0
        for info in self.chunks.list():
            count += 1
            size += info.size
        return {"chunks": count, "stored_bytes": size, "points": len(self.list_manifests())}
