"""The wire protocol between agents and a process server: versioned, length-prefixed frames.

One TCP connection (TLS with mutual authentication, see ``adapters.transport.tls``) carries a
strict request/reply exchange: the agent sends one request frame, the process server answers
with exactly one reply frame carrying the same request id. Connections are cheap and pooled, so
parallel agent threads use parallel connections instead of multiplexing one.

Frame (integers are unsigned, big-endian)::

    offset  size  field
    0       2     magic b"SR"
    2       1     protocol version, 1
    3       1     frame type (table below)
    4       1     flags: bit 0 = the body is one zstd frame; other bits 0
    5       3     reserved, 0
    8       4     request id (a reply repeats the id of its request)
    12      4     body length n (stored, i.e. compressed, length; at most MAX_BODY)
    16      n     body

Frame types and bodies (JSON bodies are UTF-8 objects; ``ids`` is a concatenation of 32-byte
chunk ids):

=====  ===========  ======  ====================================================================
type   name         from    body
=====  ===========  ======  ====================================================================
0x01   HELLO        agent   JSON ``{"protocol": 1, "agent": NAME}``; the first frame on a
                            connection. NAME must equal the common name of the agent's
                            certificate (the certificate is the identity, the name a check).
0x02   WELCOME      server  JSON ``{"protocol": 1, "server": NAME, "max_batch": BYTES}``
0x03   MISSING      agent   ``ids``: which of these does the process server lack?
0x04   LACKING      server  ``ids``: the subset lacking (neither spooled nor in the datastore)
0x05   PUT          agent   records ``id (32) | length (4) | blob (length)``: encoded chunks
                            (data chunks and index pages alike); idempotent, same id same blob
0x06   ACK          server  ``count (4) | count bytes``: the PUT's records are durable in the
                            spool (fsync'ed); byte i is 1 if record i was new to the server
0x07   BUSY         server  JSON ``{"retry_after": SECONDS, "reason": TEXT}``: the request was
                            not carried out (spool above its high watermark); send it again
                            after ``retry_after`` seconds. Nothing was stored.
0x08   FLUSH        agent   JSON ``{"timeout": SECONDS}``
0x09   FLUSHED      server  JSON ``{"chunks": N}``: everything acknowledged before the FLUSH is
                            durable in the datastore (the point before a manifest may refer to it)
0x0A   GET          agent   one id
0x0B   CHUNK        server  the encoded blob of that id (from the spool or the datastore)
0x0C   ERROR        server  JSON ``{"code": CODE, "message": TEXT}``; codes: ``bad-request``,
                            ``not-found`` (with ``chunk_id``), ``datastore-unavailable``,
                            ``version``, ``forbidden``, ``error`` (any other refusal),
                            ``internal`` (a bug in the process server)
0x0D   STATUS       any     empty
0x0E   STATUS_REPLY server  JSON: the process server's health (``Spool.status`` and more)
0x0F   SYNC         agent   empty: before an agent starts a disk's index, the process server
                            reloads its view of the datastore if another process (a garbage
                            collection) deleted or moved chunks since, so that MISSING never
                            counts a chunk that is gone
0x10   SYNCED       server  JSON ``{}``
=====  ===========  ======  ====================================================================

Compression: a sender may zstd-compress the body of a JSON frame (it sets flag bit 0 when that
makes the body smaller). ``ids`` are random and PUT blobs are already zstd + AES-GCM
(``dataplane.chunk_codec``), so those frames are never compressed: trying would only cost CPU.
A receiver decompresses with a limit of ``MAX_BODY`` bytes.

Versioning: a peer that receives a frame with a protocol version it does not speak answers
ERROR ``version`` (in version 1 framing) and closes the connection; the HELLO/WELCOME exchange
states the version each side speaks, so a future version 2 can be negotiated there.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import zstandard

from siterecovery.dataplane.chunk_codec import ID_SIZE
from siterecovery.errors import SiteRecoveryError

MAGIC = b"SR"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">2sBBB3sII")
HEADER_SIZE = HEADER.size  # 16
MAX_BODY = 32 * 1024 * 1024
FLAG_ZSTD = 0x01
# JSON bodies shorter than this are sent as they are: zstd's frame overhead would eat the gain.
COMPRESS_MIN = 128
_RECORD = struct.Struct(">32sI")


class WireError(SiteRecoveryError):
    """A frame that breaks the wire protocol (a bug, a version mismatch or a damaged stream)."""

    exit_code = 12
    http_status = 502


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    MISSING = 0x03
    LACKING = 0x04
    PUT = 0x05
    ACK = 0x06
    BUSY = 0x07
    FLUSH = 0x08
    FLUSHED = 0x09
    GET = 0x0A
    CHUNK = 0x0B
    ERROR = 0x0C
    STATUS = 0x0D
    STATUS_REPLY = 0x0E
    SYNC = 0x0F
    SYNCED = 0x10


JSON_FRAMES = frozenset(
    {
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.BUSY,
        FrameType.FLUSH,
        FrameType.FLUSHED,
        FrameType.ERROR,
        FrameType.STATUS_REPLY,
        FrameType.SYNCED,
    }
)


@dataclass(frozen=True)
class Frame:
    type: FrameType
    request_id: int
    body: bytes

    def json(self) -> dict[str, Any]:
        return decode_json(self.body)


def encode_frame(ftype: FrameType, request_id: int, body: bytes = b"") -> bytes:
    """Header + body, compressing a JSON body when that makes it smaller."""
    flags = 0
    if ftype in JSON_FRAMES and len(body) >= COMPRESS_MIN:
        packed = zstandard.ZstdCompressor(level=3).compress(body)
        if len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD
    if len(body) > MAX_BODY:
        raise WireError(
            f"a {ftype.name} frame of {len(body)} bytes exceeds the limit of {MAX_BODY} bytes; "
            "send smaller batches."
        )
    if not 0 <= request_id <= 0xFFFFFFFF:
        raise WireError(f"request id {request_id} does not fit in 32 bits.")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(ftype), flags, b"\0\0\0", request_id, len(body)) + body


def parse_header(header: bytes) -> tuple[FrameType, int, int, int]:
    """``(type, flags, request id, body length)`` of a 16-byte header; ``WireError`` if invalid."""
    if len(header) != HEADER_SIZE:
        raise WireError(f"a frame header is {HEADER_SIZE} bytes, got {len(header)}.")
    magic, version, ftype, flags, reserved, request_id, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise WireError(f"not a siterecovery frame (magic {magic!r}); is the peer a process server?")
    if version != PROTOCOL_VERSION:
        raise WireError(
            f"the peer speaks wire protocol version {version}, this version speaks {PROTOCOL_VERSION}; "
            "run the same siterecovery version on agent and process server."
        )
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise WireError(f"unknown frame type {ftype:#04x}.") from None
    if flags & ~FLAG_ZSTD or reserved != b"\0\0\0":
        raise WireError(f"frame {kind.name} has unknown flags {flags:#04x} or non-zero reserved bytes.")
    if length > MAX_BODY:
        raise WireError(f"frame {kind.name} announces {length} bytes, more than the limit {MAX_BODY}.")
    return kind, flags, request_id, length


def finish_frame(kind: FrameType, flags: int, request_id: int, body: bytes) -> Frame:
    if flags & FLAG_ZSTD:
        if kind not in JSON_FRAMES:
            raise WireError(f"frame {kind.name} must not be compressed.")
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY)
        except zstandard.ZstdError as err:
            raise WireError(f"frame {kind.name}: zstd decompression failed: {err}.") from err
    return Frame(kind, request_id, body)


def read_frame(recv_exactly: Callable[[int], bytes]) -> Frame:
    """Read one frame with ``recv_exactly(n)``, which returns exactly n bytes or raises."""
    kind, flags, request_id, length = parse_header(recv_exactly(HEADER_SIZE))
    body = recv_exactly(length) if length else b""
    return finish_frame(kind, flags, request_id, body)


def decode_frames(data: bytes) -> list[Frame]:
    """All frames in ``data`` (a byte string holding whole frames only)."""
    pos = 0
    out: list[Frame] = []

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise WireError(f"truncated frame: wanted {n} bytes, {len(data) - pos} left.")
        piece = data[pos : pos + n]
        pos += n
        return piece

    while pos < len(data):
        out.append(read_frame(take))
    return out


# -- bodies ---------------------------------------------------------------------------------


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise WireError(f"a JSON frame body is not valid JSON: {err}.") from err
    if not isinstance(obj, dict):
        raise WireError("a JSON frame body must be an object.")
    return obj


def encode_ids(ids: Iterable[bytes]) -> bytes:
    out = bytearray()
    for cid in ids:
        if len(cid) != ID_SIZE:
            raise WireError(f"a chunk id is {ID_SIZE} bytes, got {len(cid)}.")
        out += cid
    return bytes(out)


def decode_ids(body: bytes) -> list[bytes]:
    if len(body) % ID_SIZE:
        raise WireError(f"an id list of {len(body)} bytes is not a multiple of {ID_SIZE}.")
    return [body[i : i + ID_SIZE] for i in range(0, len(body), ID_SIZE)]


def put_size(items: Sequence[tuple[bytes, bytes]]) -> int:
    """Body size of a PUT frame carrying ``items``."""
    return sum(_RECORD.size + len(blob) for _, blob in items)


def encode_put(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts: list[bytes] = []
    for cid, blob in items:
        if len(cid) != ID_SIZE:
            raise WireError(f"a chunk id is {ID_SIZE} bytes, got {len(cid)}.")
        parts.append(_RECORD.pack(cid, len(blob)))
        parts.append(blob)
    return b"".join(parts)


def decode_put(body: bytes) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    view = memoryview(body)
    while pos < len(body):
        if pos + _RECORD.size > len(body):
            raise WireError(f"PUT body truncated in a record header at byte {pos}.")
        cid, n = _RECORD.unpack_from(body, pos)
        pos += _RECORD.size
        if pos + n > len(body):
            raise WireError(f"PUT record at byte {pos} announces {n} bytes, {len(body) - pos} left.")
        out.append((cid, bytes(view[pos : pos + n])))
        pos += n
    return out


def encode_ack(new: Sequence[bool]) -> bytes:
    return struct.pack(">I", len(new)) + bytes(1 if n else 0 for n in new)


def decode_ack(body: bytes) -> list[bool]:
    if len(body) < 4:
        raise WireError("ACK body shorter than its 4-byte count.")
    (count,) = struct.unpack_from(">I", body)
    if len(body) != 4 + count:
        raise WireError(f"ACK announces {count} records but carries {len(body) - 4}.")
    return [b != 0 for b in body[4:]]
