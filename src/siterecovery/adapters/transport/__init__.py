"""The distributed transport: agents and process servers over TLS (``dataplane.wire`` frames).

* ``tls``: TLS contexts (mutual authentication), the frame server and the reconnecting client;
* ``server``: the process server's request handlers (a spool behind them);
* ``remote``: the process server as an agent sees it (ProcessServer + ChunkStore over the wire);
* ``bandwidth``: the agent's token bucket with time-of-day windows;
* ``config``: the vault's process-server settings (``<vault>/process-server.json``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from siterecovery.adapters.transport.bandwidth import BandwidthSchedule, TokenBucket
from siterecovery.adapters.transport.config import RemoteSettings
from siterecovery.adapters.transport.remote import RemoteProcessServer
from siterecovery.adapters.transport.tls import (
    DEFAULT_CONTROL_PORT,
    DEFAULT_DATA_PORT,
    FrameClient,
    client_context,
    parse_address,
)
from siterecovery.dataplane.wire import FrameType, decode_json

__all__ = ["connect_remote", "query_status", "bundle_paths", "certificate_name"]

_clients: dict[tuple[Any, ...], FrameClient] = {}
_clients_lock = threading.Lock()


def bundle_paths(directory: Path) -> tuple[Path, Path, Path]:
    """``(cert.pem, key.pem, ca.pem)`` of a certificate bundle directory."""
    d = Path(directory)
    return d / "cert.pem", d / "key.pem", d / "ca.pem"


def certificate_name(cert_pem: Path) -> str:
    """The common name of a PEM certificate (an agent's identity)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(Path(cert_pem).read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _client(vault_root: Path, settings: RemoteSettings) -> FrameClient:
    """One connection pool per (vault, settings), reused by every replication cycle."""
    key = (str(vault_root), *sorted(settings.to_json().items()))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            host, port = parse_address(settings.data, DEFAULT_DATA_PORT)
            ctx = client_context(*bundle_paths(settings.certs_dir(vault_root)))
            limiter = TokenBucket(BandwidthSchedule.parse(settings.bandwidth)) if settings.bandwidth else None
            client = FrameClient(
                host, port, ctx, settings.agent, limiter=limiter, io_timeout=settings.flush_timeout_s + 60
            )
            _clients[key] = client
        return client


def connect_remote(vault_root: Path, settings: RemoteSettings) -> RemoteProcessServer:
    """A process server for one replication cycle (sharing the vault's connection pool)."""
    return RemoteProcessServer(_client(vault_root, settings), flush_timeout=settings.flush_timeout_s)


def query_status(
    address: str, bundle_dir: Path, *, control: bool = True, timeout: float = 10.0
) -> dict[str, Any]:
    """A process server's status (control port by default), authenticated with a bundle."""
    host, port = parse_address(address, DEFAULT_CONTROL_PORT if control else DEFAULT_DATA_PORT)
    cert, key, ca = bundle_paths(bundle_dir)
    client = FrameClient(
        host,
        port,
        client_context(cert, key, ca),
        certificate_name(cert),
        connect_timeout=timeout,
        io_timeout=timeout,
        retry_for=0,
    )
    try:
        return decode_json(client.call(FrameType.STATUS, b"", FrameType.STATUS_REPLY).body)
    finally:
        client.close()
