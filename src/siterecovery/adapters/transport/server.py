"""The process server's request handlers: wire frames in, spool operations, wire frames out.

Data port: MISSING, PUT, FLUSH, GET, SYNC and STATUS. Control port: STATUS only (health for
operators and monitoring; it never carries data).
"""

from __future__ import annotations

import time
from typing import Any

from siterecovery.dataplane.spool import DatastoreUnavailable, Spool, SpoolBusy
from siterecovery.dataplane.wire import (
    Frame,
    FrameType,
    WireError,
    decode_ids,
    decode_json,
    decode_put,
    encode_ack,
    encode_ids,
    encode_json,
)
from siterecovery.errors import ChunkMissing, DatastoreError

# The longest a FLUSH may hold a connection: an agent asking for more gets this.
MAX_FLUSH_TIMEOUT = 600.0


class ProcessServerService:
    """Answers agents' requests from a :class:`~siterecovery.dataplane.spool.Spool`."""

    def __init__(self, spool: Spool, name: str, max_batch: int = 4 * 1024 * 1024) -> None:
        self.spool = spool
        self.name = name
        self.max_batch = max_batch
        self.started_at = time.time()
        self.agents_seen: dict[str, float] = {}

    def welcome(self) -> dict[str, Any]:
        return {"max_batch": self.max_batch}

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 1),
            "agents": {a: round(t, 3) for a, t in sorted(self.agents_seen.items())},
            "spool": self.spool.status(),
        }

    def handle_data(self, frame: Frame, agent: str) -> tuple[FrameType, bytes]:
        self.agents_seen[agent] = time.time()
        if frame.type is FrameType.MISSING:
            ids = decode_ids(frame.body)
            lacking = self.spool.missing(ids)
            return FrameType.LACKING, encode_ids(i for i in ids if i in lacking)
        if frame.type is FrameType.PUT:
            try:
                flags = self.spool.put_many(decode_put(frame.body))
            except SpoolBusy as busy:
                return FrameType.BUSY, encode_json({"retry_after": busy.retry_after, "reason": busy.reason})
            return FrameType.ACK, encode_ack(flags)
        if frame.type is FrameType.FLUSH:
            timeout = min(float(decode_json(frame.body).get("timeout", 60.0)), MAX_FLUSH_TIMEOUT)
            try:
                waiting = self.spool.flush(timeout)
            except DatastoreUnavailable as err:
                return _error("datastore-unavailable", str(err))
            return FrameType.FLUSHED, encode_json({"chunks": waiting})
        if frame.type is FrameType.GET:
            ids = decode_ids(frame.body)
            if len(ids) != 1:
                raise WireError(f"a GET asks for one chunk id, got {len(ids)}.")
            cid = ids[0]
            try:
                return FrameType.CHUNK, self.spool.get(cid)
            except ChunkMissing:
                return _error("not-found", f"chunk {cid.hex()} is neither spooled nor in the datastore", cid)
            except DatastoreError as err:
                return _error("datastore-unavailable", str(err))
        if frame.type is FrameType.SYNC:
            try:
                self.spool.sync_store()
            except DatastoreError as err:
                return _error("datastore-unavailable", str(err))
            return FrameType.SYNCED, encode_json({})
        if frame.type is FrameType.STATUS:
            return FrameType.STATUS_REPLY, encode_json(self.status())
        return _error("bad-request", f"{frame.type.name} is not a request the data port answers.")

    def handle_control(self, frame: Frame, agent: str) -> tuple[FrameType, bytes]:
        if frame.type is FrameType.STATUS:
            return FrameType.STATUS_REPLY, encode_json(self.status())
        return _error("bad-request", f"the control port answers STATUS only, not {frame.type.name}.")


def _error(code: str, message: str, chunk_id: bytes | None = None) -> tuple[FrameType, bytes]:
    body: dict[str, Any] = {"code": code, "message": message}
    if chunk_id is not None:
        body["chunk_id"] = chunk_id.hex()
    return FrameType.ERROR, encode_json(body)
