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

Work is spread over a thread pool (reads, BLAKE3, zstd and AES-GCM release the GIL); results are
consumed in disk order so that a checkpoint at offset ``o`` covers exactly ``[0, o)``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ZERO_ID, ChunkCodec, is_zero
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef, IndexWriter
from siterecovery.dataplane.process_server import ProcessServer
from siterecovery.ports.source import DiskView, Extent, coalesce, split

READ_BLOCK = 4 * 1024 * 1024  # bytes per read request (64 chunks)
MAX_IN_FLIGHT = 8  # read blocks queued in the pool: bounds memory to ~32 MiB per disk


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


class Agent:
    """Replicates disk views to a process server. One instance may serve several disks at once."""

    def __init__(self, codec: ChunkCodec, server: ProcessServer, threads: int = 3) -> None:
        self.codec = codec
        self.server = server
        self.threads = threads
        self._claims = _Claims()

    def _process_block(
        self, view: DiskView, block: Extent, base_ids: list[bytes]
    ) -> tuple[Extent, list[bytes], DiskStats]:
        data = view.read(block.offset, block.length)
        stats = DiskStats(bytes_read=len(data))
        mv = memoryview(data)
        ids: list[bytes] = []
        changed: dict[bytes, memoryview] = {}
        for i in range(0, len(data), CHUNK_SIZE):
            piece = mv[i : i + CHUNK_SIZE]
            stats.chunks_read += 1
            if is_zero(piece):
                cid = ZERO_ID
                stats.zero_chunks += 1
            else:
                cid = self.codec.chunk_id(piece)
            ids.append(cid)
            if cid != base_ids[len(ids) - 1]:
                stats.chunks_changed += 1
                if cid != ZERO_ID:
                    changed[cid] = piece
        mine = self._claims.claim(list(changed)) if changed else []
        if mine:
            for cid in self.server.missing(mine):
                blob = self.codec.encode(cid, changed[cid])
                stats.bytes_stored += self.server.put(cid, blob)
                stats.bytes_sent += len(blob)
                stats.chunks_sent += 1
        return block, ids, stats

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
        # now has a hole: they are outside every allocated extent, so nothing reads them.
        if base_reader is not None and (changed is None or resume_offset is not None):
            scan_from = 0 if changed is None else resume_offset or 0
            covered = iter(allocated)
            current = next(covered, None)
            for chunk_no, _cid in base_reader.nonzero_entries():
                off = chunk_no * CHUNK_SIZE
                if off < scan_from:
                    continue
                while current is not None and current.end <= off:
                    current = next(covered, None)
                if current is None or off < current.offset:
                    writer.set(chunk_no, ZERO_ID)

        total = sum(e.length for e in todo)
        stats = DiskStats()
        done = 0
        last_ckpt = time.monotonic()
        pending: deque[Future[tuple[Extent, list[bytes], DiskStats]]] = deque()

        def base_ids_for(block: Extent) -> list[bytes]:
            first = block.offset // CHUNK_SIZE
            n = -(-block.length // CHUNK_SIZE)
            if base_reader is None:
                return [ZERO_ID] * n
            return [base_reader.get(first + i) for i in range(n)]

        def consume(fut: Future[tuple[Extent, list[bytes], DiskStats]]) -> None:
            nonlocal done, last_ckpt
            block, ids, bstats = fut.result()
            first = block.offset // CHUNK_SIZE
            writer.set_many((first + i, cid) for i, cid in enumerate(ids))
            stats.add(bstats)
            done += block.length
            if progress is not None:
                progress(done, total)
            if checkpoint is not None and time.monotonic() - last_ckpt >= checkpoint_every_s:
                checkpoint(writer.checkpoint(), max(block.end, resume_offset or 0))
                last_ckpt = time.monotonic()

        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="agent") as pool:
            try:
                for block in split(todo, READ_BLOCK):
                    if cancel is not None and cancel.is_set():
                        raise InterruptedError("replication cancelled")
                    pending.append(pool.submit(self._process_block, view, block, base_ids_for(block)))
                    if len(pending) >= MAX_IN_FLIGHT:
                        consume(pending.popleft())
                while pending:
                    consume(pending.popleft())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        ref = writer.commit()
        if progress is not None:
            progress(total, total)
        return DiskResult(ref=ref, mode=mode, stats=stats)
