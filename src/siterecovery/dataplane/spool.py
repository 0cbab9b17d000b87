"""The process server's spool: a bounded local cache between agents and the datastore.

An agent's PUT is acknowledged as soon as its chunks are durable in the spool, so the agent is
released at local-disk speed, and an outage of the datastore (an S3 endpoint down, a full
target) costs recovery point objective, never data: the spool absorbs the stream, a drain
thread writes it to the datastore's chunk store in the order it arrived, and when the spool
fills up agents are told to slow down (BUSY) instead of anything being dropped.

Directory layout::

    <spool>/lock                    flock: one process server per spool directory
    <spool>/seg-<20 digits>.spool   segments, drained in number order

Segment format (integers unsigned, big-endian)::

    offset  size  field
    0       4     magic b"SRSP"
    4       1     format version, 1
    5       3     reserved, 0
    8       8     segment number (equals the number in the file name)
    16      ...   records, back to back:

    record: length n (4) | CRC-32 (4) | chunk id (32) | blob (n)

The CRC-32 (zlib) covers the length field, the id and the blob. A record is appended (one
``write``) and the file is fsync'ed before the PUT that carried it is acknowledged, so every
acknowledged record survives a crash of the process or of the host.

Invariants:

* only the newest segment is appended to; a record is acknowledged only after its fsync;
* the drain reads records strictly in (segment, offset) order and inserts them into the chunk
  store (idempotent, so replaying a record twice is harmless);
* a segment file is deleted only after every one of its records was inserted *and* the chunk
  store was flushed (``ChunkStore.flush``): what the spool acknowledged is always either in the
  spool or durable in the datastore;
* ``flush()`` returns only when every record acknowledged before the call is durable in the
  datastore: the durability point before a manifest may refer to the chunks;
* the store's view of what exists is reloaded when an agent starts an index (``sync_store``);
  while a reload has failed, nothing the store reports is trusted (see ``sync_store``).

Recovery after a crash: segments are scanned in order, each record's CRC checked. A record cut
short or failing its check at the end of the newest segment is a torn write that was never
acknowledged: the file is truncated there. The same in an older segment means the disk lost
acknowledged data; the spool truncates there too (it cannot do better) and reports it in
``status()["problems"]``. Everything that remains is indexed and drained again from the start.

Backpressure: ``limit_bytes`` bounds the segment files on disk. When they reach the high
watermark the spool refuses PUTs (``SpoolBusy`` with a retry delay) until the drain brings them
below the low watermark; hysteresis keeps agents from flapping at the edge.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.dataplane.chunk_codec import ID_SIZE
from siterecovery.durable import fsync_dir
from siterecovery.errors import DatastoreError, InvalidInput, SiteRecoveryError
from siterecovery.ports.chunk_store import ChunkStore

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"SRSP"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct(">4sB3sQ")
RECORD_HEADER = struct.Struct(">II32s")
SEGMENT_RE = re.compile(r"^seg-(\d{20})\.spool$")
MAX_RECORD = 32 * 1024 * 1024
_READ_AHEAD = 8 * 1024 * 1024


class SpoolBusy(SiteRecoveryError):
    """The spool is above its high watermark: the agent must slow down and send again."""

    exit_code = 13
    http_status = 503
    template = "the process server's spool is busy ({reason}); retry in {retry_after:.1f}s."

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = float(fields.get("retry_after", 1.0))
        self.reason = str(fields.get("reason", ""))


class DatastoreUnavailable(DatastoreError):
    """The spool cannot get its backlog into the datastore (flush timed out)."""


class SpoolError(SiteRecoveryError):
    """The spool directory cannot be used."""

    exit_code = 13
    http_status = 500


def record_crc(chunk_id: bytes, blob: bytes | memoryview) -> int:
    return zlib.crc32(blob, zlib.crc32(struct.pack(">I", len(blob)) + chunk_id))


def encode_record(chunk_id: bytes, blob: bytes) -> bytes:
    return RECORD_HEADER.pack(len(blob), record_crc(chunk_id, blob), chunk_id) + blob


def segment_name(number: int) -> str:
    return f"seg-{number:020d}.spool"


@dataclass
class _Segment:
    number: int
    path: Path
    size: int  # bytes of valid data, header included
    records: int
    sealed: bool


@dataclass(frozen=True)
class ScanResult:
    """What a scan of one segment found: its valid records and where the valid part ends."""

    records: list[tuple[bytes, int, int]]  # (chunk id, blob offset, blob length)
    valid_size: int
    file_size: int
    problem: str | None  # why the scan stopped before the end of the file, if it did


def scan_segment(path: Path, number: int) -> ScanResult:
    """Read and check every record of a segment file (see the module docstring)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < SEGMENT_HEADER.size:
        return ScanResult([], 0, len(data), "segment header cut short")
    magic, version, _reserved, num = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION or num != number:
        return ScanResult([], 0, len(data), f"not a version {SEGMENT_VERSION} spool segment number {number}")
    pos = SEGMENT_HEADER.size
    records: list[tuple[bytes, int, int]] = []
    view = memoryview(data)
    problem: str | None = None
    while pos < len(data):
        if pos + RECORD_HEADER.size > len(data):
            problem = f"record header cut short at byte {pos}"
            break
        n, crc, cid = RECORD_HEADER.unpack_from(data, pos)
        start = pos + RECORD_HEADER.size
        if n > MAX_RECORD or start + n > len(data):
            problem = f"record at byte {pos} cut short"
            break
        if record_crc(cid, view[start : start + n]) != crc:
            problem = f"record at byte {pos} fails its CRC"
            break
        records.append((cid, start, n))
        pos = start + n
    return ScanResult(records, pos, len(data), problem)


class Spool:
    """A bounded, crash-safe FIFO of encoded chunks in front of a chunk store (thread safe).

    ``put_many`` / ``missing`` / ``get`` / ``flush`` are what a process server answers agents
    with; ``status`` is its health. Call ``close`` to stop the drain thread (what is not drained
    yet stays in the spool for the next start).
    """

    def __init__(
        self,
        path: Path,
        store: ChunkStore,
        limit_bytes: int,
        *,
        high_watermark: float = 0.9,
        low_watermark: float = 0.7,
        segment_bytes: int = 64 * 1024 * 1024,
        flush_interval: float = 1.0,
        retry_max: float = 5.0,
        start: bool = True,
    ) -> None:
        if not 0 < low_watermark < high_watermark <= 1:
            raise InvalidInput(
                f"spool watermarks low={low_watermark} high={high_watermark} are not allowed: "
                "use 0 < low < high <= 1."
            )
        if limit_bytes < 1024 * 1024:
            raise InvalidInput(f"a spool limit of {limit_bytes} bytes is too small: use at least 1 MiB.")
        self.path = Path(path)
        self.store = store
        self.limit_bytes = limit_bytes
        self.high_bytes = int(limit_bytes * high_watermark)
        self.low_bytes = int(limit_bytes * low_watermark)
        self.segment_bytes = segment_bytes
        self.flush_interval = flush_interval
        self.retry_max = retry_max

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._active_fd: int | None = None
        self._next_number = 1
        self._index: dict[bytes, tuple[int, int, int]] = {}
        self._appended = 0  # records ever appended (this run, plus those recovered)
        self._drained = 0  # records inserted into the store
        self._durable = 0  # records inserted and flushed
        self._pending_bytes = 0
        self._disk_bytes = 0
        self._batches: deque[tuple[int, float]] = deque()  # (appended count after batch, time)
        self._throttling = False
        self._flush_waiters = 0
        self._last_flush = time.monotonic()
        self._drain_error: str | None = None
        self._drain_error_since: float | None = None
        self._store_error: str | None = None
        self._stale_view = False  # a reload of the store's view failed: trust none of it
        self._problems: list[str] = []
        self._received_chunks = 0
        self._received_bytes = 0
        self._busy_replies = 0
        self._closing = False
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._cursor: tuple[int, int] | None = None  # (segment number, offset) of the next record

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpoolError(f"cannot create the spool directory {self.path}: {err.strerror}.") from err
        self._take_lock()
        try:
            self._recover()
        except BaseException:
            self._release_lock()
            raise
        if start:
            self.start()

    # -- lifecycle ------------------------------------------------------------------------

    def _take_lock(self) -> None:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise SpoolError(
                f"the spool {self.path} is in use by another process server; give each process "
                "server its own --spool directory."
            ) from err
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def start(self) -> None:
        """Start the drain thread (done by the constructor unless ``start=False``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain_loop, name="spool-drain", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop draining and release the spool; undrained records stay for the next start."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            if self._active_fd is not None:
                os.close(self._active_fd)
                self._active_fd = None
        self._release_lock()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recover(self) -> None:
        names = sorted(p.name for p in self.path.iterdir() if SEGMENT_RE.match(p.name))
        for i, name in enumerate(names):
            m = SEGMENT_RE.match(name)
            assert m is not None
            number = int(m.group(1))
            path = self.path / name
            self._next_number = max(self._next_number, number + 1)
            scan = scan_segment(path, number)
            newest = i == len(names) - 1
            if scan.problem is not None:
                if newest:
                    log.warning("spool %s: torn tail (%s), truncated: never acknowledged", name, scan.problem)
                else:
                    lost = scan.file_size - scan.valid_size
                    self._problems.append(
                        f"segment {name}: {scan.problem}; {lost} bytes after it were lost (disk damage?)"
                    )
                    log.error("spool %s: %s; %d acknowledged bytes lost", name, scan.problem, lost)
            if not scan.records:
                path.unlink()
                continue
            if scan.valid_size != scan.file_size:
                os.truncate(path, scan.valid_size)
            seg = _Segment(number, path, scan.valid_size, len(scan.records), sealed=True)
            self._segments[number] = seg
            for cid, off, n in scan.records:
                self._index[cid] = (number, off, n)
                self._pending_bytes += n
            self._appended += len(scan.records)
            self._disk_bytes += seg.size
            self._batches.append((self._appended, path.stat().st_mtime))
        if self._segments:
            first = min(self._segments)
            self._cursor = (first, SEGMENT_HEADER.size)
            log.info(
                "spool %s: %d chunks (%d bytes) from before the restart will be drained",
                self.path,
                self._appended,
                self._pending_bytes,
            )
        self._update_throttle()

    # -- the agent-facing operations ------------------------------------------------------

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        """Ids neither spooled nor in the datastore. If the datastore cannot answer, every id
        not spooled counts as lacking: the agent sends it and the spool absorbs it."""
        with self._lock:
            candidates = [c for c in chunk_ids if c not in self._index]
            stale = self._stale_view
        if not candidates or stale:
            return set(candidates)
        try:
            lacking = self.store.missing(candidates)
        except Exception as err:
            with self._lock:
                self._store_error = str(err) or type(err).__name__
            return set(candidates)
        if self._store_error is not None:
            with self._lock:
                self._store_error = None
        return lacking

    def sync_store(self) -> None:
        """Have the chunk store reload its view of what exists if another process changed it
        (``ChunkStore.sync`` where the store has one): called before an agent starts a disk's
        index, so that ``missing`` and the drain never trust a chunk a gc removed elsewhere.

        If the datastore cannot answer, the view is marked stale instead of failing the agent:
        until a reload succeeds, ``missing`` reports every id that is not spooled as lacking
        (the agent sends it, the spool absorbs it) and the drain reloads before it inserts."""
        try:
            self._reload_store()
        except Exception as err:
            with self._lock:
                self._stale_view = True
                self._store_error = str(err) or type(err).__name__

    def _reload_store(self) -> None:
        sync = getattr(self.store, "sync", None)
        if sync is not None:
            sync()
        with self._lock:
            self._stale_view = False

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Append the chunks durably (fsync) and return, per item, whether it was new to the
        spool. Raises ``SpoolBusy`` (nothing appended) above the high watermark."""
        for cid, blob in items:
            if len(cid) != ID_SIZE:
                raise InvalidInput(f"a chunk id is {ID_SIZE} bytes, got {len(cid)}.")
            if len(blob) > MAX_RECORD:
                raise InvalidInput(f"a chunk of {len(blob)} bytes is larger than {MAX_RECORD} bytes.")
        with self._cv:
            if self._closing:
                raise SpoolError("the spool is closing; send again to the restarted process server.")
            flags: list[bool] = []
            fresh: dict[bytes, bytes] = {}
            for cid, blob in items:
                new = cid not in self._index and cid not in fresh
                flags.append(new)
                if new:
                    fresh[cid] = blob
            self._received_chunks += len(items)
            self._received_bytes += sum(len(b) for _, b in items)
            if not fresh:
                return flags
            size = sum(RECORD_HEADER.size + len(b) for b in fresh.values())
            self._update_throttle()
            if self._throttling or self._disk_bytes + size > self.limit_bytes:
                self._busy_replies += 1
                raise SpoolBusy(retry_after=self._retry_after(), reason=self._busy_reason(size))
            self._append(fresh, size)
            self._cv.notify_all()
            return flags

    def get(self, chunk_id: bytes) -> bytes:
        """The blob of a chunk from the spool, or else from the datastore (``ChunkMissing``)."""
        with self._lock:
            loc = self._index.get(chunk_id)
            seg = self._segments.get(loc[0]) if loc is not None else None
        if loc is not None and seg is not None:
            try:
                with open(seg.path, "rb") as f:
                    data = os.pread(f.fileno(), loc[2], loc[1])
                if len(data) == loc[2]:
                    return data
            except FileNotFoundError:
                pass  # drained and deleted meanwhile: the datastore has it now
        return self.store.get(chunk_id)

    def flush(self, timeout: float = 60.0) -> int:
        """Wait until every chunk acknowledged before this call is durable in the datastore;
        return how many chunks were still to drain when called. ``DatastoreUnavailable`` if
        that takes longer than ``timeout`` (nothing is lost: the chunks stay spooled)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            target = self._appended
            waiting = target - self._durable
            self._flush_waiters += 1
            self._cv.notify_all()
            try:
                while self._durable < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DatastoreUnavailable(self._flush_timeout_message(target, timeout))
                    self._cv.wait(remaining)
            finally:
                self._flush_waiters -= 1
        return waiting

    def status(self) -> dict[str, Any]:
        """Health of the spool and its drain (JSON-serializable)."""
        with self._lock:
            now = time.time()
            oldest: float | None = None
            for end, t in self._batches:
                if end > self._drained:
                    oldest = t
                    break
            if self._drain_error is not None:
                state = "datastore-unavailable"
            elif self._throttling:
                state = "throttling"
            else:
                state = "ok"
            return {
                "state": state,
                "backlog_chunks": self._appended - self._drained,
                "backlog_bytes": self._pending_bytes,
                "not_durable_chunks": self._appended - self._durable,
                "oldest_age_s": round(now - oldest, 3) if oldest is not None else 0.0,
                "spool_bytes": self._disk_bytes,
                "limit_bytes": self.limit_bytes,
                "high_watermark_bytes": self.high_bytes,
                "low_watermark_bytes": self.low_bytes,
                "throttling": self._throttling,
                "segments": len(self._segments),
                "datastore_error": self._drain_error or self._store_error,
                "datastore_error_since": self._drain_error_since,
                "received_chunks": self._received_chunks,
                "received_bytes": self._received_bytes,
                "drained_chunks": self._drained,
                "busy_replies": self._busy_replies,
                "problems": list(self._problems),
            }

    # -- appending ------------------------------------------------------------------------

    def _update_throttle(self) -> None:
        if self._throttling and self._disk_bytes <= self.low_bytes:
            self._throttling = False
        elif not self._throttling and self._disk_bytes >= self.high_bytes:
            self._throttling = True

    def _retry_after(self) -> float:
        return self.retry_max if self._drain_error is not None else 0.5

    def _busy_reason(self, size: int) -> str:
        used = f"{self._disk_bytes / 2**20:.1f} of {self.limit_bytes / 2**20:.1f} MiB used"
        if size > self.limit_bytes - SEGMENT_HEADER.size:
            return f"a batch of {size} bytes can never fit a spool of {self.limit_bytes} bytes"
        if self._drain_error is not None:
            return f"spool filling while the datastore is unavailable ({self._drain_error}); {used}"
        return f"spool above its high watermark, draining; {used}"

    def _new_segment(self) -> None:
        number = self._next_number
        self._next_number += 1
        path = self.path / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, b"\0\0\0", number))
            os.fsync(fd)
            fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        seg = _Segment(number, path, SEGMENT_HEADER.size, 0, sealed=False)
        self._segments[number] = seg
        self._active, self._active_fd = seg, fd
        self._disk_bytes += SEGMENT_HEADER.size
        if self._cursor is None:
            self._cursor = (number, SEGMENT_HEADER.size)

    def _seal_active(self) -> None:
        if self._active is not None:
            self._active.sealed = True
            self._active = None
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None

    def _append(self, fresh: dict[bytes, bytes], size: int) -> None:
        if self._active is not None and self._active.size + size > self.segment_bytes:
            self._seal_active()
        try:
            if self._active is None:
                self._new_segment()
            seg, fd = self._active, self._active_fd
            assert seg is not None and fd is not None
            data = b"".join(encode_record(cid, blob) for cid, blob in fresh.items())
            written = 0
            view = memoryview(data)
            try:
                while written < len(data):
                    written += os.write(fd, view[written:])
                os.fsync(fd)
            except OSError:
                # Leave no half batch behind: a later batch must not follow a torn record.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, seg.size)
                raise
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                self._busy_replies += 1
                raise SpoolBusy(
                    retry_after=self.retry_max, reason=f"the spool's disk is full ({err.strerror})"
                ) from err
            raise SpoolError(f"writing to the spool {self.path} failed: {err.strerror or err}.") from err
        off = seg.size
        for cid, blob in fresh.items():
            self._index[cid] = (seg.number, off + RECORD_HEADER.size, len(blob))
            off += RECORD_HEADER.size + len(blob)
            self._pending_bytes += len(blob)
        seg.size += len(data)
        seg.records += len(fresh)
        self._disk_bytes += len(data)
        self._appended += len(fresh)
        self._batches.append((self._appended, time.time()))
        self._update_throttle()

    def _flush_timeout_message(self, target: int, timeout: float) -> str:
        left = target - self._durable
        why = self._drain_error or "the datastore is slow"
        return (
            f"the process server could not make {left} spooled chunk(s) durable in the datastore "
            f"within {timeout:g}s: {why}. Nothing is lost: the chunks stay in its spool "
            f"({self._pending_bytes / 2**20:.1f} MiB waiting) and drain when the datastore is back; "
            "recovery points resume then."
        )

    # -- draining -------------------------------------------------------------------------

    def _retrying(self, what: str, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` until it succeeds (True) or the spool closes (False); record failures."""
        delay = 0.1
        while True:
            try:
                fn()
            except Exception as err:
                with self._cv:
                    if self._drain_error is None:
                        self._drain_error_since = time.time()
                        log.warning("spool drain: %s failed: %s; retrying", what, err)
                    self._drain_error = f"{what}: {err}"
                    self._cv.wait(delay)
                    if self._closing:
                        return False
                delay = min(delay * 2, self.retry_max)
                continue
            if self._drain_error is not None or self._store_error is not None:
                with self._cv:
                    if self._drain_error is not None:
                        log.info("spool drain: the datastore is back")
                    self._drain_error = None
                    self._drain_error_since = None
                    self._store_error = None
            return True

    def _drain_loop(self) -> None:
        while True:
            with self._cv:
                if self._closing:
                    return
                work = self._next_work()
                if work is None:
                    self._cv.wait(self.flush_interval / 2)
                    continue
            kind, seg_no, start, end = work
            if kind == "read":
                if not self._drain_range(seg_no, start, end):
                    return
            elif not self._flush_and_delete():
                return

    def _next_work(self) -> tuple[str, int, int, int] | None:
        """What the drain does next (called with the lock held)."""
        # Skip past segments that are gone or fully read.
        while self._cursor is not None:
            seg_no, off = self._cursor
            seg = self._segments.get(seg_no)
            if seg is not None and off < seg.size:
                return ("read", seg_no, off, min(seg.size, off + _READ_AHEAD))
            later = [n for n in self._segments if n > seg_no]
            if seg is not None and not seg.sealed:
                break  # caught up with the segment being appended to
            if not later:
                break
            self._cursor = (min(later), SEGMENT_HEADER.size)
        if not (self._drained > self._durable or self._finished_segments()):
            return None
        if self._flush_waiters > 0 or time.monotonic() - self._last_flush >= self.flush_interval:
            return ("flush", 0, 0, 0)
        return None

    def _finished_segments(self) -> list[_Segment]:
        """Segments whose every record was inserted into the store (lock held): those before the
        cursor's, and the cursor's own when the cursor is at its end."""
        if self._cursor is None:
            return []
        seg_no, off = self._cursor
        done = [s for s in self._segments.values() if s.number < seg_no]
        seg = self._segments.get(seg_no)
        if seg is not None and off >= seg.size and seg.records:
            done.append(seg)
        return done

    def _drain_range(self, seg_no: int, start: int, end: int) -> bool:
        with self._lock:
            seg = self._segments[seg_no]
            stale = self._stale_view
        # An insert into a stale view could take a chunk that a gc removed for present.
        if stale and not self._retrying("reloading the datastore's view", self._reload_store):
            return False
        try:
            with open(seg.path, "rb") as f:
                data = os.pread(f.fileno(), end - start, start)
        except OSError as err:
            with self._cv:
                self._problems.append(f"segment {seg.path.name} unreadable: {err}")
                self._drain_error = f"reading the spool: {err}"
                self._cv.wait(self.retry_max)
            return not self._closing
        pos = 0
        if len(data) >= RECORD_HEADER.size:
            first = RECORD_HEADER.size + RECORD_HEADER.unpack_from(data)[0]
            if first > len(data) and start + first <= seg.size:
                # A record larger than the read-ahead: read it on its own.
                with open(seg.path, "rb") as f:
                    data = os.pread(f.fileno(), first, start)
        view = memoryview(data)
        while pos + RECORD_HEADER.size <= len(data):
            n, crc, cid = RECORD_HEADER.unpack_from(data, pos)
            blob_start = pos + RECORD_HEADER.size
            if blob_start + n > len(data):
                break
            blob = bytes(view[blob_start : blob_start + n])
            if record_crc(cid, blob) != crc:
                with self._cv:
                    self._problems.append(
                        f"segment {seg.path.name}: record at byte {start + pos} fails its CRC on "
                        "reading back; skipped (disk damage?)"
                    )
            elif not self._retrying("writing to the datastore", functools.partial(self._insert, cid, blob)):
                return False
            with self._cv:
                here = start + blob_start
                if self._index.get(cid) == (seg_no, here, n):
                    del self._index[cid]
                self._pending_bytes -= n
                self._drained += 1
                self._cursor = (seg_no, here + n)
                while self._batches and self._batches[0][0] <= self._drained:
                    self._batches.popleft()
            pos = blob_start + n
        return True

    def _insert(self, chunk_id: bytes, blob: bytes) -> None:
        self.store.insert(chunk_id, blob)

    def _flush_and_delete(self) -> bool:
        with self._lock:
            drained = self._drained
        if not self._retrying("flushing the datastore", self.store.flush):
            return False
        with self._cv:
            self._durable = max(self._durable, drained)
            self._last_flush = time.monotonic()
            # The drain thread alone moves the cursor, so what was finished before the flush is
            # still finished, and covered by it (appends only add after the cursor).
            doomed = self._finished_segments()
            if self._active is not None and self._active in doomed:
                self._seal_active()
            for seg in doomed:
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
                self._segments.pop(seg.number, None)
                self._disk_bytes -= seg.size
            if self._cursor is not None and self._cursor[0] not in self._segments:
                later = sorted(self._segments)
                self._cursor = (later[0], SEGMENT_HEADER.size) if later else None
            if not self._segments:
                self._batches.clear()
            self._update_throttle()
            self._cv.notify_all()
        if doomed:
            with contextlib.suppress(OSError):
                fsync_dir(self.path)
        return True
