"""TLS over TCP for the wire protocol (``dataplane.wire``): a threaded server and a client with a
connection pool that reconnects and resends.

Security: TLS 1.2 or later, both ends present a certificate issued by the vault's CA
(``control.certificates``) and verify the other's against it; the client also checks the
server's host name against its certificate. The server takes the agent's identity from its
certificate's common name; the HELLO must name the same agent.

Every request of the protocol is idempotent (asking, putting the same id with the same blob,
flushing, reading), so the client's rule is simple: when a connection breaks before the reply
arrives, it reconnects and sends the same request again, for up to ``retry_for`` seconds. A
BUSY reply makes it wait the advised time and send again, for up to ``busy_for`` seconds: an
acknowledged batch is never sent twice, an unacknowledged one is never lost.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.adapters.transport.bandwidth import TokenBucket
from siterecovery.dataplane.wire import (
    PROTOCOL_VERSION,
    Frame,
    FrameType,
    WireError,
    decode_json,
    encode_frame,
    encode_json,
    read_frame,
)
from siterecovery.errors import ChunkMissing, DatastoreError, SiteRecoveryError

log = logging.getLogger(__name__)

DEFAULT_DATA_PORT = 9443
DEFAULT_CONTROL_PORT = 443
HANDSHAKE_TIMEOUT = 15.0


class TransportError(SiteRecoveryError):
    """The process server cannot be reached or refused the connection."""

    exit_code = 12
    http_status = 502


class RemoteError(SiteRecoveryError):
    """The process server answered a request with an error."""

    exit_code = 12
    http_status = 502


def parse_address(text: str, default_port: int, *, listen: bool = False) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); port 0 (any free port) only
    when ``listen``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise TransportError(f"address {text!r} is not valid; use [IPv6]:PORT.")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        port = -1
    if not host or not (0 if listen else 1) <= port < 65536:
        raise TransportError(f"address {text!r} is not valid; use HOST or HOST:PORT with a port 1..65535.")
    return host, port


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A server context that requires a client certificate issued by ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, cert, key, ca)
    return ctx


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A client context that presents ``cert`` and trusts only servers issued by ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, cert, key, ca)
    return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as err:
        raise TransportError(
            f"cannot load the TLS certificate {cert}, key {key} or CA {ca}: {err}. Issue a bundle with "
            "'siterecovery appliance register NAME --out DIR'."
        ) from err


def peer_name(conn: ssl.SSLSocket) -> str:
    """The common name of the peer's (verified) certificate."""
    cert: dict[str, Any] = dict(conn.getpeercert() or {})
    for rdn in cert.get("subject", ()):
        for attr in rdn:
            if attr[0] == "commonName":
                return str(attr[1])
    return ""


def _recv_exactly(conn: ssl.SSLSocket) -> Callable[[int], bytes]:
    def recv(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = conn.recv(min(n - len(buf), 1 << 20))
            if not piece:
                raise ConnectionResetError("the peer closed the connection")
            buf += piece
        return bytes(buf)

    return recv


# -- server -------------------------------------------------------------------------------------

Handler = Callable[[Frame, str], tuple[FrameType, bytes]]


def error_reply(code: str, message: str) -> tuple[FrameType, bytes]:
    return FrameType.ERROR, encode_json({"code": code, "message": message})


class FrameServer:
    """Serves the wire protocol on one TLS port; one thread per connection.

    ``handler(frame, agent)`` answers each request after the HELLO; ``welcome`` is merged into
    the WELCOME body.
    """

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        handler: Handler,
        *,
        name: str,
        welcome: dict[str, Any] | None = None,
        idle_timeout: float = 600.0,
    ) -> None:
        self.context = context
        self.handler = handler
        self.name = name
        self.welcome = dict(welcome or {})
        self.idle_timeout = idle_timeout
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            self._sock = socket.socket(family, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(sockaddr)
            self._sock.listen(64)
        except OSError as err:
            raise TransportError(
                f"cannot listen on {host}:{port}: {err.strerror or err}. Choose another port or stop "
                "what uses it (ports below 1024 need privileges)."
            ) from err
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name=f"accept-{port}", daemon=True)

    def start(self) -> FrameServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                raw, peer = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)
                continue
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(raw)
            threading.Thread(target=self._serve, args=(raw, peer), name=f"conn-{peer}", daemon=True).start()

    def _serve(self, raw: socket.socket, peer: Any) -> None:
        conn: ssl.SSLSocket | None = None
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            conn = self.context.wrap_socket(raw, server_side=True)
            with self._lock:
                self._conns.discard(raw)
                self._conns.add(conn)
            conn.settimeout(self.idle_timeout)
            agent = peer_name(conn)
            recv = _recv_exactly(conn)
            hello = read_frame(recv)
            reply = self._hello(hello, agent)
            conn.sendall(encode_frame(reply[0], hello.request_id, reply[1]))
            if reply[0] is not FrameType.WELCOME:
                return
            while not self._closing.is_set():
                frame = read_frame(recv)
                try:
                    rtype, body = self.handler(frame, agent)
                except WireError as err:
                    rtype, body = error_reply("bad-request", str(err))
                except SiteRecoveryError as err:
                    rtype, body = error_reply("error", str(err))
                except Exception as err:  # a bug: answer it instead of dropping the connection
                    log.exception("request %s from %s failed", frame.type.name, agent)
                    rtype, body = error_reply("internal", f"{type(err).__name__}: {err}")
                conn.sendall(encode_frame(rtype, frame.request_id, body))
        except WireError as err:
            log.warning("connection from %s: %s", peer, err)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(
                        encode_frame(
                            FrameType.ERROR, 0, encode_json({"code": "version", "message": str(err)})
                        )
                    )
        except (OSError, ssl.SSLError, ValueError) as err:
            if not self._closing.is_set():
                log.debug("connection from %s ended: %s", peer, err)
        finally:
            with self._lock:
                self._conns.discard(raw)
                if conn is not None:
                    self._conns.discard(conn)
            with contextlib.suppress(OSError):
                (conn or raw).close()

    def _hello(self, frame: Frame, agent: str) -> tuple[FrameType, bytes]:
        if frame.type is not FrameType.HELLO:
            return error_reply("bad-request", f"the first frame must be HELLO, got {frame.type.name}.")
        body = decode_json(frame.body)
        if body.get("protocol") != PROTOCOL_VERSION:
            return error_reply(
                "version",
                f"the agent speaks protocol {body.get('protocol')!r}, this process server speaks "
                f"{PROTOCOL_VERSION}; run the same siterecovery version on both.",
            )
        if body.get("agent") != agent:
            return error_reply(
                "forbidden",
                f"the HELLO names agent {body.get('agent')!r} but the certificate is issued to {agent!r}.",
            )
        return FrameType.WELCOME, encode_json(
            {"protocol": PROTOCOL_VERSION, "server": self.name, **self.welcome}
        )


# -- client -------------------------------------------------------------------------------------


@dataclass
class _Conn:
    sock: ssl.SSLSocket
    next_id: int = 1

    def call(self, ftype: FrameType, body: bytes) -> Frame:
        rid = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
        self.sock.sendall(encode_frame(ftype, rid, body))
        reply = read_frame(_recv_exactly(self.sock))
        if reply.request_id != rid:
            raise WireError(
                f"reply to request {reply.request_id}, expected {rid}: the stream is out of step."
            )
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class FrameClient:
    """A pool of TLS connections to one process server port (thread safe).

    ``call`` sends one request and returns its reply, reconnecting and resending on broken
    connections (``retry_for`` seconds) and waiting out BUSY replies (``busy_for`` seconds).
    """

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        agent: str,
        *,
        limiter: TokenBucket | None = None,
        connect_timeout: float = 10.0,
        io_timeout: float = 300.0,
        retry_for: float = 300.0,
        busy_for: float = 3600.0,
        max_idle: int = 8,
    ) -> None:
        self.host, self.port = host, port
        self.context = context
        self.agent = agent
        self.limiter = limiter
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.retry_for = retry_for
        self.busy_for = busy_for
        self.max_idle = max_idle
        self.server_name: str | None = None
        self.welcome: dict[str, Any] = {}
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self.reconnects = 0
        self.busy_waits = 0

    def __repr__(self) -> str:
        return f"FrameClient({self.host}:{self.port})"

    def _connect(self) -> _Conn:
        raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        sock.settimeout(self.io_timeout)
        conn = _Conn(sock)
        try:
            reply = conn.call(
                FrameType.HELLO, encode_json({"protocol": PROTOCOL_VERSION, "agent": self.agent})
            )
            if reply.type is FrameType.ERROR:
                body = decode_json(reply.body)
                raise TransportError(
                    f"the process server at {self.host}:{self.port} refused agent {self.agent!r}: "
                    f"{body.get('message', body)}"
                )
            if reply.type is not FrameType.WELCOME:
                raise WireError(f"expected WELCOME, got {reply.type.name}.")
        except BaseException:
            conn.close()
            raise
        self.welcome = decode_json(reply.body)
        self.server_name = str(self.welcome.get("server", ""))
        return conn

    def _take(self) -> _Conn:
        with self._lock:
            if self._closed:
                raise TransportError("the connection to the process server was closed.")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def call(self, ftype: FrameType, body: bytes, expect: FrameType) -> Frame:
        """Send a request until it gets a reply of type ``expect``; map ERROR replies to errors."""
        started = time.monotonic()
        failing_since: float | None = None
        delay = 0.1
        throttled = False
        while True:
            if self.limiter is not None and ftype is FrameType.PUT and not throttled:
                self.limiter.take(len(body))
                throttled = True  # a resent batch was paid for already
            try:
                conn = self._take()
                try:
                    reply = conn.call(ftype, body)
                except BaseException:
                    conn.close()
                    raise
                self._give(conn)
            except TransportError:
                raise
            except (OSError, ssl.SSLError, WireError) as err:
                if isinstance(err, ssl.SSLCertVerificationError):
                    raise TransportError(
                        f"the process server at {self.host}:{self.port} is not trusted: "
                        f"{err.verify_message}. Its certificate must be issued by this vault's CA "
                        "for this host name."
                    ) from err
                if isinstance(err, ssl.SSLError) and "ALERT" in (err.reason or ""):
                    # The server refused our certificate: trying again will not change that.
                    raise TransportError(
                        f"the process server at {self.host}:{self.port} refused this agent's certificate "
                        f"({err.reason}): it must be issued by the same vault's CA as the process "
                        "server's ('siterecovery appliance use' issues it)."
                    ) from err
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.retry_for:
                    raise TransportError(
                        f"cannot reach the process server at {self.host}:{self.port} for "
                        f"{self.retry_for:g}s: {err}. Check that it runs ('siterecovery process-server "
                        "status') and that the port is open; unacknowledged data is sent again then."
                    ) from err
                self.reconnects += 1
                log.info("process server %s:%d: %s; reconnecting", self.host, self.port, err)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
                continue
            failing_since, delay = None, 0.1
            if reply.type is FrameType.BUSY:
                info = decode_json(reply.body)
                wait = min(max(float(info.get("retry_after", 1.0)), 0.05), 30.0)
                if time.monotonic() - started + wait > self.busy_for:
                    raise TransportError(
                        f"the process server at {self.host}:{self.port} stayed busy for "
                        f"{self.busy_for:g}s: {info.get('reason', '')}"
                    )
                self.busy_waits += 1
                time.sleep(wait)
                continue
            if reply.type is FrameType.ERROR:
                raise _error_from(decode_json(reply.body), self)
            if reply.type is not expect:
                raise WireError(f"expected {expect.name} in reply to {ftype.name}, got {reply.type.name}.")
            return reply


def _error_from(body: dict[str, Any], client: FrameClient) -> SiteRecoveryError:
    code = str(body.get("code", "error"))
    message = str(body.get("message", ""))
    if code == "not-found":
        return ChunkMissing(chunk_id=str(body.get("chunk_id", "?")), where=" (asked the process server)")
    if code == "datastore-unavailable":
        return DatastoreError(message)
    return RemoteError(f"the process server at {client.host}:{client.port} answered {code}: {message}")
