"""The fixed index of one disk in one recovery point: a Merkle tree of pages shared between points.

A disk of ``size`` bytes is cut into ``n = ceil(size / chunk_size)`` chunks; entry ``i`` is the
32-byte id of chunk ``i`` (``ZERO_ID`` if the chunk is all zeros). The entries are stored as a
tree of pages with a fan-out of 256:

* a leaf page (level 0) holds entries ``256*p .. 256*p+255``;
* an interior page at level ``L`` holds the ids of the 256 pages at level ``L-1`` below it;
* the tree has ``depth`` levels, the smallest ``d >= 1`` with ``256**d >= n``; the root is the
  one page at level ``depth-1``, and :class:`IndexRef` names it by its id.

Page ``(L, p)`` covers the entries ``p * 256**(L+1)`` up to ``(p+1) * 256**(L+1) - 1``: these
coordinates do not depend on the depth, which is how a disk that grows or shrinks keeps sharing
its pages with older points.

Page format (8200 bytes, then stored as a chunk through the codec: compressed, encrypted, named
by the keyed hash of these bytes, so garbage collection and S3 packing treat pages like data)::

    offset  size  field
    0       4     magic b"SRIX"
    4       1     format version, 1
    5       1     level (0 = leaf)
    6       2     reserved, 0
    8       8192  256 ids of 32 bytes

Invariants, which make the tree canonical (the same entries always give the same root id, no
matter the history of writes):

* a page whose 256 ids are all ``ZERO_ID`` is not stored; its parent records ``ZERO_ID``. A
  never-written disk of any size has root ``ZERO_ID`` and costs nothing;
* entries at or beyond ``n`` are ``ZERO_ID``, and so are children that start at or beyond ``n``.

A new point's index is written by :class:`IndexWriter` from the previous point's
:class:`IndexRef`: only pages on the path from a changed entry to the root are rebuilt (for 10
changed chunks of a 100 GiB disk: at most 10 leaves, 10 level-1 pages and 1 root); every other
subtree is shared by id. Pages that already exist are not stored again (the chunk store's insert
returns False).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from siterecovery.dataplane.chunk_codec import CHUNK_SIZE, ID_SIZE, ZERO_ID, ChunkCodec
from siterecovery.errors import ChunkCorrupt, InvalidInput, OperationNotAllowed, OutOfRange
from siterecovery.ports.chunk_store import ChunkStore

FANOUT = 256
PAGE_MAGIC = b"SRIX"
PAGE_VERSION = 1
PAGE_HEADER_SIZE = 8
PAGE_BODY_SIZE = FANOUT * ID_SIZE
PAGE_SIZE = PAGE_HEADER_SIZE + PAGE_BODY_SIZE
_ZERO_BODY = bytes(PAGE_BODY_SIZE)


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Number of chunks of a disk of ``size`` bytes (the last one may be partial)."""
    return -(-size // chunk_size)


def tree_depth(n: int) -> int:
    """Levels of the tree for ``n`` entries: the smallest ``d >= 1`` with ``256**d >= n``."""
    depth, cap = 1, FANOUT
    while cap < n:
        cap *= FANOUT
        depth += 1
    return depth


@dataclass(frozen=True)
class IndexRef:
    """A disk's index in one recovery point: its size in bytes and the id of its root page."""

    size: int
    root: bytes
    chunk_size: int = CHUNK_SIZE

    def __post_init__(self) -> None:
        if self.size < 0:
            raise OutOfRange(field="disk size", value=self.size, allowed="0 or more bytes")
        if len(self.root) != ID_SIZE:
            raise InvalidInput(f"an index root is a {ID_SIZE}-byte id, got {len(self.root)} bytes.")
        if self.chunk_size <= 0 or self.chunk_size % 512:
            raise OutOfRange(field="chunk size", value=self.chunk_size, allowed="a positive multiple of 512")

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    @property
    def depth(self) -> int:
        return tree_depth(self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root.hex(), "chunk_size": self.chunk_size}

    @classmethod
    def from_json(cls, obj: Any) -> IndexRef:
        try:
            return cls(int(obj["size"]), bytes.fromhex(obj["root"]), int(obj.get("chunk_size", CHUNK_SIZE)))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidInput(
                f"not an index reference: {json.dumps(obj)[:200]}; expected "
                '{"size": int, "root": "<64 hex>", "chunk_size": int}.'
            ) from err

    @classmethod
    def empty(cls, size: int, chunk_size: int = CHUNK_SIZE) -> IndexRef:
        """The index of a disk of ``size`` bytes that is all zeros."""
        return cls(size, ZERO_ID, chunk_size)


class PageCache:
    """A thread-safe LRU of decoded page bodies, keyed by page id (content addressed, so safe
    to share between readers, disks and points)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._pages: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()

    def get(self, page_id: bytes) -> tuple[int, bytes] | None:
        """``(level, body)`` of a cached page, or None."""
        with self._lock:
            entry = self._pages.get(page_id)
            if entry is not None:
                self._pages.move_to_end(page_id)
            return entry

    def put(self, page_id: bytes, level: int, body: bytes) -> None:
        with self._lock:
            self._pages[page_id] = (level, body)
            self._pages.move_to_end(page_id)
            while len(self._pages) > self.capacity:
                self._pages.popitem(last=False)


def encode_page(level: int, body: bytes | bytearray) -> bytes:
    """The plaintext of a page (header + 256 ids)."""
    return PAGE_MAGIC + bytes((PAGE_VERSION, level, 0, 0)) + bytes(body)


def decode_page(page_id: bytes, level: int, plaintext: bytes) -> bytes:
    """Check a page's header and level; return its 8192-byte body."""
    if len(plaintext) != PAGE_SIZE or plaintext[:4] != PAGE_MAGIC:
        raise ChunkCorrupt(chunk_id=page_id.hex(), reason="not an index page")
    if plaintext[4] != PAGE_VERSION:
        raise ChunkCorrupt(
            chunk_id=page_id.hex(),
            reason=f"index page format {plaintext[4]}, this version reads {PAGE_VERSION}",
        )
    if plaintext[5] != level:
        raise ChunkCorrupt(
            chunk_id=page_id.hex(), reason=f"index page of level {plaintext[5]} where level {level} belongs"
        )
    return plaintext[PAGE_HEADER_SIZE:]


def _slot(body: bytes | bytearray, i: int) -> bytes:
    return bytes(body[i * ID_SIZE : (i + 1) * ID_SIZE])


class IndexReader:
    """Reads one disk's index. Pages are read once and cached (shared :class:`PageCache`)."""

    def __init__(
        self, store: ChunkStore, codec: ChunkCodec, ref: IndexRef, cache: PageCache | None = None
    ) -> None:
        self.store = store
        self.codec = codec
        self.ref = ref
        self.cache = cache if cache is not None else PageCache()
        self.n = ref.chunks
        self.depth = ref.depth

    def read_page(self, page_id: bytes, level: int) -> bytes:
        """The 8192-byte body (256 ids) of page ``page_id``; all zeros for ``ZERO_ID``.

        Raises ``ChunkMissing`` or ``ChunkCorrupt`` if the page cannot be read.
        """
        if page_id == ZERO_ID:
            return _ZERO_BODY
        entry = self.cache.get(page_id)
        if entry is None:
            body = decode_page(page_id, level, self.codec.decode(page_id, self.store.get(page_id)))
            self.cache.put(page_id, level, body)
            return body
        if entry[0] != level:
            raise ChunkCorrupt(
                chunk_id=page_id.hex(), reason=f"index page of level {entry[0]} where level {level} belongs"
            )
        return entry[1]

    def page_body_at(self, level: int, p: int) -> bytes:
        """The body of page ``(level, p)`` (all zeros where the tree has no page)."""
        if level >= self.depth:
            # Above the root: only the leftmost page exists, synthetically, with the root at slot 0.
            if p != 0:
                return _ZERO_BODY
            child = self.ref.root if level == self.depth else ZERO_ID
            return child + bytes(PAGE_BODY_SIZE - ID_SIZE) if child != ZERO_ID else _ZERO_BODY
        top = self.depth - 1
        if p >> (8 * (top - level)) != 0:
            return _ZERO_BODY
        page_id = self.ref.root
        for lvl in range(top, level, -1):
            if page_id == ZERO_ID:
                return _ZERO_BODY
            body = self.read_page(page_id, lvl)
            i = (p >> (8 * (lvl - 1 - level))) & 0xFF
            page_id = _slot(body, i)
        return self.read_page(page_id, level)

    def get(self, chunk_no: int) -> bytes:
        """The id of chunk ``chunk_no`` (``ZERO_ID`` for an all-zero chunk)."""
        if not 0 <= chunk_no < self.n:
            raise OutOfRange(field="chunk number", value=chunk_no, allowed=f"0..{self.n - 1}")
        return _slot(self.page_body_at(0, chunk_no >> 8), chunk_no & 0xFF)

    def _walk(self, level: int, p: int, page_id: bytes, skip_zero: bool) -> Iterator[tuple[int, bytes]]:
        first = p << (8 * (level + 1))
        if first >= self.n:
            return
        if page_id == ZERO_ID:
            if not skip_zero:
                end = min(self.n, (p + 1) << (8 * (level + 1)))
                for i in range(first, end):
                    yield i, ZERO_ID
            return
        body = self.read_page(page_id, level)
        if level == 0:
            count = min(FANOUT, self.n - first)
            for i in range(count):
                cid = body[i * ID_SIZE : (i + 1) * ID_SIZE]
                if skip_zero and cid == ZERO_ID:
                    continue
                yield first + i, cid
            return
        for i in range(FANOUT):
            yield from self._walk(level - 1, (p << 8) | i, _slot(body, i), skip_zero)

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """``(chunk_no, id)`` for every chunk of the disk, in order."""
        return self._walk(self.depth - 1, 0, self.ref.root, skip_zero=False)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return self.entries()

    def nonzero_entries(self) -> Iterator[tuple[int, bytes]]:
        """``(chunk_no, id)`` for every chunk that is not all zeros, in order; zero subtrees
        are skipped without reading anything."""
        return self._walk(self.depth - 1, 0, self.ref.root, skip_zero=True)

    def page_ids(self) -> Iterator[bytes]:
        """Ids of every stored page of this index (root first, depth first). Leaves are named
        by their parents and not read."""

        def walk(level: int, page_id: bytes) -> Iterator[bytes]:
            if page_id == ZERO_ID:
                return
            yield page_id
            if level == 0:
                return
            body = self.read_page(page_id, level)
            for i in range(FANOUT):
                yield from walk(level - 1, _slot(body, i))

        return walk(self.depth - 1, self.ref.root)

    def pages(self) -> Iterator[tuple[int, int, bytes]]:
        """``(level, p, page_id)`` of every stored page, depth first; leaves are not read."""

        def walk(level: int, p: int, page_id: bytes) -> Iterator[tuple[int, int, bytes]]:
            if page_id == ZERO_ID:
                return
            yield level, p, page_id
            if level == 0:
                return
            body = self.read_page(page_id, level)
            for i in range(FANOUT):
                yield from walk(level - 1, (p << 8) | i, _slot(body, i))

        return walk(self.depth - 1, 0, self.ref.root)

    def diff(self, other: IndexRef) -> Iterator[int]:
        """Chunk numbers whose ids differ between this index and ``other``, in order.

        Entries beyond a disk's size count as ``ZERO_ID``, so against a smaller or larger disk
        the chunks that exist in only one of them are reported if they are not zero. Subtrees
        with equal page ids are skipped without reading them.
        """
        if other.chunk_size != self.ref.chunk_size:
            raise InvalidInput(
                f"cannot diff indexes of chunk size {self.ref.chunk_size} and {other.chunk_size}."
            )
        that = IndexReader(self.store, self.codec, other, self.cache)
        top = max(self.depth, that.depth) - 1

        def node(reader: IndexReader, level: int, p: int) -> bytes | None:
            # The id of page (level, p), or None where it is synthesized above a shallow root.
            if level >= reader.depth:
                return None if p == 0 else ZERO_ID
            if level == reader.depth - 1:
                return reader.ref.root if p == 0 else ZERO_ID
            return None  # unknown without reading the parent; the caller passes parents' ids

        def body(reader: IndexReader, level: int, p: int, page_id: bytes | None) -> bytes:
            if page_id is None:
                return reader.page_body_at(level, p)
            return reader.read_page(page_id, level)

        def walk(level: int, p: int, a: bytes | None, b: bytes | None) -> Iterator[int]:
            if a is not None and a == b:
                return
            ba = body(self, level, p, a)
            bb = body(that, level, p, b)
            if ba == bb and a is not None and b is not None:
                return
            if level == 0:
                base = p << 8
                for i in range(FANOUT):
                    if ba[i * ID_SIZE : (i + 1) * ID_SIZE] != bb[i * ID_SIZE : (i + 1) * ID_SIZE]:
                        yield base + i
                return
            for i in range(FANOUT):
                ca, cb = _slot(ba, i), _slot(bb, i)
                # Below a synthesized page, slot 0 leads to another synthesized page or the root.
                na = node(self, level - 1, (p << 8) | i) if a is None and i == 0 else ca
                nb = node(that, level - 1, (p << 8) | i) if b is None and i == 0 else cb
                yield from walk(level - 1, (p << 8) | i, na, nb)

        return walk(top, 0, node(self, top, 0), node(that, top, 0))


class IndexWriter:
    """Builds the index of a disk of ``size`` bytes, starting from ``base`` (or all zeros).

    ``set`` records changed entries in memory (one 8 KiB leaf buffer per touched leaf, loaded
    from the base on first touch); ``commit`` writes the pages on the paths from the touched
    leaves to the root and returns the new :class:`IndexRef`. ``checkpoint`` does the same but
    keeps the writer usable, so a long initial replication can record its progress (and bound
    its memory: touched leaves are dropped from memory once written). After ``commit`` the
    writer refuses further changes. Thread safe.
    """

    def __init__(
        self,
        store: ChunkStore,
        codec: ChunkCodec,
        size: int,
        base: IndexRef | None = None,
        *,
        chunk_size: int | None = None,
        cache: PageCache | None = None,
        max_dirty_leaves: int = 8192,
    ) -> None:
        if chunk_size is None:
            chunk_size = base.chunk_size if base is not None else CHUNK_SIZE
        if base is not None and base.chunk_size != chunk_size:
            raise InvalidInput(
                f"the base index has chunk size {base.chunk_size}, the new one {chunk_size}; "
                "a disk keeps its chunk size across recovery points."
            )
        self.store = store
        self.codec = codec
        self.size = size
        self.chunk_size = chunk_size
        self.cache = cache if cache is not None else PageCache()
        self.max_dirty_leaves = max_dirty_leaves
        # Validates size and chunk size.
        self._ref = IndexRef(size, ZERO_ID, chunk_size)
        self.n = self._ref.chunks
        self.depth = self._ref.depth
        self.base = base if base is not None else IndexRef.empty(0, chunk_size)
        self.pages_written = 0
        self.page_bytes_written = 0
        self._lock = threading.RLock()
        self._pending: list[dict[int, bytearray]] = [{} for _ in range(self.depth)]
        self._committed: IndexRef | None = None
        self._structure_dirty = base is None or base.size != size
        self._reader = IndexReader(store, codec, self.base, self.cache)
        if self.n > 0 and self.base.size != size and self.base.root != ZERO_ID:
            self._touch_structure()

    def _touch_structure(self) -> None:
        # Size changed: rebuild the path to the last entry (trimming what lies beyond the new
        # end) and, if the tree got deeper, the chain of leftmost pages above the old root.
        # The chain goes first, bottom-up, so that the path below finds it pending.
        for level in range(self.base.depth, self.depth):
            self._touch(level, 0)
        last = self.n - 1
        for level in range(self.depth):
            self._touch(level, last >> (8 * (level + 1)))

    def _current_body(self, level: int, p: int) -> bytes:
        """The body of page ``(level, p)`` as the tree stands now, for a page not pending."""
        # A pending ancestor holds the current ids of its untouched descendants; without one,
        # the page is as in the base. (Slot 0 of a pending page above the old root is a
        # placeholder, but the page it stands for is pending itself, so it is found first.)
        for anc in range(level + 1, self.depth):
            page = self._pending[anc].get(p >> (8 * (anc - level)))
            if page is None:
                continue
            body = bytes(page)
            for lvl in range(anc, level, -1):
                body = self._reader.read_page(_slot(body, (p >> (8 * (lvl - 1 - level))) & 0xFF), lvl - 1)
            return body
        return self._reader.page_body_at(level, p)

    def _touch(self, level: int, p: int) -> bytearray:
        page = self._pending[level].get(p)
        if page is None:
            page = bytearray(self._current_body(level, p))
            self._pending[level][p] = page
        return page

    def _check_open(self) -> None:
        if self._committed is not None:
            raise OperationNotAllowed(
                operation="changing an index",
                item="index writer",
                state="committed",
                allowed="none: start a new IndexWriter with the committed IndexRef as base",
            )

    def set(self, chunk_no: int, chunk_id: bytes) -> None:
        """Record that chunk ``chunk_no`` now has id ``chunk_id`` (``ZERO_ID``: all zeros)."""
        if not 0 <= chunk_no < self.n:
            raise OutOfRange(
                field="chunk number",
                value=chunk_no,
                allowed=f"0..{self.n - 1} for a disk of {self.size} bytes",
            )
        if len(chunk_id) != ID_SIZE:
            raise InvalidInput(f"a chunk id is {ID_SIZE} bytes, got {len(chunk_id)}.")
        with self._lock:
            self._check_open()
            page = self._touch(0, chunk_no >> 8)
            i = (chunk_no & 0xFF) * ID_SIZE
            page[i : i + ID_SIZE] = chunk_id
            if len(self._pending[0]) > self.max_dirty_leaves and self.depth > 1:
                # Bound memory: write the touched leaves now; their ids wait in level 1.
                self._write_level(0)

    def set_many(self, items: Iterable[tuple[int, bytes]]) -> None:
        for chunk_no, chunk_id in items:
            self.set(chunk_no, chunk_id)

    def set_run(self, first: int, ids: Sequence[bytes]) -> None:
        """``set(first + i, ids[i])`` for every ``i``: the ids of consecutive chunks, written
        into each leaf with one slice assignment (the agent's path: a block at a time)."""
        if not ids:
            return
        if not 0 <= first <= first + len(ids) <= self.n:
            raise OutOfRange(
                field="chunk numbers",
                value=f"{first}..{first + len(ids) - 1}",
                allowed=f"0..{self.n - 1} for a disk of {self.size} bytes",
            )
        if any(len(c) != ID_SIZE for c in ids):
            raise InvalidInput(f"a chunk id is {ID_SIZE} bytes; one of the run is not.")
        with self._lock:
            self._check_open()
            pos = 0
            while pos < len(ids):
                chunk_no = first + pos
                take = min(len(ids) - pos, FANOUT - (chunk_no & 0xFF))
                page = self._touch(0, chunk_no >> 8)
                i = (chunk_no & 0xFF) * ID_SIZE
                page[i : i + take * ID_SIZE] = b"".join(ids[pos : pos + take])
                pos += take
                if len(self._pending[0]) > self.max_dirty_leaves and self.depth > 1:
                    self._write_level(0)

    def _write_page(self, level: int, p: int, page: bytearray) -> bytes:
        # Trim entries/children that start at or beyond the end of the disk.
        span = 1 << (8 * level)  # entries covered by one slot of this page
        first_cut = -(-(self.n - (p << (8 * (level + 1)))) // span)
        if first_cut < FANOUT:
            page[max(first_cut, 0) * ID_SIZE :] = bytes((FANOUT - max(first_cut, 0)) * ID_SIZE)
        if page == _ZERO_BODY:
            return ZERO_ID
        plaintext = encode_page(level, page)
        page_id = self.codec.chunk_id(plaintext)
        # Insert even if the page exists: that refreshes its mtime, so a concurrent garbage
        # collection cannot sweep a page this index is about to refer to.
        blob = self.codec.encode(page_id, plaintext)
        if self.store.insert(page_id, blob):
            self.pages_written += 1
            self.page_bytes_written += len(blob)
        self.cache.put(page_id, level, bytes(page))
        return page_id

    def _write_level(self, level: int) -> bytes | None:
        """Write the pending pages of ``level``, handing their ids to the level above; return
        the root id when ``level`` is the top."""
        pending = self._pending[level]
        root: bytes | None = None
        for p in sorted(pending):
            page_id = self._write_page(level, p, pending[p])
            if level == self.depth - 1:
                root = page_id
            else:
                parent = self._touch(level + 1, p >> 8)
                i = (p & 0xFF) * ID_SIZE
                parent[i : i + ID_SIZE] = page_id
        pending.clear()
        return root

    def _build(self) -> IndexRef:
        if self.n == 0:
            return IndexRef(self.size, ZERO_ID, self.chunk_size)
        if not any(self._pending):
            # Nothing touched: same size as the base, or a resized all-zero base (a resized
            # non-zero base has its boundary path pending).
            return IndexRef(
                self.size, self.base.root if not self._structure_dirty else ZERO_ID, self.chunk_size
            )
        root = ZERO_ID
        for level in range(self.depth):
            top = self._write_level(level)
            if top is not None:
                root = top
        ref = IndexRef(self.size, root, self.chunk_size)
        # From now on the written tree is the base of further changes.
        self.base = ref
        self._structure_dirty = False
        self._reader = IndexReader(self.store, self.codec, ref, self.cache)
        return ref

    def checkpoint(self) -> IndexRef:
        """Write the current state and return its ref; the writer stays usable."""
        with self._lock:
            self._check_open()
            return self._build()

    def commit(self) -> IndexRef:
        """Write the index and return its ref; the writer cannot be changed afterwards."""
        with self._lock:
            self._check_open()
            self._committed = self._build()
            return self._committed
