"""The agent's replication engine: turns a disk view into a new fixed index, sending only what differs.

For each disk the engine reads a set of extents from the view, cuts them into 64 KiB chunks
aligned to disk offsets, hashes each chunk (keyed BLAKE3), and compares the id with the entry of
the base index (the previous recovery point, or the checkpoint of an interrupted initial
replication). Only chunks whose id differs are offered to the process server, and of those only
the ones the datastore lacks are encoded (zstd + AES-256-GCM) and sent.

Which extents are read:

========================  ==================================================================
mode                      extents read
========================  ==================================================================
``dirty-bitmap``          the extents the source says changed since the base point
``initial``               every allocated extent (no base)
``hash-resync``           every allocated extent, compared with the base (tracking lost, or a
                          source without change tracking such as raw files)
========================  ==================================================================

A resumed initial replication passes ``resume_offset``: below it the base is the checkpointed
index and only changed extents (or, without tracking, a hash comparison) are processed; above it
everything allocated is read.

Work is a pipeline over one thread pool: up to ``MAX_IN_FLIGHT_BLOCKS`` blocks (and at most
``MAX_IN_FLIGHT_BYTES`` of data) are read at once, so that a latency-bound source (NBD over a
socket, a disk queue) has many requests outstanding; of those, at most ``threads`` are hashed,
compared, encoded and stored at a time (BLAKE3, zstd and AES-GCM release the GIL, so these use
the cores). The base index pages a block needs are read by the same task, in parallel too.
Results are consumed in disk order, so that a checkpoint at offset ``o`` covers exactly
``[0, o)``; the chunk store is flushed before a checkpoint is handed out, so a checkpoint never
refers to chunks or pages that a crash could take away (as for a manifest).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from siterecovery.allocator import tune_for_streaming
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ID_SIZE, ZERO_ID, ChunkCodec, is_zero_at
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexReader, IndexRef, IndexWriter
from siterecovery.dataplane.process_server import ProcessServer
from siterecovery.ports.source import DiskView, Extent, coalesce, split

READ_BLOCK = 4 * 1024 * 1024  # bytes per read request (64 chunks), and per batch
BATCH_EXTENTS = 16  # small extents (scattered dirty blocks) read and processed as one task
MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024  # read data held at once per disk (bounds memory)
MAX_IN_FLIGHT_BATCHES = 16  # batches being read at once: keeps a latency-bound source busy
# Batches processed at once: two more than the cores, so that a core whose thread waits for the
# GIL or a lock has another ready (measured on 2 cores: 4 threads 2.46 s, 3 threads 2.55 s, 2
# threads 2.79 s for scenario 1's initial replication, medians of 5).
DEFAULT_THREADS = (os.cpu_count() or 1) + 2


@dataclass
class DiskStats:
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_stored: int = 0
    chunks_read: int = 0
    chunks_changed: int = 0
    chunks_sent: int = 0
    zero_chunks: int = 0

    def add(self, other: DiskStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class DiskResult:
    ref: IndexRef
    mode: str
    stats: DiskStats = field(default_factory=DiskStats)


ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
CheckpointFn = Callable[[IndexRef, int], None]  # (checkpointed index, offset it covers up to)


def align_extents(extents: list[Extent], size: int) -> list[Extent]:
    """Widen extents to chunk boundaries, clip them to the disk, sort and merge them."""
    return coalesce(extents, CHUNK_SIZE, size)


def clip_extents(extents: list[Extent], lo: int, hi: int) -> list[Extent]:
    out = []
    for ext in extents:
        s, e = max(ext.offset, lo), min(ext.end, hi)
        if e > s:
            out.append(Extent(s, e - s))
    return out


class _Claims:
    """Chunk ids this agent is sending or sent recently.

    Blocks are processed in parallel, so two blocks holding the same chunk could both learn from
    the process server that it is missing and both send it. A block claims ids before it asks;
    ids claimed by another block are that block's to send. Bounded: an id that falls out only
    costs a redundant send, which the store deduplicates anyway.
    """

    def __init__(self, limit: int = 1 << 18) -> None:
        self._ids: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def claim(self, ids: list[bytes]) -> list[bytes]:
        with self._lock:
            mine = [i for i in ids if i not in self._ids]
            for i in mine:
                self._ids[i] = None
            while len(self._ids) > self._limit:
                self._ids.popitem(last=False)
            return mine


def batches(extents: Iterable[Extent]) -> Iterator[list[Extent]]:
    """Cut ``extents`` into read requests of at most ``READ_BLOCK`` bytes and group consecutive
    ones into batches of at most ``READ_BLOCK`` bytes and ``BATCH_EXTENTS`` requests, in order.

    One task per batch: a change set of thousands of scattered 64 KiB blocks costs tens of
    tasks, not thousands (each task costs thread hand-offs that a small block does not repay)."""
    batch: list[Extent] = []
    size = 0
    for piece in split(extents, READ_BLOCK):
        if batch and (size + piece.length > READ_BLOCK or len(batch) >= BATCH_EXTENTS):
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += piece.length
    if batch:
        yield batch


def _hole_clears(reader: IndexReader, allocated: list[Extent], scan_from: int) -> Iterator[int]:
    """Chunk numbers at or after ``scan_from`` that are not zero in ``reader``'s index but lie
    outside every extent of ``allocated`` (sorted, merged), in order."""
    covered = iter(allocated)
    current = next(covered, None)
    for chunk_no, _cid in reader.nonzero_entries():
        off = chunk_no * CHUNK_SIZE
        if off < scan_from:
            continue
        while current is not None and current.end <= off:
            current = next(covered, None)
        if current is None or off < current.offset:
            yield chunk_no


class _Buffers:
    """Page-aligned read buffers of ``READ_BLOCK`` bytes, reused across batches: a fresh 4 MiB
    buffer per read costs a page fault per 4 KiB, and ``O_DIRECT`` needs aligned memory. At most
    ``limit`` exist; ``take`` waits for one to come back beyond that."""

    def __init__(self, limit: int) -> None:
        self._free: list[mmap.mmap] = []
        self._count = 0
        self._limit = limit
        self._cv = threading.Condition()

    def take(self) -> mmap.mmap:
        with self._cv:
            while not self._free and self._count >= self._limit:
                self._cv.wait()
            if self._free:
                return self._free.pop()
            self._count += 1
        return mmap.mmap(-1, READ_BLOCK)

    def give(self, buf: mmap.mmap) -> None:
        with self._cv:
            self._free.append(buf)
            self._cv.notify()


class Agent:
    """Replicates disk views to a process server. One instance may serve several disks at once,
    for one replication cycle: the ids it claimed are never asked for again, so the next cycle
    (which may follow a garbage collection) takes a new instance."""

    def __init__(self, codec: ChunkCodec, server: ProcessServer, threads: int = DEFAULT_THREADS) -> None:
        tune_for_streaming()
        self.codec = codec
        self.server = server
        self.threads = threads
        self._claims = _Claims()
        # Every batch in flight holds one buffer until it is processed.
        self._buffers = _Buffers(MAX_IN_FLIGHT_BATCHES + threads)

    def _process_batch(
        self,
        view: DiskView,
        batch: list[Extent],
        base_ids: Callable[[Extent], list[bytes]],
        cpu: threading.Semaphore,
    ) -> tuple[list[Extent], list[list[bytes]], DiskStats]:
        read_into = getattr(view, "read_into", None)
        if read_into is None:
            datas: list[bytes | memoryview] = [view.read(block.offset, block.length) for block in batch]
            bases = [base_ids(block) for block in batch]
            with cpu:
                all_ids, stats, encoded = self._process_data(datas, bases)
        else:
            # A batch is at most READ_BLOCK bytes (see ``batches``): it fits one buffer. No view
            # of the buffer outlives _process_data (it encodes into new bytes), so it goes back then.
            buf = self._buffers.take()
            try:
                whole = memoryview(buf)
                pos = 0
                datas = []
                for block in batch:
                    part = whole[pos : pos + block.length]
                    read_into(block.offset, part)
                    datas.append(part)
                    pos += block.length
                bases = [base_ids(block) for block in batch]
                with cpu:
                    all_ids, stats, encoded = self._process_data(datas, bases)
            finally:
                self._buffers.give(buf)
        if encoded:
            # Storing waits on I/O (a pack's fdatasync when it fills up, or the network): it
            # holds no processing slot, so another batch uses the core meanwhile.
            stats.bytes_stored += self.server.put_many(encoded)
        return batch, all_ids, stats

    def _process_data(
        self, datas: Sequence[bytes | memoryview], bases: list[list[bytes]]
    ) -> tuple[list[list[bytes]], DiskStats, list[tuple[bytes, bytes]]]:
        """Ids of every chunk of ``datas``, and the encoded chunks the process server lacks."""
        stats = DiskStats()
        all_ids: list[list[bytes]] = []
        changed: dict[bytes, memoryview] = {}
        for data, base_ids in zip(datas, bases, strict=True):
            stats.bytes_read += len(data)
            mv = memoryview(data)
            ids: list[bytes] = []
            for i in range(0, len(data), CHUNK_SIZE):
                n = min(CHUNK_SIZE, len(data) - i)
                stats.chunks_read += 1
                if is_zero_at(data, i, n):
                    cid = ZERO_ID
                    stats.zero_chunks += 1
                else:
                    cid = self.codec.chunk_id(mv[i : i + n])
                ids.append(cid)
                if cid != base_ids[len(ids) - 1]:
                    stats.chunks_changed += 1
                    if cid != ZERO_ID:
                        changed[cid] = mv[i : i + n]
            all_ids.append(ids)
        mine = self._claims.claim(list(changed)) if changed else []
        encoded: list[tuple[bytes, bytes]] = []
        if mine:
            lacking = self.server.missing(mine)
            send = [cid for cid in mine if cid in lacking]  # in disk order
            if send:
                blobs = self.codec.encode_many(send, [changed[cid] for cid in send])
                encoded = list(zip(send, blobs, strict=True))
                stats.bytes_sent += sum(len(blob) for blob in blobs)
                stats.chunks_sent += len(send)
        return all_ids, stats, encoded

    def replicate_disk(
        self,
        datastore: Datastore,
        view: DiskView,
        base: IndexRef | None,
        *,
        changed: list[Extent] | None,
        resume_offset: int | None = None,
        progress: ProgressFn | None = None,
        checkpoint: CheckpointFn | None = None,
        checkpoint_every_s: float = 1.0,
        cancel: threading.Event | None = None,
    ) -> DiskResult:
        """Build the index of ``view`` relative to ``base``; see the module docstring for modes.

        ``changed`` is the source's change set relative to ``base`` (None when unknown).
        ``resume_offset`` marks ``base`` as the checkpoint of an interrupted initial
        replication valid for ``[0, resume_offset)``.
        """
        size = view.size
        allocated = align_extents(list(view.allocated_extents()), size)
        if base is None:
            mode = "initial"
            todo = allocated
        elif resume_offset is not None:
            mode = "initial"
            low = (
                clip_extents(align_extents(changed, size), 0, resume_offset)
                if changed is not None
                else clip_extents(allocated, 0, resume_offset)
            )
            todo = low + clip_extents(allocated, resume_offset, size)
        elif changed is not None:
            mode = "dirty-bitmap"
            todo = align_extents(changed, size)
        else:
            mode = "hash-resync"
            todo = allocated

        writer: IndexWriter = datastore.index_writer(size, base)
        base_reader = datastore.index_reader(base) if base is not None else None

        # A full scan (no usable change set) must also clear chunks the base had where the disk
        # now has a hole: they are outside every allocated extent, so nothing reads them. The
        # clears are applied as consumption passes them (a checkpoint at o includes those below
        # o), so the base pages they need are read while the pipeline runs, mostly from cache.
        holes: Iterator[int] = iter(())
        if base_reader is not None and (changed is None or resume_offset is not None):
            scan_from = 0 if changed is None else resume_offset or 0
            holes = _hole_clears(base_reader, allocated, scan_from)
        next_hole = next(holes, None)

        def clear_holes(below: int) -> None:
            nonlocal next_hole
            while next_hole is not None and next_hole < below:
                writer.set(next_hole, ZERO_ID)
                next_hole = next(holes, None)

        total = sum(e.length for e in todo)
        stats = DiskStats()
        done = 0
        last_ckpt = time.monotonic()
        pending: deque[tuple[int, Future[tuple[list[Extent], list[list[bytes]], DiskStats]]]] = deque()
        in_flight = 0

        def base_ids_for(block: Extent) -> list[bytes]:
            first = block.offset // CHUNK_SIZE
            n = -(-block.length // CHUNK_SIZE)
            if base_reader is None:
                return [ZERO_ID] * n
            # One page read per leaf the block touches (a leaf holds 256 ids).
            ids: list[bytes] = []
            chunk_no = first
            while chunk_no < first + n:
                leaf = chunk_no >> 8
                body = base_reader.page_body_at(0, leaf)
                stop = min(first + n, (leaf + 1) << 8)
                ids += [
                    body[(c & 0xFF) * ID_SIZE : ((c & 0xFF) + 1) * ID_SIZE] for c in range(chunk_no, stop)
                ]
                chunk_no = stop
            return ids

        def consume(fut: Future[tuple[list[Extent], list[list[bytes]], DiskStats]]) -> None:
            nonlocal done, last_ckpt
            batch, all_ids, bstats = fut.result()
            for block, ids in zip(batch, all_ids, strict=True):
                first = block.offset // CHUNK_SIZE
                clear_holes(first)
                writer.set_run(first, ids)
                done += block.length
            block = batch[-1]
            stats.add(bstats)
            if progress is not None:
                progress(done, total)
            if checkpoint is not None and time.monotonic() - last_ckpt >= checkpoint_every_s:
                ref = writer.checkpoint()
                # The checkpoint is stored by the caller and used after a crash: what it refers
                # to must be durable first, as for a manifest.
                datastore.chunks.flush()
                checkpoint(ref, max(block.end, resume_offset or 0))
                last_ckpt = time.monotonic()

        # Reads wait on the source and need no core; processing is limited to ``threads``.
        cpu = threading.Semaphore(self.threads)
        workers = self.threads + MAX_IN_FLIGHT_BATCHES
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent") as pool:
            try:
                for batch in batches(todo):
                    if cancel is not None and cancel.is_set():
                        raise InterruptedError("replication cancelled")
                    length = sum(block.length for block in batch)
                    while pending and (
                        len(pending) >= MAX_IN_FLIGHT_BATCHES or in_flight + length > MAX_IN_FLIGHT_BYTES
                    ):
                        done_len, fut = pending.popleft()
                        in_flight -= done_len
                        consume(fut)
                    fut = pool.submit(self._process_batch, view, batch, base_ids_for, cpu)
                    pending.append((length, fut))
                    in_flight += length
                while pending:
                    consume(pending.popleft()[1])
                clear_holes(writer.n)
            except BaseException:
                for _, fut in pending:
                    fut.cancel()
                raise
        ref = writer.commit()
        if progress is not None:
            progress(total, total)
        return DiskResult(ref=ref, mode=mode, stats=stats)
