"""Shared helpers around libnbd, the NBD client library.

``import nbd`` is Debian's ``python3-libnbd`` package (libnbd's official Python binding; it is
not on PyPI, so the project virtualenv is made with ``--system-site-packages``). Used by the QEMU
source (reading fleecing exports and dirty bitmaps), by workloads that write through a machine's
NBD exports, and by materialization.

Facts these helpers rely on:

* An NBD request moves at most 32 MiB with QEMU's server; :data:`IO_SIZE` (4 MiB) is the size
  we split reads and writes into: large enough to amortise a round trip, small enough to keep
  two cores busy with several in flight.
* ``block_status`` answers may cover less than asked, and each meta context may cover a
  different length; :func:`block_status` loops until every requested context covers the range.
* A libnbd handle serialises its synchronous commands under one handle lock, so parallel I/O
  uses one handle per thread (:class:`HandlePool`); QEMU allows several connections to one
  export.
* Extents returned are sorted, non-overlapping, and adjacent extents with equal flags are merged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nbd

from siterecovery.errors import SourceError
from siterecovery.ports.source import Extent, coalesce, split

__all__ = ["coalesce", "split"]

IO_SIZE = 4 * 1024 * 1024
# NBD block status lengths are 32-bit; stay well under that and on a 64 KiB boundary.
_STATUS_REQUEST = 1 << 30

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1  # base:allocation: not allocated
STATE_ZERO = 2  # base:allocation: reads as zeros
STATE_DIRTY = 1  # qemu:dirty-bitmap:NAME: the bitmap has the block set


def dirty_bitmap_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


def connect(
    socket_path: str,
    export_name: str,
    meta_contexts: Sequence[str] = (),
    *,
    require_contexts: bool = True,
) -> Any:
    """Open a libnbd handle to ``export_name`` on a unix socket, negotiating ``meta_contexts``.

    Raises SourceError if the connection fails or (with ``require_contexts``) the server does not
    offer one of the contexts, e.g. because a dirty bitmap is not exported.
    """
    h = nbd.NBD()
    try:
        h.set_export_name(export_name)
        for ctx in meta_contexts:
            h.add_meta_context(ctx)
        h.connect_unix(str(socket_path))
    except nbd.Error as err:
        raise SourceError(
            f"cannot open NBD export {export_name!r} on {socket_path}: {err}. Check that the machine "
            "is running and exports that disk."
        ) from err
    if require_contexts:
        missing = [ctx for ctx in meta_contexts if not h.can_meta_context(ctx)]
        if missing:
            close_handle(h)
            raise SourceError(
                f"NBD export {export_name!r} on {socket_path} does not offer {', '.join(missing)}; "
                "the bitmap or status information it needs is not exported."
            )
    return h


def close_handle(h: Any) -> None:
    """Disconnect politely; a handle whose server is gone is just dropped."""
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def block_status(
    h: Any, contexts: Sequence[str], offset: int = 0, length: int | None = None
) -> dict[str, list[tuple[int, int, int]]]:
    """Return ``{context: [(offset, length, flags), ...]}`` covering [offset, offset+length).

    Extents are clipped to the range, sorted, and merged where adjacent flags are equal.
    """
    size = int(h.get_size())
    end = size if length is None else min(size, offset + length)
    covered = dict.fromkeys(contexts, offset)
    result: dict[str, list[tuple[int, int, int]]] = {ctx: [] for ctx in contexts}

    def callback(metacontext: str, start: int, entries: list[int], err: Any) -> int:
        if metacontext not in covered:
            return 0
        pos = start
        out = result[metacontext]
        for i in range(0, len(entries) - 1, 2):
            ext_len, flags = entries[i], entries[i + 1]
            ext_start = max(pos, covered[metacontext])
            ext_end = min(pos + ext_len, end)
            if ext_end > ext_start:
                if out and out[-1][0] + out[-1][1] == ext_start and out[-1][2] == flags:
                    last = out[-1]
                    out[-1] = (last[0], last[1] + ext_end - ext_start, flags)
                else:
                    out.append((ext_start, ext_end - ext_start, flags))
                covered[metacontext] = ext_end
            pos += ext_len
        return 0

    while True:
        pos = min(covered.values()) if covered else end
        if pos >= end:
            return result
        before = dict(covered)
        try:
            h.block_status(min(end - pos, _STATUS_REQUEST), pos, callback)
        except nbd.Error as err:
            raise SourceError(f"NBD block status at offset {pos} failed: {err}.") from err
        if covered == before:
            missing = [ctx for ctx in contexts if covered[ctx] <= pos]
            raise SourceError(
                f"NBD server returned no block status for {', '.join(missing)} at offset {pos}; "
                "the export does not provide that information."
            )


def extents_where(
    h: Any, context: str, keep: Callable[[int], bool], offset: int = 0, length: int | None = None
) -> list[Extent]:
    """Extents of ``context`` whose flags satisfy ``keep``, merged across flag differences."""
    out: list[Extent] = []
    for start, ext_len, flags in block_status(h, [context], offset, length)[context]:
        if not keep(flags):
            continue
        if out and out[-1].end == start:
            out[-1] = Extent(out[-1].offset, out[-1].length + ext_len)
        else:
            out.append(Extent(start, ext_len))
    return out


def data_extents(h: Any) -> list[Extent]:
    """Extents that may hold non-zero data (``base:allocation`` without the ZERO flag).

    Only ZERO guarantees zeros; a HOLE without ZERO may read as anything, so it counts as data.
    """
    return extents_where(h, BASE_ALLOCATION, lambda flags: not flags & STATE_ZERO)


class HandlePool:
    """One libnbd handle per thread to the same export, opened lazily, closed together.

    ``pread``/``pwrite`` are safe to call from any number of threads; each thread's requests go
    over its own connection so they run in parallel on the server.
    """

    def __init__(self, socket_path: str, export_name: str, meta_contexts: Sequence[str] = ()) -> None:
        self.socket_path = str(socket_path)
        self.export_name = export_name
        self.meta_contexts = tuple(meta_contexts)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._closed = False

    def handle(self) -> Any:
        h = getattr(self._local, "h", None)
        if h is not None:
            return h
        h = connect(self.socket_path, self.export_name, self.meta_contexts)
        with self._lock:
            if self._closed:
                close_handle(h)
                raise SourceError(f"NBD export {self.export_name!r} was already closed by this reader.")
            self._handles.append(h)
        self._local.h = h
        return h

    def size(self) -> int:
        return int(self.handle().get_size())

    def pread(self, offset: int, length: int) -> bytes:
        h = self.handle()
        try:
            if length <= IO_SIZE:
                return bytes(h.pread(length, offset))
            return b"".join(
                bytes(h.pread(p.length, p.offset)) for p in split([Extent(offset, length)], IO_SIZE)
            )
        except nbd.Error as err:
            raise SourceError(
                f"NBD read of {length} bytes at {offset} from {self.export_name!r} failed: {err}."
            ) from err

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        h = self.handle()
        view = memoryview(data)
        try:
            for pos in range(0, len(view), IO_SIZE):
                h.pwrite(bytes(view[pos : pos + IO_SIZE]), offset + pos)
        except nbd.Error as err:
            raise SourceError(
                f"NBD write of {len(view)} bytes at {offset} to {self.export_name!r} failed: {err}."
            ) from err

    def flush(self) -> None:
        """Flush every connection of this pool (each one's writes are its own)."""
        with self._lock:
            handles = list(self._handles)
        for h in handles:
            try:
                h.flush()
            except nbd.Error as err:
                raise SourceError(f"NBD flush of {self.export_name!r} failed: {err}.") from err

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
        for h in handles:
            close_handle(h)
        self._local = threading.local()


def parallel_pread(
    pool: HandlePool,
    extents: Iterable[Extent],
    consume: Callable[[Extent, bytes], None],
    workers: int = 4,
) -> None:
    """Read ``extents`` in IO_SIZE pieces on ``workers`` threads and call ``consume`` per piece.

    ``consume`` runs on the worker threads, in no particular order; at most ``2 * workers``
    pieces are in flight so memory stays bounded.
    """
    pieces = split(extents, IO_SIZE)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        in_flight: list[Any] = []
        for piece in pieces:
            in_flight.append(ex.submit(lambda p: consume(p, pool.pread(p.offset, p.length)), piece))
            if len(in_flight) >= 2 * workers:
                in_flight.pop(0).result()
        for fut in in_flight:
            fut.result()


def parallel_pwrite(
    pool: HandlePool,
    writes: Iterable[tuple[int, bytes | bytearray | memoryview]],
    workers: int = 4,
) -> None:
    """Write ``(offset, data)`` pairs on ``workers`` threads, then flush every connection."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        in_flight: list[Any] = []
        for offset, data in writes:
            in_flight.append(ex.submit(pool.pwrite, data, offset))
            if len(in_flight) >= 2 * workers:
                in_flight.pop(0).result()
        for fut in in_flight:
            fut.result()
    pool.flush()
