"""Chunk and object stores in a local directory (any POSIX filesystem).

Chunks are written into *pack files*: a pack holds many encoded chunks back to back and ends
with a footer that says where each one lies. One file per chunk cost a file creation, a link
and an unlink per 64 KiB chunk (most of the time of an initial replication went into the
filesystem's metadata) and a partly used 4 KiB block per chunk (~10 % of a small chunk).

Layout of a :class:`LocalChunkStore` rooted at ``root``::

    root/packs/<32 hex pack id>.pack     a sealed pack (format 2)
    root/packs/.tmp-<32 hex>.pack        the pack this process is filling (or one left by a crash)
    root/packs/<32 hex>.tomb             tombstones: chunks deleted from sealed packs
    root/packs/generation                16 random bytes, rewritten whenever chunks are deleted
                                         or moved, so other processes know to reload
    root/chunks/<2 hex>/<64 hex id>      format 1: one encoded chunk per file; still read, listed
                                         and deleted, never written

Formats (integers big-endian)::

    pack       offset  size  field
               0       8     b"SRLP", u8 version = 2, 3 zero bytes
               8       ...   blobs back to back
               F       44*n  footer: n x (32s chunk id, u64 offset, u32 length)
               end-24  24    trailer: u64 F, u32 n, b"SRLT", u8 version = 2, 3 zero bytes,
                             u32 CRC-32 of the footer and the first 20 bytes of the trailer
    tombstones b"SRLD", u8 version = 2, 3 zero bytes, then records of 52 bytes:
               (16s pack id, 32s chunk id, u32 CRC-32 of those 48 bytes); a torn last record
               (short or with a bad CRC) is ignored

Invariants and crash safety:

* Inserts append to the open pack (a temp file) of this process. A pack is *sealed* when it
  reaches ``pack_size`` or at :meth:`LocalChunkStore.flush`: footer and trailer are written,
  the file is ``fdatasync``-ed, then renamed to its final name. So a pack under a final name is
  complete on disk before its name is; a crash leaves at most a temp file, whose chunks were
  never reported durable and which :meth:`LocalChunkStore.cleanup_temp` removes (gc calls it).
  ``flush`` seals the open pack, waits for every seal in progress, persists tombstones and
  fsyncs the directory: the durability point the datastore relies on before it writes a
  manifest. Chunks inserted since the last flush are visible to other processes only after it.
* Space is reserved ahead of writing (``posix_fallocate``) with room for the footer, so a full
  filesystem never leaves a pack that cannot be sealed: an insert that finds no room seals the
  open pack (its chunks stay valid) and raises ``StorageFull``; nothing partial is left.
* A chunk's mtime (what gc's grace period compares) is the mtime of its pack file: sealing
  writes it, re-inserting an existing chunk refreshes it (``utime``). That protects every chunk
  of the pack, never fewer than the contract asks.
* ``delete`` of a chunk in a sealed pack appends a tombstone (pack id, chunk id), fsynced at the
  next ``flush`` or ``repack``, which then rewrite ``generation``; a tombstone hides that copy
  only, so re-inserting a deleted chunk stores a new copy. :meth:`LocalChunkStore.repack` (gc
  calls it after its sweep) rewrites packs that are mostly garbage and merges small ones: the
  new packs are sealed and the directory fsynced before the old packs are removed, so a crash at
  any step loses nothing (a chunk may then exist twice; any copy is good).
* Every process keeps an in-memory index (chunk id -> pack, offset, length), loaded at open
  from the footers and tombstones (~140 bytes of memory per chunk). ``contains``/``missing``
  use only memory; ``get`` of an id it does not know, or in a pack that another process
  removed, reloads from disk first. :meth:`LocalChunkStore.sync` (called by the datastore
  before it starts an index) reloads when ``generation`` changed, so a long-lived process does
  not dedup against chunks that a gc elsewhere deleted.

Layout of a :class:`LocalObjectStore` rooted at ``root``: object ``a/b/c`` is the file
``root/a/b/c``. ``put`` is temp + fsync + rename + fsync of the directory, so an object is
always either the old or the new version, durably.

Errors: ENOSPC and EDQUOT become ``StorageFull``; other OS errors become ``DatastoreError``
naming the path.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from siterecovery.durable import fsync_dir, write_atomic
from siterecovery.errors import ChunkMissing, DatastoreError, InvalidInput, StorageFull
from siterecovery.ports.chunk_store import ChunkInfo, ObjectMissing

TEMP_PREFIX = ".tmp-"
PACK_VERSION = 2
PACK_SUFFIX = ".pack"
TOMB_SUFFIX = ".tomb"
GENERATION_NAME = "generation"
DEFAULT_PACK_SIZE = 16 * 1024 * 1024
PACK_HEADER = struct.pack(">4sB3x", b"SRLP", PACK_VERSION)
_ENTRY = struct.Struct(">32sQI")
_TRAILER = struct.Struct(">QI4sB3xI")
_TRAILER_MAGIC = b"SRLT"
_TOMB_HEADER = struct.pack(">4sB3x", b"SRLD", PACK_VERSION)
_TOMB = struct.Struct(">16s32sI")
# Reserve disk space in steps this large (fewer fallocate calls); never less than one insert needs.
_RESERVE_STEP = 4 * 1024 * 1024
_MAX_OPEN_FILES = 64  # read descriptors of sealed packs kept open
_LOAD_THREADS = 8  # footers read at once when a store opens
_TAIL_READ = 64 * 1024  # bytes read from the end of a pack to get its footer in one request
_HEX = frozenset("0123456789abcdef")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_LEN_MASK = (1 << 32) - 1


def _os_error(err: OSError, where: Path, what: str) -> DatastoreError:
    if err.errno in _FULL_ERRNOS:
        return StorageFull(where=str(where), detail=f"{what}: {err.strerror}")
    return DatastoreError(
        f"{what} failed at {where}: {err.strerror or err}. Check the path and its permissions."
    )


def _temp_name() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def _unlink(path: Path, doing: str) -> None:
    """Remove ``path``; an absent file is not an error, another failure names ``doing``."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _os_error(err, path, doing) from err


_IOV_MAX = 512  # buffers per pwritev call, below every system's IOV_MAX


def _pwritev_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write ``buffers`` back to back at ``offset`` with as few system calls as it takes."""
    views = [memoryview(b) for b in buffers if b]
    while views:
        part = views[:_IOV_MAX]
        n = os.pwritev(fd, part, offset)
        if n <= 0:
            raise OSError(errno.EIO, "the file system accepted no bytes of a write")
        offset += n
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _write_new(path: Path, data: bytes, *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _check_id(chunk_id: bytes) -> None:
    if len(chunk_id) != 32:
        raise InvalidInput(f"a chunk id is 32 bytes, got {len(chunk_id)}.")


def check_object_name(name: str) -> None:
    """Object names are relative paths of non-empty parts, no ``.``/``..``, no temp prefix."""
    parts = name.split("/")
    if not name or "\0" in name or any(p in ("", ".", "..") or p.startswith(TEMP_PREFIX) for p in parts):
        raise InvalidInput(
            f"object name {name!r} is not allowed: use '/'-separated non-empty parts, "
            f"none of them '.', '..' or starting with {TEMP_PREFIX!r}."
        )


# -- pack format ------------------------------------------------------------------------------


def encode_footer(entries: Iterable[tuple[bytes, int, int]], footer_offset: int) -> bytes:
    """Footer and trailer of a pack whose blobs end at ``footer_offset``."""
    body = bytearray()
    n = 0
    for chunk_id, offset, length in entries:
        body += _ENTRY.pack(chunk_id, offset, length)
        n += 1
    head = _TRAILER.pack(footer_offset, n, _TRAILER_MAGIC, PACK_VERSION, 0)[:-4]
    crc = zlib.crc32(head, zlib.crc32(body))
    return bytes(body + head + crc.to_bytes(4, "big"))


class PackDamaged(DatastoreError):
    """A pack file whose header, trailer or footer does not check."""

    template = "pack {path} is damaged ({reason}); its chunks cannot be found. Run verify."


def read_footer(fd: int, path: Path) -> tuple[int, bytes]:
    """``(offset of the footer, footer)`` of a sealed pack (iterate the footer with
    :func:`footer_entries`); ``PackDamaged`` if the trailer or footer does not check (e.g. a file
    that is not a pack). The header is not read: the trailer carries the version too, and one
    read at the end usually gets everything. The footer is covered by a CRC; blobs are
    authenticated by the codec when they are decoded."""
    size = os.fstat(fd).st_size
    if size < len(PACK_HEADER) + _TRAILER.size:
        raise PackDamaged(path=str(path), reason=f"{size} bytes is too short for a pack")
    tail_len = min(size, _TAIL_READ)
    tail = os.pread(fd, tail_len, size - tail_len)
    trailer = tail[-_TRAILER.size :]
    footer_offset, n, magic, version, crc = _TRAILER.unpack(trailer)
    if magic != _TRAILER_MAGIC or version != PACK_VERSION:
        raise PackDamaged(path=str(path), reason="no pack trailer of format 2 at its end")
    if footer_offset + n * _ENTRY.size + _TRAILER.size != size or footer_offset < len(PACK_HEADER):
        raise PackDamaged(path=str(path), reason="trailer does not match the file size")
    body_len = n * _ENTRY.size
    if body_len + _TRAILER.size <= tail_len:
        body = tail[tail_len - _TRAILER.size - body_len : tail_len - _TRAILER.size]
    else:
        body = os.pread(fd, body_len, footer_offset)
    if zlib.crc32(trailer[:-4], zlib.crc32(body)) != crc:
        raise PackDamaged(path=str(path), reason="footer checksum mismatch")
    return footer_offset, body


def footer_entries(body: bytes) -> Iterator[tuple[bytes, int, int]]:
    """``(chunk id, offset, length)`` of every chunk of a footer, in pack order."""
    return _ENTRY.iter_unpack(body)


def decode_tombstones(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(pack id, chunk id)`` pairs of a tombstone file; a torn last record is ignored."""
    if data[: len(_TOMB_HEADER)] != _TOMB_HEADER:
        return []
    out = []
    for pos in range(len(_TOMB_HEADER), len(data) - _TOMB.size + 1, _TOMB.size):
        pack_id, chunk_id, crc = _TOMB.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + 48]) != crc:
            break
        out.append((pack_id, chunk_id))
    return out


def encode_tombstone(pack_id: bytes, chunk_id: bytes) -> bytes:
    return _TOMB.pack(pack_id, chunk_id, zlib.crc32(pack_id + chunk_id))


# -- in-memory state --------------------------------------------------------------------------


class _File:
    """A descriptor shared by readers; closed when dropped and no reader holds it."""

    __slots__ = ("fd", "refs", "dropped")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.dropped = False


class _Pack:
    """One pack known to this process: open (being filled), sealing, or sealed."""

    __slots__ = ("no", "pack_id", "path", "state", "file", "end", "reserved", "entries", "entry_bytes",
                 "live_bytes", "mtime", "can_reserve")  # fmt: skip

    def __init__(self, no: int, pack_id: bytes, path: Path, state: str) -> None:
        self.no = no
        self.pack_id = pack_id
        self.path = path
        self.state = state  # "open", "sealing", "sealed"
        self.file: _File | None = None  # open and sealing packs: the write descriptor
        self.end = len(PACK_HEADER)  # where the next blob goes
        self.reserved = 0  # bytes of the file backed by reserved space
        self.entries: dict[bytes, tuple[int, int]] = {}  # open pack: chunk id -> (offset, length)
        self.entry_bytes = 0  # bytes of blobs with an entry in the footer
        self.live_bytes = 0  # of those, bytes the index still points to
        self.mtime = time.time()
        self.can_reserve = True


@dataclass
class RepackStats:
    packs_rewritten: int = 0  # packs whose live chunks were copied into new packs
    packs_removed: int = 0  # pack files deleted (rewritten ones and ones with nothing live)
    bytes_copied: int = 0
    bytes_freed: int = 0  # bytes of the removed packs minus those of the new ones


def _loc(no: int, offset: int, length: int) -> int:
    # One int per index entry instead of a tuple: ~100 bytes less per chunk in memory.
    return (no << 64) | (offset << 32) | length


def _unloc(loc: int) -> tuple[int, int, int]:
    return loc >> 64, (loc >> 32) & _LEN_MASK, loc & _LEN_MASK


def _close_files(files: dict[int, _File]) -> None:
    for f in files.values():
        with contextlib.suppress(OSError):
            os.close(f.fd)
    files.clear()


class LocalChunkStore:
    """A :class:`~siterecovery.ports.chunk_store.ChunkStore` of pack files in ``root/packs``
    (see the module docstring). ``pack_size`` is the size at which the open pack is sealed."""

    def __init__(self, root: Path, *, pack_size: int = DEFAULT_PACK_SIZE) -> None:
        if pack_size < 4096:
            raise InvalidInput(f"pack size {pack_size} is too small: allowed is at least 4096 bytes.")
        self.root = Path(root)
        self.pack_dir = self.root / "packs"
        self.chunk_dir = self.root / "chunks"  # format 1
        self.pack_size = pack_size
        self._lock = threading.RLock()
        self._sealed_cv = threading.Condition(self._lock)
        # Lock order: _repack, then _maint, then _lock. A repack holds _repack throughout, so no
        # reload renumbers the packs it is copying from; _maint makes a reload's directory scan
        # and a pack's rename one step each; _lock guards the in-memory state.
        self._repack = threading.RLock()
        self._maint = threading.RLock()
        self._index: dict[bytes, int] = {}
        self._dups: dict[bytes, builtins.list[int]] = {}  # further copies of an id (rare)
        self._packs: dict[int, _Pack] = {}
        self._by_id: dict[bytes, int] = {}
        self._next_no = 1
        self._open: _Pack | None = None
        self._sealing = 0
        self._seal_errors: builtins.list[_Pack] = []
        self._dir_dirty = False
        self._files: dict[int, _File] = {}  # pack no -> read descriptor of a sealed pack
        self._tomb_fd: int | None = None
        self._tomb_path: Path | None = None
        self._tomb_dirty = False
        self._generation: bytes | None = None
        self._finalizer = weakref.finalize(self, _close_files, self._files)
        try:
            new = not self.pack_dir.exists()
            self.pack_dir.mkdir(parents=True, exist_ok=True)
            if new:
                fsync_dir(self.root)
        except OSError as err:
            raise _os_error(err, self.pack_dir, "creating the pack directory") from err
        self._legacy = self._has_legacy()
        # Loading reads every footer; it runs while the caller does other things (a replication
        # takes its snapshot meanwhile) and every operation that needs the index waits for it.
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        threading.Thread(target=self._initial_load, name="pack-index", daemon=True).start()

    def _initial_load(self) -> None:
        try:
            self._reload()
        except BaseException as err:  # handed to the first caller that needs the index
            self._load_error = err
        finally:
            self._loaded.set()

    def _ready(self) -> None:
        if not self._loaded.is_set():
            self._loaded.wait()
        if self._load_error is not None:
            # Try again (the cause may be gone); a second failure is the caller's error.
            self._load_error = None
            self._reload()

    # -- loading ----------------------------------------------------------------------------

    def _has_legacy(self) -> bool:
        try:
            with os.scandir(self.chunk_dir) as it:
                return any(len(e.name) == 2 and set(e.name) <= _HEX for e in it)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _read_generation(self) -> bytes | None:
        try:
            with open(self.pack_dir / GENERATION_NAME, "rb") as f:
                return f.read(64)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _os_error(err, self.pack_dir / GENERATION_NAME, "reading the pack generation") from err

    def _bump_generation(self) -> None:
        path = self.pack_dir / GENERATION_NAME
        value = secrets.token_bytes(16)
        try:
            write_atomic(path, value, mode=0o600)
        except OSError as err:
            raise _os_error(err, path, "writing the pack generation") from err
        with self._lock:
            self._generation = value

    def _scan(self) -> tuple[dict[bytes, Path], builtins.list[Path]]:
        packs: dict[bytes, Path] = {}
        tombs: builtins.list[Path] = []
        try:
            with os.scandir(self.pack_dir) as it:
                for e in it:
                    name = e.name
                    if name.startswith(TEMP_PREFIX):
                        continue
                    stem, dot, suffix = name.partition(".")
                    if len(stem) != 32 or not set(stem) <= _HEX or not dot:
                        continue
                    if "." + suffix == PACK_SUFFIX:
                        packs[bytes.fromhex(stem)] = Path(e.path)
                    elif "." + suffix == TOMB_SUFFIX:
                        tombs.append(Path(e.path))
        except FileNotFoundError:
            pass
        return packs, tombs

    def _read_tombs(self, paths: Iterable[Path]) -> set[tuple[bytes, bytes]]:
        out: set[tuple[bytes, bytes]] = set()
        for path in paths:
            try:
                out.update(decode_tombstones(path.read_bytes()))
            except FileNotFoundError:
                continue
            except OSError as err:
                raise _os_error(err, path, "reading tombstones") from err
        return out

    @staticmethod
    def _by_pack(tombs: set[tuple[bytes, bytes]]) -> dict[bytes, set[bytes]]:
        out: dict[bytes, set[bytes]] = {}
        for pack_id, chunk_id in tombs:
            out.setdefault(pack_id, set()).add(chunk_id)
        return out

    def _load_pack(self, path: Path) -> tuple[int, bytes] | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # removed by a repack since we listed it
        except OSError as err:
            raise _os_error(err, path, "opening a pack") from err
        try:
            return read_footer(fd, path)
        except PackDamaged:
            # Not ours to judge here: verify reports the chunks it lacks; the file stays.
            return None
        except OSError as err:
            raise _os_error(err, path, "reading a pack footer") from err
        finally:
            os.close(fd)

    def _load_packs(self, paths: builtins.list[Path]) -> builtins.list[tuple[int, bytes] | None]:
        """Footers of ``paths``; read by several threads when there are many (a cold cache
        makes each one a random read, and a disk serves several at once)."""
        if len(paths) < 16:
            return [self._load_pack(p) for p in paths]
        with ThreadPoolExecutor(max_workers=_LOAD_THREADS, thread_name_prefix="pack-load") as pool:
            return builtins.list(pool.map(self._load_pack, paths))

    def _add_pack_locked(
        self, pack_id: bytes, path: Path, footer: tuple[int, bytes], dead: set[bytes]
    ) -> None:
        no = self._next_no
        self._next_no += 1
        pack = _Pack(no, pack_id, path, "sealed")
        pack.end = footer[0]
        self._packs[no] = pack
        self._by_id[pack_id] = no
        # The hot loop of opening a store (one pass per chunk): kept to plain local operations.
        index = self._index
        high = no << 64
        total = live = 0
        for cid, off, ln in _ENTRY.iter_unpack(footer[1]):
            total += ln
            if dead and cid in dead:
                continue
            loc = high | (off << 32) | ln
            if cid in index:
                self._dups.setdefault(cid, []).append(loc)  # a second copy: garbage to repack
            else:
                index[cid] = loc
                live += ln
        pack.entry_bytes = total
        pack.live_bytes = live

    def _reload(self) -> None:
        """Rebuild the index from disk (sealed packs and tombstones); keep this process's open
        and sealing packs."""
        with self._repack, self._maint:
            generation = self._read_generation()
            pack_paths, tomb_paths = self._scan()
            tombs = self._read_tombs(tomb_paths)
            loaded = [
                (pack_id, path, footer)
                for (pack_id, path), footer in zip(
                    pack_paths.items(), self._load_packs(builtins.list(pack_paths.values())), strict=True
                )
                if footer is not None
            ]
            with self._lock:
                tombs |= self._pending_tombs_locked()
                keep = {no: p for no, p in self._packs.items() if p.state != "sealed"}
                for no in [no for no in self._files if no not in keep]:
                    self._drop_file_locked(self._files.pop(no))
                self._packs = dict(keep)
                self._by_id = {p.pack_id: no for no, p in keep.items()}
                self._index = {}
                self._dups = {}
                dead = self._by_pack(tombs)
                for pack_id, path, footer in loaded:
                    self._add_pack_locked(pack_id, path, footer, dead.get(pack_id, set()))
                for no, p in keep.items():
                    for cid, (off, ln) in p.entries.items():
                        self._index.setdefault(cid, _loc(no, off, ln))
                self._generation = generation

    def _pending_tombs_locked(self) -> set[tuple[bytes, bytes]]:
        # Tombstones written by this process but maybe not yet read back from its file.
        if self._tomb_path is None:
            return set()
        try:
            return set(decode_tombstones(self._tomb_path.read_bytes()))
        except OSError:
            return set()

    def _refresh(self) -> None:
        """Pick up what other processes did: a full reload if ``generation`` changed (deletes,
        repacks), else only packs that are new since we looked."""
        if self._read_generation() != self._generation:
            self._reload()
            return
        with self._maint:
            pack_paths, _ = self._scan()
            with self._lock:
                new = {pid: p for pid, p in pack_paths.items() if pid not in self._by_id}
                gone = [
                    no for no, p in self._packs.items() if p.state == "sealed" and p.pack_id not in pack_paths
                ]
        if gone:
            # Removed by a repack elsewhere; the generation bump may still be on its way.
            self._reload()
            return
        with self._maint:
            for pack_id, path in new.items():
                footer = self._load_pack(path)
                if footer is None:
                    continue
                with self._lock:
                    if pack_id not in self._by_id:
                        # A pack new to us has no tombstones yet: those come with a generation bump.
                        self._add_pack_locked(pack_id, path, footer, set())

    def sync(self) -> None:
        """Reload the index if another process deleted or moved chunks since we loaded it."""
        self._ready()
        if self._read_generation() != self._generation:
            self._reload()

    # -- descriptors --------------------------------------------------------------------------

    def _cache_file_locked(self, no: int, file: _File) -> None:
        self._files[no] = file
        if len(self._files) > _MAX_OPEN_FILES:
            for old_no in [n for n, f in self._files.items() if f.refs == 0][
                : len(self._files) - _MAX_OPEN_FILES
            ]:
                self._drop_file_locked(self._files.pop(old_no))

    def _drop_file_locked(self, file: _File) -> None:
        file.dropped = True
        if file.refs == 0:
            with contextlib.suppress(OSError):
                os.close(file.fd)

    def _acquire_locked(self, pack: _Pack) -> _File:
        file = pack.file if pack.state != "sealed" else self._files.get(pack.no)
        if file is None:
            fd = os.open(pack.path, os.O_RDONLY | os.O_CLOEXEC)
            file = _File(fd)
            self._cache_file_locked(pack.no, file)
        else:
            # Most recently used last, so eviction takes the oldest first.
            if pack.state == "sealed":
                self._files[pack.no] = self._files.pop(pack.no)
        file.refs += 1
        return file

    def _release(self, file: _File) -> None:
        with self._lock:
            file.refs -= 1
            if file.dropped and file.refs == 0:
                with contextlib.suppress(OSError):
                    os.close(file.fd)

    # -- ChunkStore port ------------------------------------------------------------------------

    def legacy_path(self, chunk_id: bytes) -> Path:
        """Where a format 1 chunk file of ``chunk_id`` lives (whether or not it exists)."""
        h = chunk_id.hex()
        return self.chunk_dir / h[:2] / h

    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        _check_id(chunk_id)
        self._ready()
        if self._legacy:
            legacy = self.legacy_path(chunk_id)
            try:
                os.utime(legacy)
                return False
            except FileNotFoundError:
                pass
            except OSError as err:
                raise _os_error(err, legacy, "refreshing a chunk") from err
        with self._lock:
            loc = self._index.get(chunk_id)
            if loc is None:
                to_seal, full = self._append_locked(chunk_id, blob)
            elif self._packs[loc >> 64].state == "open":
                self._packs[loc >> 64].mtime = time.time()
                return False
        if loc is not None:
            if self._touch_sealed(chunk_id, loc):
                return False
            return self.insert(chunk_id, blob)  # its pack is gone: store it anew
        if to_seal is not None:
            self._seal(to_seal)
        if full is not None:
            raise full
        return True

    def insert_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """``insert`` for each item, in order, taking the store lock once and writing the new
        blobs of a pack with one system call (an agent's batch of chunks: 64 small writes cost
        twice the kernel time of one vectored write)."""
        for chunk_id, _blob in items:
            _check_id(chunk_id)
        self._ready()
        if self._legacy:
            return [self.insert(cid, blob) for cid, blob in items]
        flags: list[bool | None] = []
        with self._lock:
            fresh: list[tuple[bytes, bytes]] = []
            seen: set[bytes] = set()
            for chunk_id, blob in items:
                loc = self._index.get(chunk_id)
                if chunk_id in seen:
                    flags.append(False)
                elif loc is None:
                    fresh.append((chunk_id, blob))
                    seen.add(chunk_id)
                    flags.append(True)
                elif self._packs[loc >> 64].state == "open":
                    self._packs[loc >> 64].mtime = time.time()
                    flags.append(False)
                else:
                    flags.append(None)  # in a sealed pack: refreshed below, outside the lock
            to_seal, full = self._append_run_locked(fresh)
        for pack in to_seal:
            self._seal(pack)
        if full is not None:
            raise full
        return [
            flag if flag is not None else self.insert(cid, blob)
            for flag, (cid, blob) in zip(flags, items, strict=True)
        ]

    def _append_run_locked(self, run: list[tuple[bytes, bytes]]) -> tuple[list[_Pack], StorageFull | None]:
        """Append blobs to the open pack, one write per pack they go into; return the packs to
        seal and the StorageFull to raise once they are sealed (what fit is kept, as with
        ``_append_locked`` one by one)."""
        to_seal: list[_Pack] = []
        done = 0
        while done < len(run):
            pack = self._open
            if pack is None:
                pack = self._open = self._new_pack_locked()
            group: list[tuple[bytes, bytes]] = []
            end = pack.end
            for item in run[done:]:
                group.append(item)
                end += len(item[1])
                if end >= self.pack_size:
                    break
            try:
                self._reserve_locked(pack, end - pack.end, len(group))
                _pwritev_all(pack.file.fd, [blob for _, blob in group], pack.end)  # type: ignore[union-attr]
            except OSError as err:
                error = _os_error(err, pack.path, "writing a chunk")
                if not isinstance(error, StorageFull):
                    raise error from err
                # Out of room for the group: keep what fits of it, one by one.
                for chunk_id, blob in group:
                    sealed, full = self._append_locked(chunk_id, blob)
                    if sealed is not None:
                        to_seal.append(sealed)
                    if full is not None:
                        return to_seal, full
                done += len(group)
                continue
            for chunk_id, blob in group:
                self._record_locked(pack, chunk_id, len(blob))
            done += len(group)
            if pack.end >= self.pack_size:
                sealed = self._detach_open_locked()
                if sealed is not None:
                    to_seal.append(sealed)
        return to_seal, None

    def _append_locked(self, chunk_id: bytes, blob: bytes) -> tuple[_Pack | None, StorageFull | None]:
        """Append ``blob`` to the open pack; return a pack to seal (full, or after running out
        of space) and the StorageFull to raise once it is sealed."""
        pack = self._open
        if pack is None:
            pack = self._open = self._new_pack_locked()
        try:
            self._reserve_locked(pack, len(blob))
            _write_all(pack.file.fd, blob, pack.end)  # type: ignore[union-attr]
        except OSError as err:
            error = _os_error(err, pack.path, "writing a chunk")
            if not isinstance(error, StorageFull):
                raise error from err
            # Keep what the pack holds: seal it with the space reserved for its footer.
            return self._detach_open_locked(), error
        self._record_locked(pack, chunk_id, len(blob))
        return (self._detach_open_locked() if pack.end >= self.pack_size else None), None

    def _record_locked(self, pack: _Pack, chunk_id: bytes, length: int) -> None:
        """Enter a blob just written at the end of the open ``pack`` into the pack and the index."""
        pack.entries[chunk_id] = (pack.end, length)
        self._index[chunk_id] = _loc(pack.no, pack.end, length)
        pack.end += length
        pack.entry_bytes += length
        pack.live_bytes += length
        pack.mtime = time.time()

    def _touch_sealed(self, chunk_id: bytes, loc: int) -> bool:
        """Refresh the mtime of the pack holding ``chunk_id``; False if that pack is gone (then
        the chunk was inserted anew)."""
        with self._lock:
            pack = self._packs.get(loc >> 64)
            target: Path | int | None = None
            if pack is not None:
                target = pack.path if pack.state == "sealed" else pack.file.fd  # type: ignore[union-attr]
        try:
            if target is None:
                raise FileNotFoundError
            os.utime(target)
            return True
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _os_error(err, Path(str(target)), "refreshing a chunk") from err
        # Moved by a repack in another process: find it again, or have it stored anew.
        self._refresh()
        with self._lock:
            again = self._index.get(chunk_id)
            if again == loc:
                del self._index[chunk_id]
        if again is not None and again != loc:
            return self._touch_sealed(chunk_id, again)
        return False

    def _new_pack_locked(self) -> _Pack:
        pack_id = secrets.token_bytes(16)
        path = self.pack_dir / f"{TEMP_PREFIX}{pack_id.hex()}{PACK_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise _os_error(err, path, "creating a pack") from err
        no = self._next_no
        self._next_no += 1
        pack = _Pack(no, pack_id, path, "open")
        pack.file = _File(fd)
        pack.file.refs = 1  # the pack's own reference, released once it is sealed
        self._files[no] = pack.file  # so that the finalizer closes it too
        self._packs[no] = pack
        self._by_id[pack_id] = no
        try:
            self._reserve_locked(pack, 0)
            _write_all(fd, PACK_HEADER, 0)
        except OSError as err:
            self._abandon_locked(pack)
            raise _os_error(err, path, "creating a pack") from err
        return pack

    def _abandon_locked(self, pack: _Pack) -> None:
        # Only for a pack that holds no chunk yet.
        del self._packs[pack.no]
        self._by_id.pop(pack.pack_id, None)
        self._files.pop(pack.no, None)
        if pack.file is not None:
            with contextlib.suppress(OSError):
                os.close(pack.file.fd)
        with contextlib.suppress(OSError):
            os.unlink(pack.path)

    def _reserve_locked(self, pack: _Pack, blob_len: int, entries: int = 1) -> None:
        """Make sure the file has room for ``blob_len`` more bytes in ``entries`` more chunks and
        the larger footer."""
        need = pack.end + blob_len + (len(pack.entries) + entries) * _ENTRY.size + _TRAILER.size
        if need <= pack.reserved or not pack.can_reserve:
            return
        fd = pack.file.fd  # type: ignore[union-attr]
        for target in (max(need, pack.reserved + _RESERVE_STEP), need):
            try:
                os.posix_fallocate(fd, pack.reserved, target - pack.reserved)
            except OSError as err:
                if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    pack.can_reserve = False  # the filesystem cannot reserve: write and hope
                    return
                if err.errno not in _FULL_ERRNOS or target == need:
                    raise
                continue
            pack.reserved = target
            return

    def _detach_open_locked(self) -> _Pack | None:
        pack = self._open
        self._open = None
        if pack is None:
            return None
        pack.state = "sealing"
        self._sealing += 1
        return pack

    def _seal(self, pack: _Pack) -> None:
        """Write the footer, make the pack durable, give it its final name (outside the lock)."""
        file = pack.file
        assert file is not None
        with self._lock:
            entries = [(cid, off, ln) for cid, (off, ln) in pack.entries.items()]
        final = self.pack_dir / f"{pack.pack_id.hex()}{PACK_SUFFIX}"
        try:
            if entries:
                tail = encode_footer(entries, pack.end)
                _write_all(file.fd, tail, pack.end)
                os.ftruncate(file.fd, pack.end + len(tail))
                os.fdatasync(file.fd)
        except OSError as err:
            with self._lock:
                self._seal_errors.append(pack)
                self._sealing -= 1
                self._sealed_cv.notify_all()
            raise _os_error(err, pack.path, "sealing a pack") from err
        # The rename and the state change are one step for a reload that scans the directory.
        with self._maint, self._lock:
            if entries:
                try:
                    os.rename(pack.path, final)
                except OSError as err:
                    self._seal_errors.append(pack)
                    self._sealing -= 1
                    self._sealed_cv.notify_all()
                    raise _os_error(err, pack.path, "sealing a pack") from err
            if entries:
                pack.path = final
                pack.state = "sealed"
                pack.entries = {}
                pack.file = None
                self._cache_file_locked(pack.no, file)
                file.refs -= 1
                self._dir_dirty = True
            else:
                # Every chunk of it was deleted before it was sealed: nothing to keep.
                del self._packs[pack.no]
                self._by_id.pop(pack.pack_id, None)
                self._files.pop(pack.no, None)
                file.refs -= 1
                self._drop_file_locked(file)
                with contextlib.suppress(OSError):
                    os.unlink(pack.path)
            self._sealing -= 1
            self._sealed_cv.notify_all()

    def get(self, chunk_id: bytes) -> bytes:
        self._ready()
        for attempt in range(2):
            with self._lock:
                loc = self._index.get(chunk_id)
                file = None
                if loc is not None:
                    pack = self._packs[loc >> 64]
                    try:
                        file = self._acquire_locked(pack)
                    except FileNotFoundError:
                        file = None
                    except OSError as err:
                        raise _os_error(err, pack.path, "opening a pack") from err
            if file is not None:
                _, offset, length = _unloc(loc)  # type: ignore[arg-type]
                try:
                    return os.pread(file.fd, length, offset)
                except OSError as err:
                    raise _os_error(err, self.pack_dir, "reading a chunk") from err
                finally:
                    self._release(file)
            if loc is None and self._legacy:
                legacy = self._get_legacy(chunk_id)
                if legacy is not None:
                    return legacy
            if attempt == 0:
                self._refresh()
        raise ChunkMissing(chunk_id=chunk_id.hex())

    def _get_legacy(self, chunk_id: bytes) -> bytes | None:
        path = self.legacy_path(chunk_id)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _os_error(err, path, "reading a chunk") from err

    def locate(self, chunk_id: bytes) -> tuple[Path, int, int]:
        """``(file, offset, length)`` of the stored blob of ``chunk_id`` (for tools and tests
        that inspect or damage the store on purpose); ``ChunkMissing`` if absent."""
        self._ready()
        with self._lock:
            loc = self._index.get(chunk_id)
            if loc is not None:
                no, offset, length = _unloc(loc)
                return self._packs[no].path, offset, length
        if self._legacy:
            path = self.legacy_path(chunk_id)
            with contextlib.suppress(FileNotFoundError):
                return path, 0, path.stat().st_size
        raise ChunkMissing(chunk_id=chunk_id.hex())

    def contains(self, chunk_id: bytes) -> bool:
        return not self.missing([chunk_id])

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        self._ready()
        with self._lock:
            index = self._index
            absent = {c for c in chunk_ids if c not in index}
        if absent and self._legacy:
            absent = {c for c in absent if not os.path.exists(self.legacy_path(c))}
        return absent

    def flush(self) -> None:
        self._ready()
        with self._lock:
            pack = self._open if self._open is not None and self._open.entries else None
            if pack is not None:
                self._detach_open_locked()
            # Packs whose sealing failed before (their chunks are still readable here) go again.
            todo, self._seal_errors = self._seal_errors, []
            self._sealing += len(todo)
        if pack is not None:
            todo.append(pack)
        errors: builtins.list[DatastoreError] = []
        for one in todo:
            try:
                self._seal(one)
            except DatastoreError as err:
                errors.append(err)
        with self._lock:
            while self._sealing:
                self._sealed_cv.wait()
            if errors:
                raise errors[0]
            if self._seal_errors:
                failed = self._seal_errors[0]
                raise DatastoreError(
                    f"pack {failed.path} could not be sealed; its chunks are not durable. Check the "
                    "datastore's disk, then retry."
                )
            dirty, self._dir_dirty = self._dir_dirty, False
            tomb_fd, tomb_dirty = self._tomb_fd, self._tomb_dirty
            self._tomb_dirty = False
        try:
            if tomb_fd is not None and tomb_dirty:
                os.fsync(tomb_fd)
            if dirty or tomb_dirty:
                fsync_dir(self.pack_dir)
        except OSError as err:
            with self._lock:
                self._dir_dirty = self._dir_dirty or dirty
                self._tomb_dirty = self._tomb_dirty or tomb_dirty
            raise _os_error(err, self.pack_dir, "flushing chunks") from err
        if tomb_dirty:
            self._bump_generation()

    def delete(self, chunk_id: bytes) -> None:
        self._ready()
        with self._lock:
            locs = []
            loc = self._index.pop(chunk_id, None)
            if loc is not None:
                locs.append(loc)
            locs += self._dups.pop(chunk_id, [])
            records = []
            for loc in locs:
                no, _, length = _unloc(loc)
                pack = self._packs.get(no)
                if pack is None:
                    continue
                pack.live_bytes -= length
                if pack.state == "open":
                    # Not in any footer yet: leaving it out of the footer deletes it.
                    pack.entries.pop(chunk_id, None)
                    pack.entry_bytes -= length
                else:
                    records.append(encode_tombstone(pack.pack_id, chunk_id))
            if records:
                try:
                    self._append_tombs_locked(b"".join(records))
                except OSError as err:
                    raise _os_error(err, self.pack_dir, "recording a deleted chunk") from err
        if self._legacy:
            _unlink(self.legacy_path(chunk_id), "deleting a chunk")

    def _append_tombs_locked(self, data: bytes) -> None:
        if self._tomb_fd is None:
            path = self.pack_dir / f"{secrets.token_hex(16)}{TOMB_SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            _write_all(fd, _TOMB_HEADER)
            self._tomb_fd, self._tomb_path = fd, path
        _write_all(self._tomb_fd, data)
        self._tomb_dirty = True

    def list(self) -> Iterator[ChunkInfo]:
        self._ready()
        # Other processes' packs too: gc and figures see the whole store, not our view of it.
        self._refresh()
        with self._lock:
            items = builtins.list(self._index.items())
            for cid, locs in self._dups.items():
                items += [(cid, loc) for loc in locs]
            packs = {no: (p.path, p.state, p.mtime) for no, p in self._packs.items()}
        mtimes: dict[int, float] = {}
        for no, (path, state, mtime) in packs.items():
            if state == "open":
                mtimes[no] = mtime
                continue
            try:
                mtimes[no] = path.stat().st_mtime
            except FileNotFoundError:
                mtimes[no] = mtime  # sealing (renamed meanwhile) or repacked: young enough
        seen: set[bytes] = set()
        for cid, loc in items:
            if cid in seen:
                continue
            seen.add(cid)
            no, _, length = _unloc(loc)
            yield ChunkInfo(cid, length, mtimes.get(no, time.time()))
        if self._legacy:
            yield from self._list_legacy(seen)

    def _legacy_subdirs(self) -> builtins.list[os.DirEntry[str]]:
        try:
            with os.scandir(self.chunk_dir) as it:
                return sorted(
                    (e for e in it if len(e.name) == 2 and set(e.name) <= _HEX and e.is_dir()),
                    key=lambda e: e.name,
                )
        except FileNotFoundError:
            return []

    def _list_legacy(self, seen: set[bytes]) -> Iterator[ChunkInfo]:
        for sub in self._legacy_subdirs():
            try:
                with os.scandir(sub.path) as it:
                    entries = builtins.list(it)
            except FileNotFoundError:
                continue
            for e in entries:
                name = e.name
                if len(name) != 64 or name.startswith(TEMP_PREFIX):
                    continue
                try:
                    st = e.stat()
                    chunk_id = bytes.fromhex(name)
                except FileNotFoundError:
                    continue  # deleted while we listed
                except ValueError:
                    continue  # not a chunk: a stray file someone put here
                if chunk_id not in seen:
                    yield ChunkInfo(chunk_id, st.st_size, st.st_mtime)

    # -- maintenance ----------------------------------------------------------------------------

    def cleanup_temp(self, older_than: float | None = None) -> int:
        """Remove temp files left by crashes (packs that were never sealed, format 1 chunk
        writes) whose mtime is before ``older_than`` (epoch seconds; default: one hour ago).
        Returns how many were removed. The open pack of a live process is written to as long
        as it is in use, so it stays younger than any sensible cutoff."""
        if older_than is None:
            older_than = time.time() - 3600
        self._ready()
        with self._lock:
            mine = {str(p.path) for p in self._packs.values() if p.state != "sealed"}
        removed = 0
        dirs = [self.pack_dir] + [Path(e.path) for e in self._legacy_subdirs()]
        for d in dirs:
            try:
                with os.scandir(d) as it:
                    entries = builtins.list(it)
            except FileNotFoundError:
                continue
            for e in entries:
                if not e.name.startswith(TEMP_PREFIX) or e.path in mine:
                    continue
                try:
                    if e.stat().st_mtime < older_than:
                        os.unlink(e.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def repack(self, threshold: float = 0.5) -> RepackStats:
        """Rewrite sealed packs whose garbage (deleted or superseded chunks) exceeds
        ``threshold`` of their data, remove packs with nothing live, and merge packs smaller
        than a quarter of ``pack_size``; old packs are removed only after the new ones are
        durable. Persists pending deletions first. Safe while inserts run."""
        if not 0 <= threshold < 1:
            raise InvalidInput(f"repack threshold {threshold} is out of range: allowed is 0 <= t < 1.")
        self._ready()
        with self._repack:
            return self._repack_held(threshold)

    def _repack_held(self, threshold: float) -> RepackStats:
        stats = RepackStats()
        self.flush()
        self.sync()
        with self._lock:
            empty, rewrite, small = [], [], []
            for p in self._packs.values():
                if p.state != "sealed":
                    continue
                if p.live_bytes <= 0:
                    empty.append(p)
                elif p.live_bytes < (1 - threshold) * p.entry_bytes:
                    rewrite.append(p)
                elif p.end < self.pack_size // 4:
                    small.append(p)
            if len(small) >= 2:
                rewrite += small
        if not empty and not rewrite:
            return stats
        for pack in rewrite:
            stats.bytes_copied += self._copy_live(pack)
            stats.packs_rewritten += 1
        self.flush()  # the copies are durable before the originals go
        old = empty + rewrite
        with self._lock:
            for pack in old:
                del self._packs[pack.no]
                self._by_id.pop(pack.pack_id, None)
                file = self._files.pop(pack.no, None)
                if file is not None:
                    self._drop_file_locked(file)
                for cid, locs in builtins.list(self._dups.items()):
                    locs[:] = [loc for loc in locs if loc >> 64 != pack.no]
                    if not locs:
                        del self._dups[cid]
        for pack in old:
            try:
                stats.bytes_freed += pack.path.stat().st_size
                os.unlink(pack.path)
            except FileNotFoundError:
                continue
            except OSError as err:
                raise _os_error(err, pack.path, "removing a pack") from err
            stats.packs_removed += 1
        stats.bytes_freed -= stats.bytes_copied
        self._consolidate_tombstones()
        return stats

    def _copy_live(self, pack: _Pack) -> int:
        """Copy the chunks of ``pack`` that the index points to into the open pack."""
        try:
            fd = os.open(pack.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            copied = 0
            for cid, off, ln in footer_entries(read_footer(fd, pack.path)[1]):
                old = _loc(pack.no, off, ln)
                with self._lock:
                    if self._index.get(cid) != old:
                        continue
                blob = os.pread(fd, ln, off)
                with self._lock:
                    if self._index.get(cid) != old:
                        continue  # deleted or re-stored meanwhile
                    # Readers keep finding it: the index moves to the copy in one step.
                    del self._index[cid]
                    to_seal, full = self._append_locked(cid, blob)
                    if full is not None:
                        self._index.setdefault(cid, old)
                    else:
                        pack.live_bytes -= ln
                if to_seal is not None:
                    self._seal(to_seal)
                if full is not None:
                    raise full
                copied += ln
            return copied
        finally:
            os.close(fd)

    def _consolidate_tombstones(self) -> None:
        """Rewrite the tombstones that still name an existing pack into one file; drop the rest."""
        with self._maint:
            _, tomb_paths = self._scan()
            with self._lock:
                known = set(self._by_id)
                if self._tomb_fd is not None:
                    os.fsync(self._tomb_fd)
                    os.close(self._tomb_fd)
                    self._tomb_fd, self._tomb_path = None, None
            pairs = [t for t in self._read_tombs(tomb_paths) if t[0] in known]
            if pairs:
                path = self.pack_dir / f"{secrets.token_hex(16)}{TOMB_SUFFIX}"
                data = _TOMB_HEADER + b"".join(encode_tombstone(p, c) for p, c in sorted(set(pairs)))
                try:
                    write_atomic(path, data, mode=0o600)
                except OSError as err:
                    raise _os_error(err, path, "writing tombstones") from err
            for old in tomb_paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
            fsync_dir(self.pack_dir)
        self._bump_generation()

    def close(self) -> None:
        """Seal the open pack (so its chunks are visible to other processes) and close files.
        Closing does not make chunks durable: that is :meth:`flush`."""
        self._ready()
        with self._lock:
            pack = self._detach_open_locked() if self._open is not None and self._open.entries else None
        if pack is not None:
            self._seal(pack)
        with self._lock:
            if self._open is not None:
                self._abandon_locked(self._open)
                self._open = None
            if self._tomb_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._tomb_fd)
                self._tomb_fd = None
            for file in self._files.values():
                self._drop_file_locked(file)
            self._files.clear()

    # -- figures ----------------------------------------------------------------------------------

    def pack_count(self) -> int:
        self._ready()
        with self._lock:
            return sum(1 for p in self._packs.values() if p.state == "sealed")


class LocalObjectStore:
    """An :class:`~siterecovery.ports.chunk_store.ObjectStore` in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _os_error(err, self.root, "creating the object directory") from err

    def _path(self, name: str) -> Path:
        check_object_name(name)
        return self.root.joinpath(*name.split("/"))

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = path.parent / _temp_name()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_new(tmp, data, fsync=True)
            os.rename(tmp, path)
            fsync_dir(path.parent)
        except OSError as err:
            raise _os_error(err, path, f"writing object {name!r}") from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise ObjectMissing(name) from err
        except OSError as err:
            raise _os_error(err, path, f"reading object {name!r}") from err

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the deepest directory the prefix names, not the whole tree.
        head, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*head.split("/")) if head else self.root
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for f in filenames:
                if f.startswith(TEMP_PREFIX):
                    continue
                name = base + f
                if name.startswith(prefix):
                    names.append(name)
        return iter(sorted(names))

    def delete(self, name: str) -> None:
        _unlink(self._path(name), f"deleting object {name!r}")
