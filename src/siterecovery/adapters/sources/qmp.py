"""A small QMP (QEMU Machine Protocol) client over a unix socket.

QMP is a line protocol: every message is one JSON object terminated by CRLF. On connect the
server sends a greeting ``{"QMP": {...}}``; the client must send ``qmp_capabilities`` before any
other command. A command ``{"execute": NAME, "arguments": {...}, "id": N}`` is answered by
exactly one ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` carrying the same
``id``; asynchronous ``{"event": NAME, "data": ..., "timestamp": ...}`` messages may arrive at
any time, also between a command and its answer.

Invariants of this client:

* One lock serialises a request and the read of its answer, so the client can be shared by
  threads; events read while waiting for an answer are buffered (bounded) and ignored unless a
  caller asks for them with :meth:`QmpClient.wait_event`.
* Every failure is a :class:`siterecovery.errors.SourceError` naming the command; the QMP error
  class and description are kept in ``err.fields["error_class"]`` / ``err.fields["desc"]``.
* A timeout or a broken connection closes the client (the stream position is unknown after a
  partial read); make a new client to continue.

A QEMU chardev socket serves one monitor client at a time, a second client waits until the
first disconnects: keep connections short (connect per operation) when several components talk
to the same machine.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from siterecovery.errors import SourceError

_EVENT_BUFFER = 1000


class QmpClient:
    """A connected, capabilities-negotiated QMP session (see the module docstring)."""

    def __init__(self, socket_path: str, timeout: float = 30) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=_EVENT_BUFFER)
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.socket_path)
        except OSError as err:
            self._sock.close()
            self._sock = None
            raise SourceError(
                f"cannot connect to the QMP socket {self.socket_path}: {err.strerror or err}. "
                "Check that the machine (QEMU or qemu-storage-daemon) is running and that this is "
                "its QMP monitor socket."
            ) from err
        # Own line buffer rather than sock.makefile(): a socket file is unusable after one
        # timeout, while wait_event() must be able to time out between messages.
        self._buf = bytearray()
        try:
            greeting = self._read_message("greeting")
            if "QMP" not in greeting:
                raise SourceError(
                    f"{self.socket_path} is not a QMP monitor (first message was {greeting!r}); "
                    "give the path of the machine's QMP socket."
                )
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    # -- public API -------------------------------------------------------------------------

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command and return its ``return`` value.

        Keyword names are QMP argument names with ``-`` written as ``_`` (``job_id`` ->
        ``job-id``); pass a dict via ``**{"x-name": v}`` for names that are not identifiers.
        """
        request: dict[str, Any] = {"execute": command, "id": next(self._ids)}
        if arguments:
            request["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        with self._lock:
            self._send(request, command)
            while True:
                msg = self._read_message(command)
                if "event" in msg:
                    self._events.append(msg)
                    continue
                if msg.get("id") != request["id"]:
                    # An answer to an earlier request that timed out cannot exist (we close
                    # on timeout), so anything else is a protocol violation.
                    self._fail()
                    raise SourceError(
                        f"QMP answer to {command} has an unexpected id {msg.get('id')!r}; "
                        "the connection was closed, reconnect and retry."
                    )
                if "error" in msg:
                    error = msg["error"]
                    cls = error.get("class", "GenericError")
                    desc = error.get("desc", "")
                    raise SourceError(
                        f"QMP command {command} failed: {cls}: {desc}",
                        command=command,
                        error_class=cls,
                        desc=desc,
                    )
                return msg.get("return")

    def wait_event(
        self,
        name: str,
        timeout: float,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Return the first buffered or new event called ``name`` (and accepted by ``match``,
        which gets the event's ``data``); raise SourceError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for event in list(self._events):
                    if event.get("event") == name and (match is None or match(event.get("data", {}))):
                        self._events.remove(event)
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SourceError(
                        f"QMP event {name} did not arrive within {timeout:g} s on {self.socket_path}."
                    )
                sock = self._require_socket(f"wait for {name}")
                sock.settimeout(remaining)
                try:
                    msg = self._read_message(f"wait for {name}", idle_ok=True)
                finally:
                    if self._sock is not None:
                        self._sock.settimeout(self.timeout)
                if msg is not None and "event" in msg:
                    self._events.append(msg)

    def close(self) -> None:
        """Close the connection; idempotent."""
        with self._lock:
            if self._sock is None:
                return
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _require_socket(self, what: str) -> socket.socket:
        if self._sock is None:
            raise SourceError(f"QMP connection to {self.socket_path} is closed; cannot {what}.")
        return self._sock

    def _fail(self) -> None:
        with contextlib.suppress(OSError):
            self.close()

    def _send(self, message: dict[str, Any], what: str) -> None:
        sock = self._require_socket(f"send {what}")
        try:
            sock.sendall(json.dumps(message).encode() + b"\r\n")
        except OSError as err:
            self._fail()
            raise SourceError(
                f"QMP connection to {self.socket_path} broke while sending {what}: {err}. "
                "Is the machine still running?"
            ) from err

    def _read_message(self, what: str, idle_ok: bool = False) -> Any:
        sock = self._require_socket(f"read the answer to {what}")
        try:
            while (end := self._buf.find(b"\n")) < 0:
                data = sock.recv(65536)
                if not data:
                    break
                self._buf += data
            if end < 0:
                line = b""
            else:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
        except TimeoutError as err:
            if idle_ok:
                # A wait_event timeout happens between messages, so the stream is intact.
                return None
            self._fail()
            raise SourceError(
                f"QMP {what} timed out after {self.timeout:g} s on {self.socket_path}; the "
                "connection was closed. The machine may be hung; check it and retry."
            ) from err
        except OSError as err:
            self._fail()
            raise SourceError(f"QMP connection to {self.socket_path} broke during {what}: {err}.") from err
        if not line:
            self._fail()
            raise SourceError(
                f"QMP connection to {self.socket_path} was closed by the machine during {what}; "
                "it may have stopped."
            )
        try:
            return json.loads(line)
        except json.JSONDecodeError as err:
            self._fail()
            raise SourceError(f"QMP sent a line that is not JSON during {what}: {line[:200]!r}.") from err
