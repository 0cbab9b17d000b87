"""``python -m siterecovery.entrypoints.process_server``: the process-server role of an appliance.

Listens on the data port (agents' chunks, default 9443) and the control port (status and
health, default 443), both TLS with certificates issued by the vault
(``siterecovery appliance register NAME --out DIR``), spools what agents send to a bounded local
cache and drains it into the datastore (a local directory or ``s3://BUCKET/PREFIX?endpoint=URL``).
The process server needs no vault key: chunks arrive encrypted and are stored as they are.

Runs until SIGTERM or SIGINT; SIGKILL loses nothing that was acknowledged (the spool is
replayed at the next start).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.adapters.transport import certificate_name
from siterecovery.adapters.transport.server import ProcessServerService
from siterecovery.adapters.transport.tls import (
    DEFAULT_CONTROL_PORT,
    DEFAULT_DATA_PORT,
    FrameServer,
    parse_address,
    server_context,
)
from siterecovery.allocator import tune_for_streaming
from siterecovery.control.certificates import Bundle
from siterecovery.dataplane.spool import Spool
from siterecovery.errors import InvalidInput, NotFound, SiteRecoveryError
from siterecovery.ports.chunk_store import ChunkStore, ObjectMissing

log = logging.getLogger("siterecovery.process_server")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``2G``, ``512M``, ``1.5GiB``, ``1048576`` -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise InvalidInput(f"size {text!r} is not valid: use a number with an optional K, M, G or T suffix.")
    factor = 1024 ** " KMGT".index((m.group(2) or " ").upper())
    return int(float(m.group(1)) * factor)


def open_chunk_store(location: str) -> ChunkStore:
    """The chunk store of an existing datastore (no key needed: chunks are stored as sent)."""
    if location.startswith("s3://"):
        from siterecovery.adapters.chunk_stores.s3 import S3Location, open_stores

        chunks, objects = open_stores(S3Location.from_url(location))
        try:
            objects.get("config")
        except ObjectMissing as err:
            raise NotFound(
                kind="datastore", name=location, hint=" Create it with 'siterecovery vault create'."
            ) from err
        return chunks
    from siterecovery.adapters.chunk_stores.local import LocalChunkStore

    path = Path(location).expanduser()
    if not (path / "objects" / "config").is_file():
        raise NotFound(
            kind="datastore",
            name=str(path),
            hint=" Point --datastore at the directory a vault created (it holds objects/config).",
        )
    return LocalChunkStore(path)


@dataclass
class ProcessServerConfig:
    datastore: str
    spool: Path
    spool_limit: int
    certs: Path
    data: str = f"0.0.0.0:{DEFAULT_DATA_PORT}"
    control: str = f"0.0.0.0:{DEFAULT_CONTROL_PORT}"
    name: str | None = None  # default: the certificate's common name


class RunningProcessServer:
    """A started process server: ``data_address``, ``control_address``, ``status()``, ``close()``."""

    def __init__(self, cfg: ProcessServerConfig) -> None:
        bundle = Bundle.at(cfg.certs).check()
        cert, key, ca = bundle.cert, bundle.key, bundle.ca
        name = cfg.name or certificate_name(cert)
        ctx = server_context(cert, key, ca)
        store = open_chunk_store(cfg.datastore)
        self.spool = Spool(cfg.spool, store, cfg.spool_limit)
        self.service = ProcessServerService(self.spool, name, max_batch=min(4 << 20, cfg.spool_limit // 4))
        try:
            dhost, dport = parse_address(cfg.data, DEFAULT_DATA_PORT, listen=True)
            chost, cport = parse_address(cfg.control, DEFAULT_CONTROL_PORT, listen=True)
            self.data_server = FrameServer(
                dhost, dport, ctx, self.service.handle_data, name=name, welcome=self.service.welcome()
            ).start()
            try:
                self.control_server = FrameServer(
                    chost, cport, ctx, self.service.handle_control, name=name
                ).start()
            except BaseException:
                self.data_server.close()
                raise
        except BaseException:
            self.spool.close()
            raise
        self.data_address = self.data_server.address
        self.control_address = self.control_server.address
        log.info(
            "process server %s: data on %s:%d, control on %s:%d, spool %s",
            name,
            *self.data_address,
            *self.control_address,
            cfg.spool,
        )

    def status(self) -> dict[str, Any]:
        return self.service.status()

    def close(self) -> None:
        self.data_server.close()
        self.control_server.close()
        self.spool.close()


def serve(cfg: ProcessServerConfig, stop: threading.Event, ready: Any = None) -> None:
    """Run until ``stop`` is set; ``ready(server)`` is called once both ports listen."""
    tune_for_streaming()
    server = RunningProcessServer(cfg)
    try:
        if ready is not None:
            ready(server)
        stop.wait()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="siterecovery-process-server")
    parser.add_argument(
        "--datastore", required=True, help="datastore directory or s3://BUCKET/PREFIX?endpoint=URL"
    )
    parser.add_argument("--spool", required=True, type=Path, help="spool (local cache) directory")
    parser.add_argument("--spool-limit", default="2G", help="spool size limit, e.g. 2G")
    parser.add_argument(
        "--certs", required=True, type=Path, help="bundle directory: cert.pem, key.pem, ca.pem"
    )
    parser.add_argument("--data", default=f"0.0.0.0:{DEFAULT_DATA_PORT}", help="data address HOST:PORT")
    parser.add_argument(
        "--control", default=f"0.0.0.0:{DEFAULT_CONTROL_PORT}", help="control address HOST:PORT"
    )
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        cfg = ProcessServerConfig(
            datastore=args.datastore,
            spool=args.spool,
            spool_limit=parse_size(args.spool_limit),
            certs=args.certs,
            data=args.data,
            control=args.control,
            name=args.name,
        )

        def ready(server: RunningProcessServer) -> None:
            print(
                f"listening data={server.data_address[0]}:{server.data_address[1]} "
                f"control={server.control_address[0]}:{server.control_address[1]}",
                flush=True,
            )

        serve(cfg, stop, ready)
    except SiteRecoveryError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
