"""``siterecovery``: the command line. Each command validates, calls one handler, renders."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from siterecovery.entrypoints.cli import (
    appliance_cmd,
    datastore_cmd,
    demo_cmd,
    failover_cmd,
    job_cmd,
    network_cmd,
    policy_cmd,
    replication_cmd,
    site_cmd,
    test_failover_cmd,
    vault_cmd,
    worker_cmd,
)
from siterecovery.entrypoints.cli.context import VaultOption
from siterecovery.entrypoints.cli.render import err_console
from siterecovery.errors import SiteRecoveryError

app = typer.Typer(
    name="siterecovery",
    help="Self-hosted site recovery: replicate machines' disks, keep recovery points, drill and fail over.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(ctx: typer.Context, vault: Path = VaultOption) -> None:
    ctx.obj = {"vault": vault}


app.add_typer(vault_cmd.app, name="vault")
app.add_typer(site_cmd.app, name="site")
app.add_typer(site_cmd.machines, name="machine")
app.add_typer(policy_cmd.app, name="policy")
app.add_typer(replication_cmd.app, name="replication")
replication_cmd.app.command("settings")(network_cmd.settings)
replication_cmd.app.command("nic")(network_cmd.nic)
replication_cmd.app.command("update")(network_cmd.update)
app.add_typer(network_cmd.app, name="network")
app.add_typer(network_cmd.sizes, name="size")
app.command("status")(replication_cmd.status)
app.add_typer(replication_cmd.points, name="point")
app.add_typer(test_failover_cmd.app, name="test-failover")
app.add_typer(failover_cmd.app, name="failover")
app.command("reprotect")(failover_cmd.reprotect)
app.command("failback")(failover_cmd.failback)
app.add_typer(failover_cmd.migration, name="migration")
app.add_typer(job_cmd.app, name="job")
app.add_typer(datastore_cmd.app, name="datastore")
app.add_typer(worker_cmd.app, name="worker")
app.command("demo")(demo_cmd.demo)
app.add_typer(appliance_cmd.app, name="appliance")
app.add_typer(appliance_cmd.process_server, name="process-server")


def main() -> None:
    try:
        app(standalone_mode=False)
    except SiteRecoveryError as err:
        # Escaped: messages quote user input and TOML ("[[machine.disk]]") that Rich would take
        # as markup. Not wrapped: scripts grep these lines, and a path must not break in two.
        err_console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except (typer.Exit, SystemExit) as err:
        code = getattr(err, "exit_code", None)
        if code is None:
            code = getattr(err, "code", 0)
        sys.exit(code or 0)
    except typer.TyperException as err:  # usage errors (Typer's own click raises these)
        show = getattr(err, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"error: {escape(str(err))}", soft_wrap=True)
        sys.exit(err.exit_code)
