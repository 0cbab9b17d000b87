"""Chunk and object stores on S3-compatible object storage (SeaweedFS, MinIO, Ceph RGW, AWS).

Small objects are slow and costly on object storage, so chunks are not stored one per object:
inserts accumulate in an open *pack* in memory, and a pack of several MiB (``pack_size``,
default 8 MiB) is written as one object together with a small *index* object that says where
each chunk lies in it.

Layout under the store's prefix (``s3://BUCKET/PREFIX/``)::

    packs/<2 hex>/<32 hex pack id>   blobs back to back after an 8-byte header
    index/<32 hex pack id>           where each chunk of that pack lies, plus mtime "touches"
    deleted/<32 hex>                 tombstones: (pack id, chunk id) pairs deleted by gc
    generation                       a token rewritten whenever chunks are deleted or moved
    objects/...                      the datastore's named objects (:class:`S3ObjectStore`)

Formats (all integers big-endian; every object starts with a 4-byte magic and a version byte;
the index and tombstone objects end with a CRC-32 of everything before it)::

    pack       b"SRPK" u8 version=1, 3 zero bytes, then the blobs
    index      b"SRPI" u8 version=1, 3 zero bytes, u32 n_entries, u32 n_touches,
               u64 pack_size, f64 created, n_entries x (32s chunk id, u64 offset, u32 length,
               f64 mtime), n_touches x (32s chunk id, f64 mtime), u32 crc32
    tombstones b"SRTB" u8 version=1, 3 zero bytes, u32 n, n x (16s pack id, 32s chunk id), u32 crc32
    generation b"SRGN" u8 version=1, 3 zero bytes, 16 random bytes

Invariants and crash safety:

* A pack is uploaded before its index, so an index never points at a missing pack. A crash
  between the two leaves an *unindexed* pack: its chunks were never reported durable (``flush``
  had not returned), and :meth:`S3ChunkStore.cleanup_temp` (called by gc) deletes it once it is
  older than gc's grace period. An index with no entries (only touches) has no pack.
* ``flush`` returns only when every pack sealed before it, and the open one, is uploaded with
  its index: the durability point the datastore relies on before it writes a manifest. A pack
  whose upload failed stays in memory (its chunks remain readable) and the next ``flush``
  uploads it; at most ``max_failed_packs`` such packs are kept, then inserts are refused.
* Chunk ids are unique within a pack; a chunk may exist in several packs (two processes inserted
  it, or a repack crashed half-way); the copy with the newest mtime is the one read.
* mtime (what gc's grace period compares) is the time of the insert, kept per index entry.
  Re-inserting a chunk that exists records a *touch* (chunk id, now) in the index of the pack
  being filled; a chunk's mtime is the largest of its entry's mtime and all touches of it.
  Another process sees a touch once it is uploaded (at the next ``flush`` or full pack).
* ``delete`` takes effect in this process at once and is written as a tombstone object at the
  next ``flush`` or ``repack``. A tombstone names a (pack, chunk) pair, so re-inserting a
  deleted chunk stores a new copy that the old tombstone does not touch.
* :meth:`S3ChunkStore.repack` rewrites packs that are mostly garbage (and merges small ones):
  new packs and their indexes are written first, then the old indexes, then the old packs are
  deleted; tombstones of deleted packs are consolidated. A crash at any step loses nothing.
* Writers of tombstones and repacks rewrite ``generation``; :meth:`S3ChunkStore.sync` (called
  by the datastore before it starts an index) reloads the in-memory index when the generation
  changed, so a long-lived process does not dedup against chunks another process deleted.

The in-memory index (chunk id -> pack, offset, length, mtime) is loaded at open by listing and
reading every index and tombstone object in parallel; ``contains``/``missing`` use only memory;
``get`` reads from memory (pack not yet uploaded) or from S3 in aligned 1 MiB segments
(``read_segment``) kept in a 32 MiB LRU cache (``read_cache``): a disk is read in chunk
order, mostly pack order, so one ranged GET serves ~16 chunks; ``get`` of an id it does not
know reloads first (unless a reload began after the ``get`` did), so a long-lived process reads
what another process, such as a process server, wrote since; ``list`` reloads first too.
Thread safe: one lock guards the in-memory state; uploads run outside it, so inserts go on
while a full pack is uploaded.

Errors: connection failures, timeouts and 5xx become ``DatastoreError`` naming the endpoint and
bucket (transient: retry later); refused credentials become ``DatastoreError`` naming the access
key to check; a missing bucket says to create it; 507/quota errors become ``StorageFull``. The
adapter does not retry beyond botocore's own retry configuration (``max_attempts``); retries
belong in a wrapper around the port.
"""

from __future__ import annotations

import builtins
import os
import secrets
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from siterecovery.adapters.chunk_stores.local import check_object_name
from siterecovery.errors import ChunkMissing, DatastoreError, InvalidInput, StorageFull
from siterecovery.ports.chunk_store import ChunkInfo, ObjectMissing

FORMAT_VERSION = 1
DEFAULT_PACK_SIZE = 8 * 1024 * 1024

PACK_MAGIC = b"SRPK"
INDEX_MAGIC = b"SRPI"
TOMB_MAGIC = b"SRTB"
GEN_MAGIC = b"SRGN"
_HEAD = struct.Struct(">4sB3x")
PACK_HEADER = _HEAD.pack(PACK_MAGIC, FORMAT_VERSION)
_INDEX_HEAD = struct.Struct(">4sB3xIIQd")
_ENTRY = struct.Struct(">32sQId")
_TOUCH = struct.Struct(">32sd")
_TOMB_HEAD = struct.Struct(">4sB3xI")
_TOMB = struct.Struct(">16s32s")
_CRC = struct.Struct(">I")

_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
        "401",
        "403",
    }
)
_FULL_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "507"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})

T = TypeVar("T")


# -- location and client ------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    """Where a datastore lives on S3, and how to reach it.

    ``access_key``/``secret_key`` None means boto3's default chain (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/credentials``, instance roles)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> S3Location:
        """Parse ``s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]``."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise InvalidInput(
                f"datastore URL {url!r} is not allowed: use s3://BUCKET/PREFIX?endpoint=http://HOST:PORT "
                "(endpoint and prefix are optional)."
            )
        query = parse_qs(parts.query)
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise InvalidInput(
                f"datastore URL {url!r} has unknown parameters {sorted(unknown)}; allowed: endpoint, region."
            )
        fields: dict[str, Any] = {
            "bucket": parts.netloc,
            "prefix": parts.path,
            "endpoint_url": query["endpoint"][-1] if "endpoint" in query else None,
            "region": query["region"][-1] if "region" in query else None,
        }
        fields.update(overrides)
        return cls(**fields)

    def __post_init__(self) -> None:
        prefix = self.prefix.strip("/")
        object.__setattr__(self, "prefix", prefix + "/" if prefix else "")
        if not (3 <= len(self.bucket) <= 63) or "/" in self.bucket:
            raise InvalidInput(
                f"S3 bucket name {self.bucket!r} is not allowed: use 3-63 lowercase letters, digits, "
                "'.' and '-'."
            )

    def child(self, sub: str) -> S3Location:
        """The same place with ``sub`` appended to the prefix."""
        return S3Location(
            self.bucket,
            self.prefix + sub,
            self.endpoint_url,
            self.region,
            self.access_key,
            self.secret_key,
        )

    @property
    def endpoint_label(self) -> str:
        return self.endpoint_url or "the default AWS S3 endpoint"

    def url(self) -> str:
        """The location as an ``s3://`` URL, without credentials."""
        query = []
        if self.endpoint_url:
            query.append(f"endpoint={self.endpoint_url}")
        if self.region:
            query.append(f"region={self.region}")
        return f"s3://{self.bucket}/{self.prefix}" + ("?" + "&".join(query) if query else "")


def make_client(
    location: S3Location,
    *,
    max_attempts: int = 3,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 32,
) -> Any:
    """A thread-safe boto3 S3 client for ``location`` (path-style addressing, which every
    S3-compatible server supports). botocore retries a failed request ``max_attempts`` times
    in all; the adapters themselves never retry."""
    session = boto3.session.Session(
        aws_access_key_id=location.access_key,
        aws_secret_access_key=location.secret_key,
        region_name=location.region or ("us-east-1" if location.endpoint_url else None),
    )
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": "path"},
    )
    return session.client("s3", endpoint_url=location.endpoint_url, config=config)


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _http_status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_missing(err: BaseException) -> bool:
    """True if ``err`` says the object does not exist (NoSuchKey / 404)."""
    return isinstance(err, ClientError) and (_error_code(err) in _MISSING_CODES or _http_status(err) == 404)


class _S3:
    """The calls both stores make, with vendor errors classified (see the module docstring)."""

    def __init__(self, location: S3Location, client: Any | None) -> None:
        self.location = location
        self.bucket = location.bucket
        self.client = client if client is not None else make_client(location)

    def error(self, err: Exception, what: str) -> DatastoreError:
        loc = f"bucket {self.bucket!r} at {self.location.endpoint_label}"
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return DatastoreError(
                f"no usable S3 credentials for {loc} ({err}). Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give the access and secret key explicitly."
            )
        if isinstance(
            err, (BotoConnectionError, EndpointConnectionError, ConnectionClosedError, HTTPClientError)
        ):
            return DatastoreError(
                f"cannot reach the S3 endpoint {self.location.endpoint_label} ({what} in bucket "
                f"{self.bucket!r}): {err}. Check that the server is running and that the endpoint URL "
                "is right; nothing stored so far is lost, so retry when it is reachable."
            )
        if isinstance(err, ClientError):
            code, status = _error_code(err), _http_status(err)
            message = err.response.get("Error", {}).get("Message", "") or str(err)
            if code in _AUTH_CODES or status in (401, 403):
                key_id = self.access_key_id()
                return DatastoreError(
                    f"S3 refused {what} in {loc} ({code}: {message}). Check the access key "
                    f"{key_id!r} and its secret key (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
                    "datastore's configured credentials) and that this identity may read and write the "
                    "bucket."
                )
            if code == "NoSuchBucket":
                return DatastoreError(
                    f"{loc} does not exist ({what}). Create the bucket, or correct the bucket name in "
                    "the datastore URL."
                )
            if code in _FULL_CODES or status == 507:
                return StorageFull(where=loc, detail=f"{what}: {code} {message}")
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
                return DatastoreError(
                    f"S3 server error during {what} in {loc}: {code} {message}. This is transient on "
                    "the server side; retry later."
                )
            return DatastoreError(f"S3 {what} in {loc} failed: {code} {message}.")
        if isinstance(err, BotoCoreError):
            return DatastoreError(f"S3 {what} in {loc} failed: {err}. Retry later.")
        raise err

    def access_key_id(self) -> str | None:
        """The access key the client signs with (for messages; never the secret)."""
        try:
            # botocore keeps the resolved credentials on the signer; no public accessor exists.
            return str(self.client._request_signer._credentials.access_key)
        except AttributeError:
            return self.location.access_key or os.environ.get("AWS_ACCESS_KEY_ID")

    def call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as err:
            raise self.error(err, what) from err

    def put(self, key: str, data: bytes) -> None:
        self.call(f"writing {key}", self.client.put_object, Key=key, Body=data)

    def get(self, key: str, range_: tuple[int, int] | None = None) -> bytes | None:
        """The object's bytes (or ``range_`` = (offset, length) of them); None if it does not exist."""
        kwargs: dict[str, Any] = {"Key": key}
        if range_ is not None:
            kwargs["Range"] = f"bytes={range_[0]}-{range_[0] + range_[1] - 1}"
        try:
            resp = self.client.get_object(Bucket=self.bucket, **kwargs)
            return bytes(resp["Body"].read())
        except ClientError as err:
            if is_missing(err):
                return None
            if _http_status(err) == 416 or _error_code(err) == "InvalidRange":
                return b""  # the object is shorter than the range: the caller reports it
            raise self.error(err, f"reading {key}") from err
        except BotoCoreError as err:
            raise self.error(err, f"reading {key}") from err

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            if is_missing(err):
                return
            raise self.error(err, f"deleting {key}") from err
        except BotoCoreError as err:
            raise self.error(err, f"deleting {key}") from err

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, last modified epoch seconds)`` of every object under ``prefix``."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    yield obj["Key"], obj["LastModified"].timestamp()
        except (BotoCoreError, ClientError) as err:
            raise self.error(err, f"listing {prefix or '/'}") from err

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as err:
            if _http_status(err) != 404 and _error_code(err) not in ("404", "NoSuchBucket", "NotFound"):
                raise self.error(err, "checking the bucket") from err
        except BotoCoreError as err:
            raise self.error(err, "checking the bucket") from err
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as err:
            if _error_code(err) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self.error(err, "creating the bucket") from err
        except BotoCoreError as err:
            raise self.error(err, "creating the bucket") from err


# -- stored formats -----------------------------------------------------------------------


@dataclass
class IndexData:
    """The decoded index object of one pack."""

    pack_size: int  # 0 for an index of touches only (no pack object)
    created: float
    entries: dict[bytes, tuple[int, int, float]]  # chunk id -> (offset, length, mtime)
    touches: dict[bytes, float]  # chunk id -> mtime


def _check_head(data: bytes, magic: bytes, what: str) -> None:
    if len(data) < _HEAD.size:
        raise DatastoreError(f"{what} is truncated ({len(data)} bytes); it is damaged. Run verify.")
    got, version = _HEAD.unpack_from(data)
    if got != magic:
        raise DatastoreError(f"{what} does not start with {magic!r}: it is not ours or it is damaged.")
    if version != FORMAT_VERSION:
        raise DatastoreError(
            f"{what} has format version {version}; this version reads {FORMAT_VERSION}. Upgrade siterecovery."
        )


def _check_crc(data: bytes, what: str) -> bytes:
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise DatastoreError(
            f"{what} fails its checksum: it is damaged. Run verify, then repair or restore it."
        )
    return body


def encode_index(ix: IndexData) -> bytes:
    out = bytearray(
        _INDEX_HEAD.pack(
            INDEX_MAGIC, FORMAT_VERSION, len(ix.entries), len(ix.touches), ix.pack_size, ix.created
        )
    )
    for cid, (off, length, mtime) in ix.entries.items():
        out += _ENTRY.pack(cid, off, length, mtime)
    for cid, mtime in ix.touches.items():
        out += _TOUCH.pack(cid, mtime)
    out += _CRC.pack(zlib.crc32(out))
    return bytes(out)


def decode_index(data: bytes, what: str) -> IndexData:
    _check_head(data, INDEX_MAGIC, what)
    body = _check_crc(data, what)
    if len(body) < _INDEX_HEAD.size:
        raise DatastoreError(f"{what} is truncated; it is damaged.")
    _, _, n_entries, n_touches, pack_size, created = _INDEX_HEAD.unpack_from(body)
    if len(body) != _INDEX_HEAD.size + n_entries * _ENTRY.size + n_touches * _TOUCH.size:
        raise DatastoreError(f"{what} has the wrong length for its counts; it is damaged.")
    entries: dict[bytes, tuple[int, int, float]] = {}
    pos = _INDEX_HEAD.size
    for cid, off, length, mtime in _ENTRY.iter_unpack(body[pos : pos + n_entries * _ENTRY.size]):
        entries[cid] = (off, length, mtime)
    pos += n_entries * _ENTRY.size
    touches = {cid: mtime for cid, mtime in _TOUCH.iter_unpack(body[pos:])}
    return IndexData(pack_size, created, entries, touches)


def encode_tombstones(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    pairs = sorted(pairs)
    out = bytearray(_TOMB_HEAD.pack(TOMB_MAGIC, FORMAT_VERSION, len(pairs)))
    for pack_id, cid in pairs:
        out += _TOMB.pack(pack_id, cid)
    out += _CRC.pack(zlib.crc32(out))
    return bytes(out)


def decode_tombstones(data: bytes, what: str) -> set[tuple[bytes, bytes]]:
    _check_head(data, TOMB_MAGIC, what)
    body = _check_crc(data, what)
    (_, _, n) = _TOMB_HEAD.unpack_from(body)
    if len(body) != _TOMB_HEAD.size + n * _TOMB.size:
        raise DatastoreError(f"{what} has the wrong length for its count; it is damaged.")
    return {(p, c) for p, c in _TOMB.iter_unpack(body[_TOMB_HEAD.size :])}


# -- in-memory state ----------------------------------------------------------------------


class _Loc:
    """Where the readable copy of a chunk is, and its effective mtime."""

    __slots__ = ("pack", "offset", "length", "mtime")

    def __init__(self, pack: bytes, offset: int, length: int, mtime: float) -> None:
        self.pack = pack
        self.offset = offset
        self.length = length
        self.mtime = mtime


class _MemPack:
    """A pack being filled (the open one) or sealed and not yet durable."""

    def __init__(self, seq: int) -> None:
        self.id = secrets.token_bytes(16)
        self.seq = seq
        self.buf = bytearray(PACK_HEADER)
        self.entries: dict[bytes, _Loc] = {}
        self.touches: dict[bytes, float] = {}
        self.sealed = False
        self.uploading = False  # its index snapshot is taken: deletes must become tombstones
        self.failed = False
        self.durable = False
        self.upload_lock = threading.Lock()


@dataclass
class RepackStats:
    packs_rewritten: int = 0  # packs whose live chunks were copied into new packs
    packs_removed: int = 0  # pack objects deleted (rewritten ones and ones with nothing live)
    indexes_merged: int = 0  # touch-only indexes folded into the new ones
    bytes_copied: int = 0
    bytes_freed: int = 0  # stored bytes of the removed packs minus those of the new ones


def _hex(pack_id: bytes) -> str:
    return pack_id.hex()


def _check_id(chunk_id: bytes) -> None:
    if len(chunk_id) != 32:
        raise InvalidInput(f"a chunk id is 32 bytes, got {len(chunk_id)}.")


class S3ChunkStore:
    """A :class:`~siterecovery.ports.chunk_store.ChunkStore` of packs in an S3 bucket.

    Opening loads the index of every pack (network). ``pack_size`` is the size at which the
    open pack is sealed and uploaded. See the module docstring for formats and invariants."""

    def __init__(
        self,
        location: S3Location,
        *,
        client: Any | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        max_failed_packs: int = 4,
        load_threads: int = 16,
        read_segment: int = 1024 * 1024,
        read_cache: int = 32 * 1024 * 1024,
    ) -> None:
        if pack_size < 4096:
            raise InvalidInput(
                f"pack size {pack_size} is too small: use at least 4096 bytes (default 8 MiB)."
            )
        self.location = location
        self.prefix = location.prefix
        self.pack_size = pack_size
        self.max_failed_packs = max_failed_packs
        self.load_threads = load_threads
        self.read_segment = read_segment
        self.read_cache = read_cache
        self._cache_lock = threading.Lock()  # guards the two below
        self._segments: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self._fetching: dict[tuple[bytes, int], threading.Event] = {}
        self._cached_bytes = 0
        self._s3 = _S3(location, client)
        self._lock = threading.Lock()  # guards every attribute below
        self._maint = threading.RLock()  # serializes refresh, repack, tombstone writes, cleanup
        self._refresh_began = float("-inf")  # time.monotonic() when the latest reload began
        self._seq = 0
        self._open = self._new_pack()
        self._mem: dict[bytes, _MemPack] = {self._open.id: self._open}
        self._index: dict[bytes, IndexData] = {}
        self._tomb_objs: dict[str, set[tuple[bytes, bytes]]] = {}
        self._pending_tombs: set[tuple[bytes, bytes]] = set()
        self._where: dict[bytes, _Loc] = {}
        self._dups: dict[bytes, builtins.list[_Loc]] = {}  # other readable copies of a chunk
        self._generation: bytes | None = None
        self.refresh()

    # -- names ------------------------------------------------------------------------------

    def pack_key(self, pack_id: bytes) -> str:
        h = _hex(pack_id)
        return f"{self.prefix}packs/{h[:2]}/{h}"

    def index_key(self, pack_id: bytes) -> str:
        return f"{self.prefix}index/{_hex(pack_id)}"

    @property
    def generation_key(self) -> str:
        return f"{self.prefix}generation"

    def _new_pack(self) -> _MemPack:
        self._seq += 1
        return _MemPack(self._seq)

    # -- loading ----------------------------------------------------------------------------

    def _read_generation(self) -> bytes | None:
        data = self._s3.get(self.generation_key)
        if data is None:
            return None
        _check_head(data, GEN_MAGIC, f"object {self.generation_key}")
        return data[_HEAD.size :]

    def _bump_generation(self) -> None:
        token = secrets.token_bytes(16)
        self._s3.put(self.generation_key, _HEAD.pack(GEN_MAGIC, FORMAT_VERSION) + token)
        with self._lock:
            self._generation = token

    def _ids_under(self, sub: str) -> dict[bytes, str]:
        """Pack ids (or tombstone object ids) named under ``prefix + sub``: id -> key."""
        out: dict[bytes, str] = {}
        start = self.prefix + sub
        for key, _ in self._s3.list(start):
            name = key[len(start) :]
            try:
                ident = bytes.fromhex(name)
            except ValueError:
                continue  # not ours: something else was put here
            if len(ident) == 16:
                out[ident] = key
        return out

    def _fetch_all(self, keys: builtins.list[str], decode: Callable[[bytes, str], T]) -> dict[str, T | None]:
        def one(key: str) -> tuple[str, T | None]:
            data = self._s3.get(key)
            return key, (None if data is None else decode(data, f"object {key}"))

        if len(keys) <= 1:
            return dict(one(k) for k in keys)
        with ThreadPoolExecutor(max_workers=min(self.load_threads, len(keys))) as pool:
            return dict(pool.map(one, keys))

    def refresh(self) -> None:
        """Reload what other processes wrote or removed (index and tombstone objects)."""
        with self._maint:
            with self._lock:
                self._refresh_began = time.monotonic()
            generation = self._read_generation()
            with self._lock:
                known_ix = set(self._index)
                known_tb = set(self._tomb_objs)
            # Tombstones first: every pack a listed tombstone names was indexed before it.
            listed_tb = set(self._ids_under("deleted/").values())
            listed_ix = self._ids_under("index/")
            new_ix = self._fetch_all([k for pid, k in listed_ix.items() if pid not in known_ix], decode_index)
            new_tb = self._fetch_all(sorted(listed_tb - known_tb), decode_tombstones)
            prefix_len = len(self.prefix + "index/")
            with self._lock:
                for pid in known_ix - set(listed_ix):
                    self._index.pop(pid, None)  # repacked by another process
                for name in known_tb - listed_tb:
                    self._tomb_objs.pop(name, None)
                for key, ix in new_ix.items():
                    pid = bytes.fromhex(key[prefix_len:])
                    # None: deleted between listing and reading. A pack of ours that was uploaded
                    # meanwhile is taken over by _upload, not here.
                    if ix is not None and pid not in self._mem:
                        self._index[pid] = ix
                for name, tombs in new_tb.items():
                    if tombs is not None:
                        self._tomb_objs[name] = tombs
                self._generation = generation
                self._rebuild_locked()

    def sync(self) -> None:
        """Reload the in-memory index if another process deleted or moved chunks since it was
        loaded (one small GET when nothing changed). The datastore calls this before it starts
        writing an index, so dedup never trusts a chunk that gc removed elsewhere."""
        if self._read_generation() != self._generation:
            self.refresh()

    def _rebuild_locked(self) -> None:
        tombs = set(self._pending_tombs)
        for t in self._tomb_objs.values():
            tombs |= t
        where: dict[bytes, _Loc] = {}
        dups: dict[bytes, builtins.list[_Loc]] = {}

        def offer(cid: bytes, loc: _Loc) -> None:
            cur = where.get(cid)
            if cur is None:
                where[cid] = loc
                return
            if (loc.mtime, loc.pack) > (cur.mtime, cur.pack):
                where[cid], loc = loc, cur
            dups.setdefault(cid, []).append(loc)

        for pid, ix in self._index.items():
            for cid, (off, length, mtime) in ix.entries.items():
                if (pid, cid) not in tombs:
                    offer(cid, _Loc(pid, off, length, mtime))
        mem = sorted(self._mem.values(), key=lambda p: p.seq)
        for pack in mem:
            for cid, mem_loc in pack.entries.items():
                if (pack.id, cid) not in tombs:
                    offer(cid, mem_loc)
        touch_sets = [ix.touches for ix in self._index.values()] + [p.touches for p in mem]
        for touches in touch_sets:
            for cid, when in touches.items():
                found = where.get(cid)
                if found is not None and when > found.mtime:
                    found.mtime = when
        self._where = where
        self._dups = dups

    # -- the port ---------------------------------------------------------------------------

    def insert(self, chunk_id: bytes, blob: bytes) -> bool:
        _check_id(chunk_id)
        now = time.time()
        with self._lock:
            loc = self._where.get(chunk_id)
            if loc is not None:
                self._touch_locked(chunk_id, loc, now)
                return False
            n_failed = sum(1 for p in self._mem.values() if p.failed)
        if n_failed >= self.max_failed_packs:
            # Do not buffer without bound while the server is unreachable: try to catch up first.
            self._upload_failed()
        sealed: _MemPack | None = None
        with self._lock:
            loc = self._where.get(chunk_id)
            if loc is not None:  # another thread inserted it meanwhile
                self._touch_locked(chunk_id, loc, now)
                return False
            pack = self._open
            loc = _Loc(pack.id, len(pack.buf), len(blob), now)
            pack.buf += blob
            pack.entries[chunk_id] = loc
            self._where[chunk_id] = loc
            if len(pack.buf) >= self.pack_size:
                sealed = self._seal_locked()
        if sealed is not None:
            self._upload_failed()
            self._upload(sealed)
        return True

    def _read_range(self, pack: bytes, offset: int, length: int) -> bytes | None:
        """Bytes of an uploaded pack, read in aligned segments of ``read_segment`` bytes kept in
        an LRU cache: disks are read in chunk order, which is mostly pack order, so one GET
        serves many chunks. Packs never change once written, so a cached segment is never stale."""
        seg = self.read_segment
        if seg <= 0 or length >= seg:
            return self._s3.get(self.pack_key(pack), (offset, length))
        first, last = offset // seg, (offset + length - 1) // seg
        parts = []
        for no in range(first, last + 1):
            part = self._segment(pack, no)
            if part is None:
                return None
            parts.append(part)
        start = offset - first * seg
        return b"".join(parts)[start : start + length]

    def _segment(self, pack: bytes, no: int) -> bytes | None:
        key = (pack, no)
        while True:
            with self._cache_lock:
                data = self._segments.get(key)
                if data is not None:
                    self._segments.move_to_end(key)
                    return data
                event = self._fetching.get(key)
                mine = event is None
                if event is None:
                    event = self._fetching[key] = threading.Event()
            if not mine:
                event.wait()  # another thread fetches it; if it failed, fetch it ourselves
                continue
            try:
                data = self._s3.get(self.pack_key(pack), (no * self.read_segment, self.read_segment))
            finally:
                with self._cache_lock:
                    del self._fetching[key]
                event.set()
            if data is None or not data:
                return data
            with self._cache_lock:
                if key not in self._segments:
                    self._segments[key] = data
                    self._cached_bytes += len(data)
                while self._cached_bytes > self.read_cache and self._segments:
                    _, old = self._segments.popitem(last=False)
                    self._cached_bytes -= len(old)
            return data

    def _touch_locked(self, chunk_id: bytes, loc: _Loc, now: float) -> None:
        loc.mtime = max(loc.mtime, now)
        if loc.pack != self._open.id:
            # Recorded in the open pack's index, so that other processes see it once uploaded.
            self._open.touches[chunk_id] = now

    def get(self, chunk_id: bytes) -> bytes:
        asked = time.monotonic()
        for _ in range(3):
            with self._lock:
                loc = self._where.get(chunk_id)
                if loc is None:
                    if self._refresh_began >= asked:
                        raise ChunkMissing(chunk_id=chunk_id.hex())
                else:
                    mem = self._mem.get(loc.pack)
                    if mem is not None:
                        return bytes(mem.buf[loc.offset : loc.offset + loc.length])
                    pack, offset, length = loc.pack, loc.offset, loc.length
            if loc is None:
                self.refresh()  # written by another process since we loaded?
                continue
            data = self._read_range(pack, offset, length)
            if data is not None and len(data) == length:
                return data
            if data is not None:
                raise ChunkMissing(
                    chunk_id=chunk_id.hex(),
                    where=f" (pack {_hex(pack)} is shorter than its index says: it is damaged)",
                )
            # The pack is gone: repacked (by us or another process) since we looked it up.
            with self._lock:
                moved = (cur := self._where.get(chunk_id)) is not None and cur.pack != pack
            if not moved:
                self.refresh()
        raise ChunkMissing(chunk_id=chunk_id.hex(), where=" (its pack keeps disappearing while it is read)")

    def contains(self, chunk_id: bytes) -> bool:
        with self._lock:
            return chunk_id in self._where

    def missing(self, chunk_ids: Iterable[bytes]) -> set[bytes]:
        with self._lock:
            return {c for c in chunk_ids if c not in self._where}

    def flush(self) -> None:
        with self._lock:
            self._seal_locked()
            pending = sorted((p for p in self._mem.values() if p.sealed), key=lambda p: p.seq)
        for pack in pending:
            self._upload(pack)
        self._persist_tombstones()

    def delete(self, chunk_id: bytes) -> None:
        with self._lock:
            loc = self._where.pop(chunk_id, None)
            if loc is None:
                return
            for copy in [loc, *self._dups.pop(chunk_id, [])]:
                mem = self._mem.get(copy.pack)
                if mem is not None:
                    mem.entries.pop(chunk_id, None)
                    if not mem.uploading:
                        continue  # it will not be in the pack's index at all
                self._pending_tombs.add((copy.pack, chunk_id))

    def list(self) -> Iterator[ChunkInfo]:
        self.refresh()
        with self._lock:
            items = [ChunkInfo(cid, loc.length, loc.mtime) for cid, loc in self._where.items()]
        return iter(items)

    # -- uploads ----------------------------------------------------------------------------

    def _seal_locked(self) -> _MemPack | None:
        pack = self._open
        if not pack.entries and not pack.touches:
            return None
        pack.sealed = True
        self._open = self._new_pack()
        self._mem[self._open.id] = self._open
        return pack

    def _upload_failed(self) -> None:
        with self._lock:
            failed = sorted((p for p in self._mem.values() if p.failed), key=lambda p: p.seq)
        for pack in failed:
            self._upload(pack)

    def _upload(self, pack: _MemPack) -> None:
        """Upload a sealed pack, then its index; on success its chunks are read from S3."""
        with pack.upload_lock:
            if pack.durable:
                return
            with self._lock:
                pack.uploading = True
                entries = {cid: (loc.offset, loc.length, loc.mtime) for cid, loc in pack.entries.items()}
                touches = dict(pack.touches)
            data = bytes(pack.buf) if entries else b""
            ix = IndexData(len(data), time.time(), entries, touches)
            try:
                if entries:
                    self._s3.put(self.pack_key(pack.id), data)
                self._s3.put(self.index_key(pack.id), encode_index(ix))
            except DatastoreError:
                with self._lock:
                    pack.uploading = False
                    pack.failed = True
                raise
            with self._lock:
                pack.durable = True
                pack.failed = False
                self._index[pack.id] = ix
                del self._mem[pack.id]

    def _persist_tombstones(self) -> None:
        with self._lock:
            if not self._pending_tombs:
                return  # the common case for flush: do not wait behind a refresh or repack
        with self._maint:
            with self._lock:
                pending = set(self._pending_tombs)
            if not pending:
                return
            name = f"{self.prefix}deleted/{secrets.token_hex(16)}"
            self._s3.put(name, encode_tombstones(pending))
            with self._lock:
                self._tomb_objs[name] = pending
                self._pending_tombs -= pending
            self._bump_generation()

    # -- maintenance ------------------------------------------------------------------------

    def cleanup_temp(self, older_than: float | None = None) -> int:
        """Delete unindexed packs (left by a crash between a pack upload and its index) whose
        last modification is before ``older_than`` (epoch seconds; default one hour ago).
        Returns how many were deleted. Garbage collection calls it with its grace cutoff."""
        if older_than is None:
            older_than = time.time() - 3600
        removed = 0
        with self._maint:
            self.refresh()
            start = self.prefix + "packs/"
            for key, mtime in list(self._s3.list(start)):
                name = key[len(start) :].rpartition("/")[2]
                try:
                    pid = bytes.fromhex(name)
                except ValueError:
                    continue
                with self._lock:
                    known = pid in self._index or pid in self._mem
                if known or mtime >= older_than:
                    continue
                # An index may have appeared since the refresh: check before deleting.
                if self._s3.get(self.index_key(pid)) is not None:
                    continue
                self._s3.delete(key)
                removed += 1
        return removed

    def repack(self, threshold: float = 0.5) -> RepackStats:
        """Rewrite packs whose garbage fraction (bytes of deleted or superseded chunks) exceeds
        ``threshold``, merge packs smaller than a quarter of ``pack_size`` and fold touch-only
        indexes; delete the old objects only after the new packs and indexes are written.
        Persists pending deletions first. Safe to run while inserts run."""
        if not 0 <= threshold < 1:
            raise InvalidInput(f"repack threshold {threshold} is out of range: allowed is 0 <= t < 1.")
        stats = RepackStats()
        with self._maint:
            self._persist_tombstones()
            self.refresh()
            plan, touch_only, live, carried = self._plan_repack(threshold)
            if not plan and len(touch_only) < 2:
                self._consolidate_tombstones()
                return stats
            outputs = self._copy_live(plan, live, carried, stats)
            for pid, data, ix in outputs:
                if ix.entries:
                    self._s3.put(self.pack_key(pid), data)
                self._s3.put(self.index_key(pid), encode_index(ix))
            with self._lock:
                old = {pid: self._index.pop(pid) for pid in [*plan, *touch_only] if pid in self._index}
                new_home: dict[bytes, bytes] = {}
                for pid, _, ix in outputs:
                    self._index[pid] = ix
                    for cid in ix.entries:
                        new_home[cid] = pid
                # A delete that ran while we copied names the old pack: move it to the new copy.
                for pid_cid in [t for t in self._pending_tombs if t[0] in old]:
                    self._pending_tombs.discard(pid_cid)
                    if pid_cid[1] in new_home:
                        self._pending_tombs.add((new_home[pid_cid[1]], pid_cid[1]))
                self._rebuild_locked()
            for pid, ix in old.items():
                self._s3.delete(self.index_key(pid))
                if ix.entries:
                    self._s3.delete(self.pack_key(pid))
                    stats.packs_removed += 1
                    stats.bytes_freed += ix.pack_size
                else:
                    stats.indexes_merged += 1
            stats.bytes_freed -= sum(len(data) for _, data, _ in outputs)
            self._persist_tombstones()
            self._consolidate_tombstones()
            self._bump_generation()
        return stats

    def _plan_repack(
        self, threshold: float
    ) -> tuple[
        builtins.list[bytes],
        builtins.list[bytes],
        dict[bytes, builtins.list[tuple[bytes, _Loc]]],
        dict[bytes, float],
    ]:
        with self._lock:
            plan: builtins.list[bytes] = []
            small: builtins.list[bytes] = []
            touch_only: builtins.list[bytes] = []
            live: dict[bytes, builtins.list[tuple[bytes, _Loc]]] = {}
            for pid, ix in self._index.items():
                if not ix.entries:
                    touch_only.append(pid)
                    continue
                mine = [
                    (cid, loc)
                    for cid, (off, _, _) in ix.entries.items()
                    if (loc := self._where.get(cid)) is not None and loc.pack == pid and loc.offset == off
                ]
                data_bytes = max(1, ix.pack_size - len(PACK_HEADER))
                garbage = 1 - sum(loc.length for _, loc in mine) / data_bytes
                live[pid] = mine
                if garbage > threshold:
                    plan.append(pid)
                elif ix.pack_size < self.pack_size // 4:
                    small.append(pid)
            if len(small) >= 2:
                plan += small
            removed = set(plan) | set(touch_only)
            # Touches kept in indexes we remove must survive for chunks that stay where they are.
            carried: dict[bytes, float] = {}
            for pid in removed:
                for cid, t in self._index[pid].touches.items():
                    loc = self._where.get(cid)
                    if loc is None or loc.pack in removed:
                        continue  # gone, or its new entry gets the effective mtime
                    entry = self._index.get(loc.pack)
                    own = entry.entries[cid][2] if entry is not None and cid in entry.entries else 0.0
                    if t > own and t > carried.get(cid, 0.0):
                        carried[cid] = t
            return plan, touch_only, {pid: live[pid] for pid in plan}, carried

    def _copy_live(
        self,
        plan: builtins.list[bytes],
        live: dict[bytes, builtins.list[tuple[bytes, _Loc]]],
        carried: dict[bytes, float],
        stats: RepackStats,
    ) -> builtins.list[tuple[bytes, bytes, IndexData]]:
        outputs: builtins.list[tuple[bytes, bytes, IndexData]] = []
        buf = bytearray(PACK_HEADER)
        entries: dict[bytes, tuple[int, int, float]] = {}

        def close() -> None:
            nonlocal buf, entries
            outputs.append(
                (secrets.token_bytes(16), bytes(buf), IndexData(len(buf), time.time(), entries, {}))
            )
            buf, entries = bytearray(PACK_HEADER), {}

        for pid in plan:
            if not live[pid]:
                continue
            stats.packs_rewritten += 1
            data = self._s3.get(self.pack_key(pid))
            if data is None:
                raise DatastoreError(
                    f"repack stopped before deleting anything: pack {self.pack_key(pid)} is listed in "
                    "its index but does not exist. Run verify to see which recovery points it affects."
                )
            _check_head(data, PACK_MAGIC, f"pack {self.pack_key(pid)}")
            for cid, loc in live[pid]:
                blob = data[loc.offset : loc.offset + loc.length]
                if len(blob) != loc.length:
                    raise DatastoreError(
                        f"repack stopped before deleting anything: pack {self.pack_key(pid)} is shorter "
                        "than its index says. Run verify to see which recovery points it affects."
                    )
                entries[cid] = (len(buf), len(blob), loc.mtime)
                buf += blob
                stats.bytes_copied += len(blob)
                if len(buf) >= self.pack_size:
                    close()
        if entries:
            close()
        if carried:
            if outputs:
                outputs[-1][2].touches.update(carried)
            else:
                outputs.append((secrets.token_bytes(16), b"", IndexData(0, time.time(), {}, dict(carried))))
        return outputs

    def _consolidate_tombstones(self) -> None:
        """Replace the tombstone objects by one that keeps only tombstones of existing entries."""
        with self._lock:
            names = list(self._tomb_objs)
            keep = {
                (p, c)
                for tombs in self._tomb_objs.values()
                for p, c in tombs
                if (ix := self._index.get(p)) is not None and c in ix.entries
            }
            total = sum(len(t) for t in self._tomb_objs.values())
        if len(names) <= 1 and len(keep) == total:
            return
        if keep:
            name = f"{self.prefix}deleted/{secrets.token_hex(16)}"
            self._s3.put(name, encode_tombstones(keep))
            with self._lock:
                self._tomb_objs[name] = keep
        for old in names:
            self._s3.delete(old)
            with self._lock:
                self._tomb_objs.pop(old, None)

    def pack_count(self) -> int:
        """Pack objects this store knows (uploaded, with an index)."""
        with self._lock:
            return sum(1 for ix in self._index.values() if ix.entries)

    def stored_bytes(self) -> int:
        """Bytes of the uploaded pack objects (live data and garbage)."""
        with self._lock:
            return sum(ix.pack_size for ix in self._index.values())


class S3ObjectStore:
    """An :class:`~siterecovery.ports.chunk_store.ObjectStore`: object ``NAME`` is the S3 object
    ``PREFIX + NAME``. A PUT replaces an object atomically."""

    def __init__(self, location: S3Location, *, client: Any | None = None) -> None:
        self.location = location
        self.prefix = location.prefix
        self._s3 = _S3(location, client)

    def put(self, name: str, data: bytes) -> None:
        check_object_name(name)
        self._s3.put(self.prefix + name, bytes(data))

    def get(self, name: str) -> bytes:
        check_object_name(name)
        data = self._s3.get(self.prefix + name)
        if data is None:
            raise ObjectMissing(name)
        return data

    def list(self, prefix: str = "") -> Iterator[str]:
        start = len(self.prefix)
        names = sorted(key[start:] for key, _ in self._s3.list(self.prefix + prefix))
        return iter(names)

    def delete(self, name: str) -> None:
        check_object_name(name)
        self._s3.delete(self.prefix + name)


def open_stores(
    location: S3Location,
    *,
    create_bucket: bool = False,
    pack_size: int = DEFAULT_PACK_SIZE,
    client: Any | None = None,
) -> tuple[S3ChunkStore, S3ObjectStore]:
    """The chunk store (``PREFIX``) and object store (``PREFIX/objects/``) of a datastore,
    sharing one client. With ``create_bucket``, create the bucket if it does not exist."""
    client = client if client is not None else make_client(location)
    if create_bucket:
        _S3(location, client).ensure_bucket()
    chunks = S3ChunkStore(location, client=client, pack_size=pack_size)
    objects = S3ObjectStore(location.child("objects"), client=client)
    return chunks, objects
