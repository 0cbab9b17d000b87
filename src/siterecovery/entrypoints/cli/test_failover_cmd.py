"""``siterecovery test-failover``: drills that never touch production."""

from __future__ import annotations

import typer

from siterecovery.control import test_failover
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console
from siterecovery.entrypoints.cli.replication_cmd import finish_job

app = typer.Typer(help="Test failover (drill) and cleanup.", no_args_is_help=True)


@app.command("start")
def start(
    ctx: typer.Context,
    item: str,
    point: str = typer.Option("latest", help="latest, latest-app, or a recovery point id."),
    wait: bool = typer.Option(True),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Create '<item>-test' at the recovery site from a recovery point; replication continues."""
    vault = get_vault(ctx)
    info = test_failover.start_test_failover(vault, item, point)
    final = finish_job(vault, info["job"], wait, json_out, info)
    if wait and not json_out:
        console.print(
            f"{item}-test is running at the recovery site from {info['point_id']} "
            f"({info['point_type']}); clean up with 'siterecovery test-failover cleanup {item}'"
        )
        del final


@app.command("cleanup")
def cleanup(
    ctx: typer.Context,
    item: str,
    notes: str = typer.Option("", help="Notes on the drill."),
    wait: bool = typer.Option(True),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Remove everything the test failover made and record notes."""
    vault = get_vault(ctx)
    info = test_failover.cleanup_test_failover(vault, item, notes)
    finish_job(vault, info["job"], wait, json_out, info)
    if wait and not json_out:
        console.print(f"test failover of {item} cleaned up")
