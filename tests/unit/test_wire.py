"""The agent/process-server wire protocol: frame and body round trips, and what it refuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.dataplane.wire import (
    FLAG_ZSTD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    PROTOCOL_VERSION,
    FrameType,
    WireError,
    decode_ack,
    decode_frames,
    decode_ids,
    decode_json,
    decode_put,
    encode_ack,
    encode_frame,
    encode_ids,
    encode_json,
    encode_put,
    put_size,
)

ids_st = st.lists(st.binary(min_size=32, max_size=32), max_size=40)
records_st = st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.binary(max_size=3000)), max_size=20)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(list(FrameType)), st.integers(0, 2**32 - 1), st.binary(max_size=5000))
def test_any_frame_round_trips(ftype: FrameType, request_id: int, body: bytes) -> None:
    frames = decode_frames(encode_frame(ftype, request_id, body))
    assert len(frames) == 1
    assert (frames[0].type, frames[0].request_id, frames[0].body) == (ftype, request_id, body)


@settings(max_examples=60, deadline=None)
@given(ids_st)
def test_id_lists_round_trip(ids: list[bytes]) -> None:
    assert decode_ids(encode_ids(ids)) == ids


@settings(max_examples=60, deadline=None)
@given(records_st)
def test_put_batches_round_trip_and_size_is_exact(records: list[tuple[bytes, bytes]]) -> None:
    body = encode_put(records)
    assert len(body) == put_size(records)
    assert decode_put(body) == records


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_acks_round_trip(flags: list[bool]) -> None:
    assert decode_ack(encode_ack(flags)) == flags


def test_several_frames_in_one_stream_keep_their_order() -> None:
    data = b"".join(
        encode_frame(t, i, b)
        for i, (t, b) in enumerate(
            [(FrameType.MISSING, bytes(64)), (FrameType.STATUS, b""), (FrameType.ERROR, b'{"code":"x"}')]
        )
    )
    frames = decode_frames(data)
    assert [(f.type, f.request_id) for f in frames] == [
        (FrameType.MISSING, 0),
        (FrameType.STATUS, 1),
        (FrameType.ERROR, 2),
    ]


def test_large_json_bodies_are_compressed_on_the_wire() -> None:
    status = {"state": "ok", "problems": ["segment seg-1 damaged"] * 200}
    body = encode_json(status)
    raw = encode_frame(FrameType.STATUS_REPLY, 7, body)
    assert raw[4] & FLAG_ZSTD
    assert len(raw) < len(body) // 4
    assert decode_frames(raw)[0].json() == status


def test_chunk_frames_are_never_compressed() -> None:
    # Chunk blobs are zstd + AES already: compressing them again would only cost CPU.
    body = encode_put([(bytes(32), bytes(100_000))])
    raw = encode_frame(FrameType.PUT, 1, body)
    assert raw[4] == 0 and len(raw) == HEADER_SIZE + len(body)


def _header(**kw: object) -> bytes:
    fields = {
        "magic": MAGIC,
        "version": PROTOCOL_VERSION,
        "type": int(FrameType.STATUS),
        "flags": 0,
        "reserved": b"\0\0\0",
        "request_id": 1,
        "length": 0,
    }
    fields.update(kw)
    return HEADER.pack(*fields.values())


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (_header(magic=b"GE"), "not a siterecovery frame"),
        (_header(version=2), "wire protocol version 2"),
        (_header(type=0x7F), "unknown frame type"),
        (_header(flags=0x80), "unknown flags"),
        (_header(reserved=b"\0\1\0"), "reserved"),
        (_header(length=MAX_BODY + 1), "more than the limit"),
    ],
)
def test_invalid_headers_are_refused_with_a_reason(header: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_frames(header)


def test_a_truncated_frame_is_refused() -> None:
    raw = encode_frame(FrameType.MISSING, 3, bytes(64))
    with pytest.raises(WireError, match="truncated"):
        decode_frames(raw[:-1])


def test_a_compressed_chunk_frame_is_refused() -> None:
    raw = bytearray(encode_frame(FrameType.PUT, 1, encode_put([(bytes(32), b"x")])))
    raw[4] = FLAG_ZSTD
    with pytest.raises(WireError, match="must not be compressed"):
        decode_frames(bytes(raw))


def test_damaged_bodies_are_refused() -> None:
    with pytest.raises(WireError, match="multiple of 32"):
        decode_ids(bytes(33))
    with pytest.raises(WireError, match="announces"):
        decode_put(bytes(32) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(WireError, match="announces 3 records"):
        decode_ack(struct.pack(">I", 3) + b"\1")
    with pytest.raises(WireError, match="must be an object"):
        decode_json(b"[1]")
    with pytest.raises(WireError, match="32 bytes"):
        encode_ids([b"short"])


def test_an_oversized_body_is_refused_before_sending() -> None:
    with pytest.raises(WireError, match="send smaller batches"):
        encode_frame(FrameType.PUT, 1, bytes(MAX_BODY + 1))
