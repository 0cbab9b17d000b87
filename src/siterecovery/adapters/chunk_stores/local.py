"""Chunk and object stores in a local directory (any POSIX filesystem with hard links).

Layout of a :class:`LocalChunkStore` rooted at ``root``::

    root/chunks/<first 2 hex digits of the id>/<64 hex digits of the id>   one encoded chunk
    root/chunks/<2 hex>/.tmp-<...>                                         an insert in flight

Insert writes a temp file in the chunk's own directory and hard-links it to its final name, then
removes the temp name. ``link`` fails if the name exists, so a chunk is never rewritten and of
several racing inserts of one id exactly one reports True. (On a filesystem without hard links
it falls back to ``rename``, atomic too, where racing inserts may each report True.) Inserts do
not fsync: :meth:`LocalChunkStore.flush` makes everything durable at once with ``syncfs(2)`` on
the store's filesystem, which the datastore calls before it writes a manifest. A crash leaves at
most some temp files, which ``list``/``get`` ignore and :meth:`LocalChunkStore.cleanup_temp`
removes (garbage collection calls it). The mtime of a chunk file is the time of its last insert:
re-inserting an existing chunk only sets its mtime to now, which protects it from a garbage
collection that runs at the same time (see ``dataplane.datastore``).

Layout of a :class:`LocalObjectStore` rooted at ``root``: object ``a/b/c`` is the file
``root/a/b/c``. ``put`` is temp + fsync + rename + fsync of the directory, so an object is
always either the old or the new version, durably.

Errors: ENOSPC and EDQUOT become ``StorageFull`` (the temp file is removed first, so nothing
partial is left); other OS errors become ``DatastoreError`` naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from siterecovery.errors import ChunkMissing, DatastoreError, InvalidInput, StorageFull
from siterecovery.ports.chunk_store import ChunkInfo, ObjectMissing

TEMP_PREFIX = ".tmp-"
_HEX = frozenset("0123456789abcdef")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _libc_syncfs() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _libc_syncfs()


def syncfs(path: Path) -> None:
    """Make every write on the filesystem holding ``path`` durable (``os.sync`` if no syncfs)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise DatastoreError(f"syncfs of {path} failed: {os.strerror(err)}.")
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(err: OSError, where: Path, what: str) -> DatastoreError:
    if err.errno in _FULL_ERRNOS:
        return StorageFull(where=str(where), detail=f"{what}: {err.strerror}")
    return DatastoreError(
        f"{what} failed at {where}: {err.strerror or err}. Check the path and its permissions."
    )


def _temp_name() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"


def _write_new(path: Path, data: bytes, *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
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


class LocalChunkStore:
    """A :class:`~siterecovery.ports.chunk_store.ChunkStore` in ``root/chunks``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        try:
            self.chunk_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _os_error(err, self.chunk_dir, "creating the chunk directory") from err

    def path(self, chunk_id: bytes) -> Path:
        """Where the chunk ``chunk_id`` lives (whether or not it exists)."""
        h = chunk_id.hex()
        return self.chunk_dir / h[:2] / h

    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        _check_id(chunk_id)
        final = self.path(chunk_id)
        try:
            os.utime(final)
            return False
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _os_error(err, final, "refreshing a chunk") from err
        tmp = final.parent / _temp_name()
        try:
            try:
                _write_new(tmp, blob, fsync=False)
            except FileNotFoundError:
                final.parent.mkdir(exist_ok=True)
                _write_new(tmp, blob, fsync=False)
            try:
                os.link(tmp, final)
            except FileExistsError:
                # Another thread or process inserted it between our utime and link.
                os.utime(final)
                return False
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                os.rename(tmp, final)
            return True
        except OSError as err:
            raise _os_error(err, final, "writing a chunk") from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get(self, chunk_id: bytes) -> bytes:
        path = self.path(chunk_id)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError as err:
            raise ChunkMissing(chunk_id=chunk_id.hex()) from err
        except OSError as err:
            raise _os_error(err, path, "reading a chunk") from err

    def contains(self, chunk_id: bytes) -> bool:
        return os.path.exists(self.path(chunk_id))

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        return {c for c in chunk_ids if not os.path.exists(self.path(c))}

    def flush(self) -> None:
        try:
            syncfs(self.chunk_dir)
        except OSError as err:
            raise _os_error(err, self.chunk_dir, "flushing chunks") from err

    def delete(self, chunk_id: bytes) -> None:
        path = self.path(chunk_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _os_error(err, path, "deleting a chunk") from err

    def _subdirs(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.chunk_dir) as it:
                return sorted(
                    (e for e in it if len(e.name) == 2 and set(e.name) <= _HEX and e.is_dir()),
                    key=lambda e: e.name,
                )
        except FileNotFoundError:
            return []

    def list(self) -> Iterator[ChunkInfo]:
        for sub in self._subdirs():
            try:
                with os.scandir(sub.path) as it:
                    entries = list(it)
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
                yield ChunkInfo(chunk_id, st.st_size, st.st_mtime)

    def cleanup_temp(self, older_than: float | None = None) -> int:
        """Remove temp files left by crashed inserts; return how many were removed.

        Only temp files whose mtime is before ``older_than`` (epoch seconds; default: one hour
        ago) are removed, so that inserts in flight keep theirs.
        """
        if older_than is None:
            older_than = time.time() - 3600
        removed = 0
        for sub in self._subdirs():
            with os.scandir(sub.path) as it:
                for e in it:
                    if not e.name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        if e.stat().st_mtime < older_than:
                            os.unlink(e.path)
                            removed += 1
                    except FileNotFoundError:
                        continue
        return removed


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
            _fsync_dir(path.parent)
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
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _os_error(err, path, f"deleting object {name!r}") from err
