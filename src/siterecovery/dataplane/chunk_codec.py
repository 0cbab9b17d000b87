"""Chunk codec: chunk ids and the stored (encoded) form of a chunk.

A chunk is a piece of plaintext: a ``CHUNK_SIZE`` slice of a disk (the last one of a disk may be
shorter) or an index page. Its id is the keyed BLAKE3 hash of the plaintext (32 bytes, key
``VaultKey.id_key``). An all-zero chunk is never stored: indexes record it as ``ZERO_ID``.

Stored form (all integers are single bytes)::

    offset  size  field
    0       1     format version, 1
    1       1     codec: 0 = raw (zstd did not make it smaller), 1 = zstd frame
    2       12    nonce (random)
    14      n+16  AES-256-GCM ciphertext of the payload, then the 16-byte tag

The associated data of AES-GCM is the 2 header bytes followed by the chunk id, so a blob cannot
be moved to another id or have its codec byte flipped without failing authentication. The
AES key is a per-chunk subkey, keyed BLAKE3 of the chunk id under ``VaultKey.enc_key``: nonces
then only need to be unique per chunk id (the same plaintext is encrypted a handful of times at
most), which lifts the 2**32-messages limit of random 96-bit nonces under one key.

:meth:`ChunkCodec.decode` checks everything and raises ``ChunkCorrupt`` naming the first check
that failed: length, version, codec, authentication, decompression, size limit, and finally that
the keyed hash of the plaintext equals the id.

Thread safety: a codec may be used from many threads at once. zstd compressor and decompressor
objects are not thread safe, so each thread gets its own (``threading.local``). BLAKE3, zstd and
AES-GCM release the GIL, so a thread pool uses all cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from siterecovery.dataplane.keys import VaultKey
from siterecovery.errors import ChunkCorrupt, OutOfRange

CHUNK_SIZE = 65536
ZERO_ID = bytes(32)
ID_SIZE = 32

FORMAT_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
HEADER_SIZE = 2
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
# Upper bound of a chunk's plaintext; also the decompression limit, so that a blob can never
# make decode allocate more than this.
MAX_PLAINTEXT = 16 * 1024 * 1024
# Above this size, hash with several threads (below it thread start-up costs more than it saves).
_PARALLEL_HASH_MIN = 1024 * 1024

# Level 1 (the default) with matches of at least 7 bytes instead of 6: on scenario 1's data
# (host binaries) 4-7 % faster for 2.7 % larger output (64 KiB chunks: 413-427 MB/s at ratio
# 0.382 became 442-446 MB/s at 0.392, one core). Compression is most of an initial
# replication's CPU, and that CPU is spent on the protected machine.
_LEVEL1_MIN_MATCH = 7

_ZERO_CHUNK = bytes(CHUNK_SIZE)
_HEADER_ZSTD = bytes((FORMAT_VERSION, CODEC_ZSTD))
_HEADER_RAW = bytes((FORMAT_VERSION, CODEC_RAW))


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte of ``data`` is 0 (a C-speed memcmp, no Python loop)."""
    if isinstance(data, memoryview):
        # memoryview == bytes compares element by element in Python objects; bytes compare is memcmp.
        data = data.tobytes()
    n = len(data)
    if n == CHUNK_SIZE:
        return data == _ZERO_CHUNK
    if n < CHUNK_SIZE:
        return data == _ZERO_CHUNK[:n]
    return data == bytes(n)


_PROBE = 64
_ZERO_PROBE = bytes(_PROBE)


def is_zero_at(data: bytes | bytearray | memoryview, offset: int, length: int) -> bool:
    """True if ``data[offset:offset + length]`` is all zeros, without copying that slice."""
    if isinstance(data, memoryview) or length > CHUNK_SIZE:
        # A chunk of data almost never starts with 64 zero bytes: decide from those alone
        # before copying the whole chunk out of the view (a copy that holds the GIL).
        if length > _PROBE and bytes(data[offset : offset + _PROBE]) != _ZERO_PROBE:
            return False
        return is_zero(data[offset : offset + length])
    # startswith compares in place (memcmp); slicing bytes would copy the chunk first.
    return offset + length <= len(data) and data.startswith(_ZERO_CHUNK[:length], offset)


class ChunkCodec:
    """Names, encodes and decodes chunks with one vault key. Safe to share between threads."""

    def __init__(self, key: VaultKey, level: int = 1) -> None:
        if not 1 <= level <= 22:
            raise OutOfRange(field="zstd level", value=level, allowed="1..22")
        self.key = key
        self.level = level
        self._id_key = key.id_key
        self._enc_key = key.enc_key
        self._local = threading.local()

    def chunk_id(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The 32-byte id of ``plaintext``: BLAKE3 keyed with the vault's id key."""
        if len(plaintext) >= _PARALLEL_HASH_MIN:
            return blake3.blake3(plaintext, key=self._id_key, max_threads=blake3.blake3.AUTO).digest()
        return blake3.blake3(plaintext, key=self._id_key).digest()

    def _aead(self, chunk_id: bytes) -> AESGCM:
        return AESGCM(blake3.blake3(chunk_id, key=self._enc_key).digest())

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "comp", None)
        if comp is None:
            tuned = {"min_match": _LEVEL1_MIN_MATCH} if self.level == 1 else {}
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, source_size=CHUNK_SIZE, write_content_size=1, write_checksum=0, **tuned
            )
            comp = zstandard.ZstdCompressor(compression_params=params)
            self._local.comp = comp
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec: zstandard.ZstdDecompressor | None = getattr(self._local, "dec", None)
        if dec is None:
            dec = zstandard.ZstdDecompressor()
            self._local.dec = dec
        return dec

    def encode(self, chunk_id: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The stored form of ``plaintext`` whose id is ``chunk_id`` (see the module docstring)."""
        if len(chunk_id) != ID_SIZE:
            raise OutOfRange(field="chunk id length", value=len(chunk_id), allowed=f"{ID_SIZE} bytes")
        if len(plaintext) > MAX_PLAINTEXT:
            raise OutOfRange(
                field="chunk size", value=len(plaintext), allowed=f"at most {MAX_PLAINTEXT} bytes"
            )
        nonce = os.urandom(NONCE_SIZE)
        return self._seal(chunk_id, plaintext, self._compressor().compress(plaintext), nonce)

    def encode_many(
        self, chunk_ids: Sequence[bytes], plaintexts: Sequence[bytes | bytearray | memoryview]
    ) -> list[bytes]:
        """``encode`` of each pair, the same stored form. The whole batch is compressed in one
        call that releases the GIL once (per-chunk calls hand the GIL over twice a chunk, which
        keeps the other threads waiting for it)."""
        if len(chunk_ids) != len(plaintexts):
            raise OutOfRange(
                field="plaintexts", value=len(plaintexts), allowed=f"{len(chunk_ids)}, one per chunk id"
            )
        for chunk_id, plaintext in zip(chunk_ids, plaintexts, strict=True):
            if len(chunk_id) != ID_SIZE:
                raise OutOfRange(field="chunk id length", value=len(chunk_id), allowed=f"{ID_SIZE} bytes")
            if not 0 < len(plaintext) <= MAX_PLAINTEXT:
                # The batch call cannot take an empty buffer; the single one does.
                return [self.encode(c, p) for c, p in zip(chunk_ids, plaintexts, strict=True)]
        if len(plaintexts) < 2:
            return [self.encode(c, p) for c, p in zip(chunk_ids, plaintexts, strict=True)]
        packed = self._compressor().multi_compress_to_buffer(list(plaintexts), threads=0)
        # One system call for the batch's nonces: each call would hand the GIL over again.
        nonces = os.urandom(NONCE_SIZE * len(plaintexts))
        return [
            self._seal(chunk_id, plaintext, packed[i], nonces[i * NONCE_SIZE : (i + 1) * NONCE_SIZE])
            for i, (chunk_id, plaintext) in enumerate(zip(chunk_ids, plaintexts, strict=True))
        ]

    def _seal(
        self,
        chunk_id: bytes,
        plaintext: bytes | bytearray | memoryview,
        packed: bytes | zstandard.BufferSegment,
        nonce: bytes,
    ) -> bytes:
        """Header, nonce and AES-GCM of the compressed form, or of the plaintext if that is not
        larger."""
        payload: bytes | bytearray | memoryview
        if len(packed) < len(plaintext):
            header = _HEADER_ZSTD
            # A BufferSegment exports the buffer protocol (its type stub does not declare it).
            payload = packed if isinstance(packed, bytes) else memoryview(packed)  # type: ignore[arg-type]
        else:
            header = _HEADER_RAW
            payload = plaintext
        sealed = self._aead(chunk_id).encrypt(nonce, payload, header + chunk_id)
        return b"".join((header, nonce, sealed))

    def decode(self, chunk_id: bytes, blob: bytes | bytearray | memoryview) -> bytes:
        """The plaintext of ``blob``, checked to hash to ``chunk_id``; else ``ChunkCorrupt``."""
        hex_id = chunk_id.hex()
        if len(blob) < OVERHEAD:
            raise ChunkCorrupt(
                chunk_id=hex_id, reason=f"blob of {len(blob)} bytes is shorter than {OVERHEAD}"
            )
        blob = bytes(blob)
        version, codec = blob[0], blob[1]
        if version != FORMAT_VERSION:
            raise ChunkCorrupt(
                chunk_id=hex_id,
                reason=f"unknown format version {version}, this version reads {FORMAT_VERSION}",
            )
        if codec not in (CODEC_RAW, CODEC_ZSTD):
            raise ChunkCorrupt(chunk_id=hex_id, reason=f"unknown codec {codec}")
        nonce = blob[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        try:
            payload = self._aead(chunk_id).decrypt(
                nonce, blob[HEADER_SIZE + NONCE_SIZE :], blob[:HEADER_SIZE] + chunk_id
            )
        except InvalidTag as err:
            raise ChunkCorrupt(
                chunk_id=hex_id,
                reason="authentication failed: the data is damaged, stored under another id, "
                "or encrypted with another vault key",
            ) from err
        if codec == CODEC_ZSTD:
            try:
                plaintext = self._decompressor().decompress(payload, max_output_size=MAX_PLAINTEXT)
            except zstandard.ZstdError as err:
                raise ChunkCorrupt(chunk_id=hex_id, reason=f"zstd decompression failed: {err}") from err
        else:
            plaintext = payload
        if len(plaintext) > MAX_PLAINTEXT:
            raise ChunkCorrupt(chunk_id=hex_id, reason=f"plaintext larger than {MAX_PLAINTEXT} bytes")
        if self.chunk_id(plaintext) != chunk_id:
            raise ChunkCorrupt(chunk_id=hex_id, reason="content does not hash to its id")
        return plaintext
