"""The one place that wires adapters into the core: sources for machines, the agent, the process server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.process_server import ProcessServer
from siterecovery.dataplane.replicate import Agent
from siterecovery.errors import InvalidInput
from siterecovery.ports.source import Source


def source_for(site_kind: str, spec: dict[str, Any], work_dir: Path) -> Source:
    """The Source adapter that reads a machine of a site of this kind."""
    if site_kind == "qemu":
        from siterecovery.adapters.sources.qemu import QemuSource

        work_dir.mkdir(parents=True, exist_ok=True)
        return QemuSource(
            qmp_socket=spec["qmp"],
            disks={d["name"]: d["node"] for d in spec["disks"]},
            work_dir=work_dir,
            nbd_socket=spec.get("nbd"),
        )
    if site_kind == "raw":
        from siterecovery.adapters.sources.raw import RawSource

        return RawSource({d["name"]: Path(d["path"]) for d in spec["disks"]})
    raise InvalidInput(f"site kind {site_kind!r} has no source adapter; supported: qemu, raw.")


def embedded_agent(datastore: Datastore, threads: int = 3) -> Agent:
    """Agent and process server in one process (embedded mode)."""
    return Agent(datastore.codec, ProcessServer(datastore.chunks), threads=threads)
