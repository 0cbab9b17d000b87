"""The one place that wires adapters into the core: sources for machines, the agent, the process server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.process_server import ProcessServer
from siterecovery.dataplane.replicate import DEFAULT_THREADS, Agent
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


def embedded_agent(datastore: Datastore, threads: int = DEFAULT_THREADS) -> Agent:
    """Agent and process server in one process (embedded mode)."""
    return Agent(datastore.codec, ProcessServer(datastore.chunks), threads=threads)


def agent_for(vault: Any, threads: int = DEFAULT_THREADS) -> tuple[Agent, Datastore]:
    """The agent a replication cycle of ``vault`` uses, and the datastore it writes through.

    Embedded mode (the default): the embedded agent and the vault's datastore. When the vault
    sends through a process server (``<vault>/process-server.json``, see
    ``siterecovery appliance use``): an agent whose process server is remote, and a view of the
    datastore whose chunk store is that process server (index pages, base index reads, and the
    flush before a manifest go over the wire) while manifests are written to the vault's
    datastore by the control plane as always.
    """
    from siterecovery.adapters.transport.config import load_settings

    datastore: Datastore = vault.datastore
    settings = load_settings(vault.root)
    if settings is None:
        return embedded_agent(datastore, threads), datastore
    from siterecovery.adapters.transport import connect_remote

    remote = connect_remote(vault.root, settings)
    view = Datastore(remote, datastore.objects, datastore.key, datastore.chunk_size)
    view.page_cache = datastore.page_cache  # content-addressed: safe to share
    return Agent(view.codec, remote, threads=threads), view  # type: ignore[arg-type]
