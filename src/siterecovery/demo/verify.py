"""Proving a recovered point: is it the base plus a prefix of the workload's write sequence?

The demo workload (:mod:`siterecovery.demo.workload`) writes to a machine's disks ONE write at
a time, numbering the writes with a single sequence ``seq`` across all disks, and logs each
completed write. A write is ``io_size`` bytes (from the log's header; 4096 for a log that
predates the field) at an io_size-aligned *slot* of a disk's workload region, made of
``io_size // 4096`` self-describing 4 KiB blocks that all carry its seq, each with its own
offset. Slots never overlap, so every slot holds the whole of its latest write or is still zero.
A recovered copy of the disks is correct and crash-consistent across the machine iff, for
``M`` = the highest valid seq found on any of its disks:

* every data-region chunk hashes to the base sidecar's hash (:mod:`siterecovery.demo.fabric`);
* every slot the log wrote with seq <= M holds, in each of its blocks, the *latest* such write;
* every other workload-region location is still zero.

Such a state is exactly what a crash after write M would leave, so it proves the point is a
prefix of the global write order (a disk rolled back or ahead of the others breaks it).

Torn writes: a slot whose blocks do not all hold the same thing (some blocks of one seq, the
others zeros or another seq) is a problem, even for the last write: the workload sends each
write as ONE request and a point-in-time view (a snapshot, a crash) never splits a request.

Unlogged tail: a writer killed before flushing its log may have completed writes L+1..M that
the log (ending at L) does not list. Valid blocks (good checksum, right disk, offset, tag and
payload) with a seq > L are accepted where they lie if they fill exactly one slot of one disk,
all of its blocks (one write), and no other block carries the same seq (two writes never share
a seq); such writes are counted in ``VerifyResult.unlogged``.

Reading: ``read(disk, offset, length)`` is called with large, 4 KiB-aligned requests, from one
thread per disk (never concurrently for the same disk). If the reader also has
``allocated(disk, offset, length) -> [(offset, length), ...]`` (extents that may hold non-zero
data; the readers here have it), parts known to be zero are not read at all, which keeps the
check of mostly empty multi-GiB workload regions fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siterecovery.demo.fabric import BaseInfo, chunk_hash, serve_images
from siterecovery.demo.workload import (
    BLOCK_MAGIC,
    BLOCK_SIZE,
    PAYLOAD_OFFSET,
    BlockError,
    BlockHeader,
    decode_block,
    io_slots,
    payload,
    read_log,
)
from siterecovery.errors import InvalidInput, NotFound, SourceError

READ_SIZE = 4 * 1024 * 1024
_ZERO_READ = bytes(READ_SIZE)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_NBD_MAX_REQUEST = 32 * 1024 * 1024

ReadFn = Callable[[str, int, int], bytes]
AllocatedFn = Callable[[str, int, int], list[tuple[int, int]]]


@dataclass(frozen=True)
class DiskSpec:
    """A disk as the workload knows it: its index in the block headers and its workload region."""

    index: int
    region: tuple[int, int]  # [start, end) of the workload region


def disk_specs(regions: dict[str, tuple[int, int]]) -> dict[str, DiskSpec]:
    """DiskSpecs for ``{disk: (start, end)}`` in the same order the Workload was given."""
    return {name: DiskSpec(i, (int(r[0]), int(r[1]))) for i, (name, r) in enumerate(regions.items())}


def disk_specs_from_log(log_path: Path) -> dict[str, DiskSpec]:
    """The DiskSpecs recorded in a workload log's header."""
    header, _ = read_log(log_path)
    return {name: DiskSpec(i, (start, end)) for i, (name, start, end) in enumerate(header.disks)}


@dataclass
class VerifyResult:
    ok: bool
    max_seq: int  # M: highest valid seq found on any disk (0: no workload write present)
    writes_checked: int  # written slots whose expected write (seq <= M) was found whole
    bytes_checked: int  # bytes read from the disks
    problems: list[str] = field(default_factory=list)  # first max_problems, human-readable
    detail: str = ""
    last_logged_seq: int = 0  # L: the log's last record
    unlogged: int = 0  # whole writes with seq > L found (written after the log's last flush)
    problem_count: int = 0  # all problems, including those not kept in ``problems``
    max_seq_time_ns: int = 0  # wall-clock time of write M (epoch ns): the point's time


class _Problems:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.items) < self.limit:
            self.items.append(text)


@dataclass
class _DiskScan:
    found: dict[int, BlockHeader] = field(default_factory=dict)  # valid blocks by offset
    bad: set[int] = field(default_factory=set)  # offsets of non-zero blocks that are not valid
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0
    chunks_checked: int = 0


def verify_machine(
    read: ReadFn,
    disks: dict[str, DiskSpec],
    log_path: Path,
    base: dict[str, BaseInfo],
    *,
    allocated: AllocatedFn | None = None,
    max_problems: int = 1000,
) -> VerifyResult:
    """Check that ``read``'s disks are base + the log's writes 1..M (see the module docstring).

    ``disks`` and ``base`` are keyed by disk name; ``allocated`` defaults to ``read.allocated``
    when ``read`` is one of this module's readers.
    """
    if allocated is None:
        allocated = getattr(read, "allocated", None)
    missing = sorted(set(disks) - set(base))
    if missing:
        raise InvalidInput(
            f"no BaseInfo for disks {missing}; pass base={{disk: load_base(image)}} for every disk."
        )
    header, records = read_log(Path(log_path))
    problems = _Problems(max_problems)

    logged_disks = [(n, s, e) for n, s, e in header.disks]
    given = sorted(((spec.index, name, *spec.region) for name, spec in disks.items()))
    indexes_ok = [g[0] for g in given] == list(range(len(given)))
    if [(n, s, e) for _i, n, s, e in given] != logged_disks or not indexes_ok:
        problems.add(f"the log was written for disks {logged_disks}, but the disks given are {given}")
    name_of = {spec.index: name for name, spec in disks.items()}

    # The log's records must be 1, 2, 3, ...; anything else means the log itself is damaged,
    # and only its intact prefix can be trusted.
    for i, rec in enumerate(records):
        if rec.seq != i + 1:
            problems.add(
                f"workload log damaged at record {i}: seq {rec.seq}, expected {i + 1}; using {i} records"
            )
            records = records[:i]
            break
    last_logged = len(records)

    size_of = getattr(read, "size", None)

    def scan(name: str) -> _DiskScan:
        return _scan_disk(
            read,
            allocated,
            size_of,
            name,
            disks[name],
            base[name],
            header.seed,
            header.machine_tag,
            header.io_size,
        )

    with ThreadPoolExecutor(max_workers=min(len(disks), os.cpu_count() or 1, 4) or 1) as pool:
        scans = dict(zip(disks, pool.map(scan, disks), strict=True))

    max_seq = 0
    max_seq_time = 0
    bytes_checked = 0
    for name in disks:
        s = scans[name]
        bytes_checked += s.bytes_read
        for text in s.problems:
            problems.add(text)
        for h in s.found.values():
            if h.seq > max_seq:
                max_seq, max_seq_time = h.seq, h.time_ns

    io = header.io_size
    per_write = io // BLOCK_SIZE

    # Expected state: the latest logged write with seq <= M in each slot.
    expected: dict[tuple[int, int], int] = {}
    for rec in records[:max_seq]:
        spec_name = name_of.get(rec.disk)
        if spec_name is None:
            problems.add(f"workload log record seq {rec.seq} names disk index {rec.disk}, which is not given")
            continue
        start, end = disks[spec_name].region
        if rec.offset % io or rec.offset < start or rec.offset + io > end:
            problems.add(
                f"workload log record seq {rec.seq} puts a {io}-byte write at {spec_name} offset "
                f"{rec.offset:#x}, which is not an {io}-aligned slot of the region [{start:#x}, {end:#x})"
            )
            continue
        expected[(rec.disk, rec.offset)] = rec.seq

    # Every slot that must hold a write or holds any valid block, with what each block holds.
    slots: set[tuple[int, int]] = set(expected)
    for name, spec in disks.items():
        start, end = spec.region
        first, count = io_slots(start, end, io)
        for offset, block in scans[name].found.items():
            slot = offset - offset % io
            if slot < first or slot >= first + count * io:
                problems.add(
                    f"{name} offset {offset:#x}: workload block seq {block.seq} lies outside every "
                    f"{io}-aligned {io}-byte slot of the region, where no write goes"
                )
            else:
                slots.add((spec.index, slot))

    writes_checked = 0
    unlogged_seen: dict[int, tuple[str, int]] = {}
    for disk_index, slot in sorted(slots):
        name = name_of[disk_index]
        scan_of = scans[name]
        want = expected.get((disk_index, slot))
        offsets = range(slot, slot + io, BLOCK_SIZE)
        if any(o in scan_of.bad for o in offsets):
            continue  # a corrupt block: reported by the scan already
        held = [b.seq if (b := scan_of.found.get(o)) is not None else None for o in offsets]
        if len(set(held)) > 1:
            problems.add(
                f"{name} offset {slot:#x}: torn write: the {io}-byte slot holds {_runs(held)}"
                f"{f' (expected seq {want})' if want is not None else ''}; a point-in-time copy "
                "holds all blocks of a write or none"
            )
            continue
        got = held[0]
        if got is None:
            if want is not None:
                problems.add(f"{name} offset {slot:#x}: expected seq {want}, found zeros (write missing)")
        elif got == want:
            writes_checked += 1
        elif got > last_logged:
            # An unlogged write (whole, in one slot) that may have overwritten a logged one.
            other = unlogged_seen.get(got)
            if other is not None:
                problems.add(
                    f"{name} offset {slot:#x}: seq {got} also found at {other[0]} "
                    f"offset {other[1]:#x}; a write happens once"
                )
            unlogged_seen[got] = (name, slot)
        elif want is None:
            rec = records[got - 1]
            problems.add(
                f"{name} offset {slot:#x}: expected zeros (no logged write <= seq {max_seq} here), "
                f"found seq {got}, which the log puts at {name_of.get(rec.disk, rec.disk)} "
                f"offset {rec.offset:#x}"
            )
        else:
            problems.add(
                f"{name} offset {slot:#x}: expected seq {want}, found seq {got}"
                f"{' (older: rolled back)' if got < want else ''}"
            )

    chunks = sum(s.chunks_checked for s in scans.values())
    ok = problems.count == 0
    if ok:
        detail = (
            f"ok: {len(disks)} disk(s) = base + writes 1..{max_seq} (log ends at {last_logged}"
            f"{f', {len(unlogged_seen)} unlogged' if unlogged_seen else ''}); {writes_checked} written "
            f"locations{f' of {io // 1024} KiB' if per_write > 1 else ''} and {chunks} base chunks "
            f"checked, {bytes_checked / 2**20:.1f} MiB read"
        )
    else:
        detail = (
            f"NOT consistent: {problems.count} problem(s) at max seq {max_seq}; first: {problems.items[0]}"
        )
    return VerifyResult(
        ok=ok,
        max_seq=max_seq,
        writes_checked=writes_checked,
        bytes_checked=bytes_checked,
        problems=problems.items,
        detail=detail,
        last_logged_seq=last_logged,
        unlogged=len(unlogged_seen),
        problem_count=problems.count,
        max_seq_time_ns=max_seq_time,
    )


def _scan_disk(
    read: ReadFn,
    allocated: AllocatedFn | None,
    size_of: Callable[[str], int] | None,
    name: str,
    spec: DiskSpec,
    base: BaseInfo,
    seed: int,
    tag: str,
    io_size: int,
) -> _DiskScan:
    out = _DiskScan()
    if size_of is not None:
        size = size_of(name)
        if size != base.size:
            out.problems.append(f"{name}: size is {size} bytes, the base image's is {base.size}")

    # Data region: every chunk must hash as recorded when the image was made.
    zero_hash = chunk_hash(bytes(base.chunk_size))
    cs = base.chunk_size
    for off in range(0, base.data_bytes, READ_SIZE):
        n = min(READ_SIZE, base.data_bytes - off)
        first = off // cs
        if allocated is not None and not allocated(name, off, n):
            hashes = [zero_hash] * ((n + cs - 1) // cs)
        else:
            view = memoryview(read(name, off, n))
            out.bytes_read += n
            hashes = [chunk_hash(view[i : i + cs]) for i in range(0, n, cs)]
        for i, h in enumerate(hashes):
            out.chunks_checked += 1
            if h != base.chunks[first + i]:
                out.problems.append(
                    f"{name} offset {(first + i) * cs:#x}: data region chunk differs from the base "
                    f"(BLAKE3 {h}, base {base.chunks[first + i]})"
                )

    # Workload region: collect every valid block; anything else non-zero is a problem.
    start, end = spec.region
    extents = allocated(name, start, end - start) if allocated is not None else [(start, end - start)]
    for ext_off, ext_len in _align(extents, start, end):
        for off in range(ext_off, ext_off + ext_len, READ_SIZE):
            n = min(READ_SIZE, ext_off + ext_len - off)
            buf = read(name, off, n)
            out.bytes_read += n
            if buf == _ZERO_READ[:n]:
                continue
            for i in range(0, n, BLOCK_SIZE):
                block = buf[i : i + BLOCK_SIZE]
                if block == _ZERO_BLOCK:
                    continue
                at = off + i
                if block[:8] != BLOCK_MAGIC:
                    out.bad.add(at)
                    out.problems.append(
                        f"{name} offset {at:#x}: neither zeros nor a workload block (garbage)"
                    )
                    continue
                try:
                    head = decode_block(block)
                except BlockError as err:
                    out.bad.add(at)
                    out.problems.append(f"{name} offset {at:#x}: corrupt workload block: {err}")
                    continue
                wrong = _misplaced(head, at, spec.index, tag)
                part = (at % io_size) // BLOCK_SIZE  # slots are io_size-aligned disk offsets
                if wrong is None and block[PAYLOAD_OFFSET:] != payload(seed, head.seq, part):
                    wrong = "payload is not the workload's for this seed (block from another run?)"
                if wrong is not None:
                    out.bad.add(at)
                    out.problems.append(f"{name} offset {at:#x}: workload block seq {head.seq} {wrong}")
                    continue
                out.found[at] = head
    return out


def _runs(held: list[int | None]) -> str:
    """``[5, 5, None, 9]`` -> ``"seq 5 in blocks 0-1, zeros in block 2, seq 9 in block 3"``."""
    parts: list[str] = []
    i = 0
    while i < len(held):
        j = i
        while j + 1 < len(held) and held[j + 1] == held[i]:
            j += 1
        what = "zeros" if held[i] is None else f"seq {held[i]}"
        parts.append(f"{what} in block{f's {i}-{j}' if j > i else f' {i}'}")
        i = j + 1
    return ", ".join(parts)


def _misplaced(h: BlockHeader, at: int, index: int, tag: str) -> str | None:
    if h.offset != at:
        return f"belongs at offset {h.offset:#x} (misplaced)"
    if h.disk != index:
        return f"belongs to disk index {h.disk}, not {index} (misplaced)"
    if h.tag != tag:
        return f"was written by machine {h.tag!r}, not {tag!r}"
    return None


def _align(extents: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Clip extents to [start, end), widen to 4 KiB blocks, merge overlaps."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(extents):
        a = max(start, off - (off - start) % BLOCK_SIZE)
        b = min(end, off + length)
        b += -(b - start) % BLOCK_SIZE
        b = min(b, end)
        if b <= a:
            continue
        if out and a <= out[-1][0] + out[-1][1]:
            prev = out[-1]
            out[-1] = (prev[0], max(prev[0] + prev[1], b) - prev[0])
        else:
            out.append((a, b - a))
    return out


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


class RawReader:
    """Reads raw image files or block devices; holes (SEEK_HOLE) count as known zeros."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self._fds: dict[str, int] = {}
        try:
            for name, path in paths.items():
                self._fds[name] = os.open(path, os.O_RDONLY)
        except OSError as err:
            self.close()
            raise SourceError(f"cannot open disk image {err.filename}: {err.strerror}.") from err

    def _fd(self, disk: str) -> int:
        try:
            return self._fds[disk]
        except KeyError:
            raise NotFound(kind="disk", name=disk, hint=f" Known disks: {sorted(self._fds)}.") from None

    def read(self, disk: str, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(disk), length, offset)
        if len(data) < length:
            data += bytes(length - len(data))  # past the end reads as zeros, like a short disk
        return data

    __call__ = read

    def size(self, disk: str) -> int:
        return os.lseek(self._fd(disk), 0, os.SEEK_END)

    def allocated(self, disk: str, offset: int, length: int) -> list[tuple[int, int]]:
        fd = self._fd(disk)
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break  # no data after pos
                return [(offset, length)]  # no hole support here: everything may hold data
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, min(hole, end) - data))
            pos = hole
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class NbdReader:
    """Reads NBD exports (one per disk) on a unix socket with libnbd; block status skips zeros."""

    def __init__(self, socket_path: Path, exports: list[str]) -> None:
        import nbd  # Debian's python3-libnbd

        self._nbd: Any = nbd
        self._handles: dict[str, Any] = {}
        try:
            for name in exports:
                h = nbd.NBD()
                h.add_meta_context("base:allocation")
                h.set_export_name(name)
                h.connect_unix(str(socket_path))
                self._handles[name] = h
        except nbd.Error as err:
            self.close()
            raise SourceError(f"cannot open NBD export {name!r} on {socket_path}: {err}.") from err

    def _h(self, disk: str) -> Any:
        try:
            return self._handles[disk]
        except KeyError:
            raise NotFound(kind="disk", name=disk, hint=f" Known disks: {sorted(self._handles)}.") from None

    def read(self, disk: str, offset: int, length: int) -> bytes:
        h = self._h(disk)
        if length <= _NBD_MAX_REQUEST:
            return bytes(h.pread(length, offset))
        return b"".join(
            bytes(h.pread(min(_NBD_MAX_REQUEST, offset + length - o), o))
            for o in range(offset, offset + length, _NBD_MAX_REQUEST)
        )

    __call__ = read

    def size(self, disk: str) -> int:
        return int(self._h(disk).get_size())

    def allocated(self, disk: str, offset: int, length: int) -> list[tuple[int, int]]:
        h = self._h(disk)
        if not h.can_meta_context("base:allocation"):
            return [(offset, length)]
        end = min(offset + length, int(h.get_size()))
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            entries: list[int] = []

            def extent(ctx: str, _off: int, e: list[int], _err: Any, entries: list[int] = entries) -> int:
                if ctx == "base:allocation":
                    entries.extend(e)
                return 0

            h.block_status(min(end - pos, 1 << 30), pos, extent)
            if not entries:
                return out + [(pos, end - pos)]
            for i in range(0, len(entries), 2):
                n, flags = entries[i], entries[i + 1]
                n = min(n, end - pos)
                if not flags & 2:  # NBD_STATE_ZERO clear: may hold data
                    if out and out[-1][0] + out[-1][1] == pos:
                        out[-1] = (out[-1][0], out[-1][1] + n)
                    else:
                        out.append((pos, n))
                pos += n
                if pos >= end:
                    break
        return out

    def close(self) -> None:
        for h in self._handles.values():
            with contextlib.suppress(Exception):
                h.shutdown()
        self._handles.clear()


@contextlib.contextmanager
def raw_reader(paths: dict[str, Path]) -> Iterator[RawReader]:
    """A reader of raw files / block devices ``{disk: path}``; closes them on exit."""
    r = RawReader(paths)
    try:
        yield r
    finally:
        r.close()


@contextlib.contextmanager
def nbd_reader(socket_path: Path, exports: list[str]) -> Iterator[NbdReader]:
    """A reader of NBD exports already being served (e.g. a machine's live disks)."""
    r = NbdReader(socket_path, exports)
    try:
        yield r
    finally:
        r.close()


@contextlib.contextmanager
def qcow2_reader(paths: dict[str, Path], *, force_share: bool = False) -> Iterator[NbdReader]:
    """Serve qcow2 images ``{disk: path}`` read-only with qemu-storage-daemon and read them.

    The daemon is stopped on exit. ``force_share`` reads images another process has open for
    writing (they may change while being read).
    """
    with (
        serve_images(paths, writable=False, fmt="qcow2", force_share=force_share) as srv,
        nbd_reader(srv.socket, list(paths)) as r,
    ):
        yield r
