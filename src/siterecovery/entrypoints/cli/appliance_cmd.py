"""``siterecovery appliance`` and ``siterecovery process-server``: distributed replication.

``appliance register`` issues a certificate bundle from the vault's CA, ``appliance use`` makes
the vault's agents send through a process server, ``appliance embedded`` goes back to embedded
mode, ``appliance status`` asks the configured process server for its health.
``process-server run`` runs the process-server role (on the appliance's host),
``process-server status`` asks any process server for its health.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import typer

from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json, size
from siterecovery.errors import InvalidInput

app = typer.Typer(
    help="Appliances: certificates and the process server the vault sends through.", no_args_is_help=True
)
process_server = typer.Typer(
    help="The process-server role: receives, spools and stores agents' data.", no_args_is_help=True
)


@app.command("register")
def register(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Appliance (or agent) name; the certificate's common name."),
    out: Path = typer.Option(..., "--out", help="Directory for cert.pem, key.pem (0600) and ca.pem."),
    host: list[str] = typer.Option([], "--host", help="Host name or IP agents connect to (repeatable)."),
    role: str = typer.Option("process-server", "--role", help="process-server or agent."),
    days: int = typer.Option(825, "--days", help="Certificate lifetime in days."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Issue a certificate bundle signed by the vault's CA."""
    from siterecovery.control.certificates import ROLES, VaultCA, write_bundle

    if role not in ROLES:
        raise InvalidInput(f"role {role!r} is not allowed; use one of {', '.join(ROLES)}.")
    vault = get_vault(ctx)
    ca = VaultCA.load_or_create(vault.root, vault.name)
    hosts = list(host) or (["localhost", "127.0.0.1"] if role != "agent" else [])
    issued = ca.issue(name, "agent" if role == "agent" else "process-server", hosts=hosts, days=days)
    bundle = write_bundle(out, issued)
    data = {
        "name": name,
        "role": role,
        "serial": f"{issued.serial:x}",
        "cert": str(bundle.cert),
        "key": str(bundle.key),
        "ca": str(bundle.ca),
    }
    if json_out:
        emit_json(data)
    else:
        console.print(f"issued {role} certificate for {name!r} (serial {data['serial']}) into {out}")


@app.command("use")
def use(
    ctx: typer.Context,
    data: str = typer.Argument(
        ..., help="The process server's data address HOST[:PORT] (default port 9443)."
    ),
    control: str = typer.Option(
        None, "--control", help="Its control address HOST[:PORT] (default port 443)."
    ),
    bandwidth: str = typer.Option(None, "--bandwidth", help="MB/s limit, e.g. '100,08:00-18:00=10'."),
    flush_timeout: float = typer.Option(
        120.0, "--flush-timeout", help="Seconds a point waits for the datastore."
    ),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Replicate through a process server over TLS (issues the vault's agent certificate)."""
    from siterecovery.control.certificates import use_process_server

    vault = get_vault(ctx)
    result = use_process_server(
        vault.root, vault.name, data, control=control, bandwidth=bandwidth, flush_timeout_s=flush_timeout
    )
    if json_out:
        emit_json(result)
    else:
        console.print(f"agents of vault {vault.name!r} now send through the process server at {data}")


@app.command("embedded")
def embedded(ctx: typer.Context) -> None:
    """Go back to embedded mode (agent and process server in the worker's process)."""
    from siterecovery.adapters.transport.config import clear_settings

    changed = clear_settings(get_vault(ctx).root)
    console.print("embedded mode" + ("" if changed else " (it was already)"))


@app.command("status")
def status(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Health of the process server the vault sends through."""
    from siterecovery.adapters.transport import query_status
    from siterecovery.adapters.transport.config import load_settings

    vault = get_vault(ctx)
    settings = load_settings(vault.root)
    if settings is None:
        data: dict[str, Any] = {"mode": "embedded"}
    else:
        address = settings.control or settings.data
        data = {
            "mode": "process-server",
            "address": address,
            **query_status(address, settings.certs_dir(vault.root), control=settings.control is not None),
        }
    _render_status(data, json_out)


@process_server.command("run")
def run(
    ctx: typer.Context,
    certs: Path = typer.Option(..., "--certs", help="Bundle directory from 'appliance register'."),
    spool: Path = typer.Option(..., "--spool", help="Spool (local cache) directory."),
    spool_limit: str = typer.Option("2G", "--spool-limit", help="Spool size limit, e.g. 2G."),
    datastore: str = typer.Option(
        None, "--datastore", help="Datastore directory or s3:// URL (default: the vault's)."
    ),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    data_port: int = typer.Option(9443, "--data-port"),
    control_port: int = typer.Option(443, "--control-port"),
    name: str = typer.Option(None, "--name", help="Name to report (default: the certificate's)."),
) -> None:
    """Run the process server in the foreground until SIGTERM / Ctrl-C."""
    import logging

    from siterecovery.entrypoints.process_server import ProcessServerConfig, parse_size, serve

    location = datastore or get_vault(ctx).datastore_location
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ProcessServerConfig(
        datastore=location,
        spool=spool,
        spool_limit=parse_size(spool_limit),
        certs=certs,
        data=f"{_bracket(host)}:{data_port}",
        control=f"{_bracket(host)}:{control_port}",
        name=name,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def ready(server: Any) -> None:
        console.print(
            f"process server listening: data {server.data_address[0]}:{server.data_address[1]}, "
            f"control {server.control_address[0]}:{server.control_address[1]}"
        )

    serve(cfg, stop, ready)


@process_server.command("status")
def ps_status(
    address: str = typer.Argument(..., help="Control address HOST[:PORT] (default port 443)."),
    certs: Path = typer.Option(
        ..., "--certs", help="A bundle issued by the same vault (e.g. <vault>/agent)."
    ),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Health of a process server: spool backlog, oldest age, datastore errors."""
    from siterecovery.adapters.transport import query_status

    _render_status({"address": address, **query_status(address, certs)}, json_out)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _render_status(data: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(data)
        return
    if data.get("mode") == "embedded":
        console.print("embedded mode: agent and process server run in the worker")
        return
    sp = data.get("spool", {})
    console.print(f"process server {data.get('name')} at {data.get('address')}: {sp.get('state')}")
    console.print(
        f"  backlog {sp.get('backlog_chunks')} chunks ({size(sp.get('backlog_bytes'))}), oldest "
        f"{sp.get('oldest_age_s')}s; spool {size(sp.get('spool_bytes'))} of {size(sp.get('limit_bytes'))}"
    )
    if sp.get("datastore_error"):
        console.print(f"  [red]datastore error[/red]: {sp['datastore_error']}")
    for p in sp.get("problems", []):
        console.print(f"  [red]problem[/red]: {p}")
