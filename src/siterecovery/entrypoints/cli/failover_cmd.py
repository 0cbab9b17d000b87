"""``siterecovery failover|reprotect|failback|migration``: moving a machine between sites."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from siterecovery.control import failover
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console
from siterecovery.entrypoints.cli.replication_cmd import finish_job

app = typer.Typer(
    help="Fail a protected machine over to the other site, change its point, cancel or commit.",
    no_args_is_help=True,
)
migration = typer.Typer(help="One-way moves: failover, commit and stop replicating.", no_args_is_help=True)

WAIT = typer.Option(True, help="Follow the job until it ends.")
JSON = typer.Option(False, "--json", help="Print the job record as JSON.")


def _run(
    ctx: typer.Context,
    request: Callable[..., dict[str, Any]],
    args: tuple[Any, ...],
    wait: bool,
    json_out: bool,
    say: Callable[[dict[str, Any], dict[str, Any]], str],
    **kw: Any,
) -> None:
    """Queue the operation's job, follow it (unless --no-wait), say how it ended."""
    vault = get_vault(ctx)
    info = request(vault, *args, **kw)
    final = finish_job(vault, info["job"], wait, json_out, info)
    if wait and not json_out:
        console.print(say(info, final.get("result") or {}))


def _failed_over(item: str, then: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    return lambda _i, r: f"{item} failed over to {r.get('point_id')} in {r.get('rto_seconds')} s; {then}"


@app.command("planned")
def planned(ctx: typer.Context, item: str, wait: bool = WAIT, json_out: bool = JSON) -> None:
    """Planned failover, no data loss: stop the source's writers, final sync, start the machine
    at the other site. If a step fails nothing changes there and the source runs again."""
    then = (
        f"commit with 'siterecovery failover commit {item}' or cancel with "
        f"'siterecovery failover cancel {item}'"
    )
    _run(ctx, failover.request_failover, (item,), wait, json_out, _failed_over(item, then), planned=True)


@app.command("unplanned")
def unplanned(
    ctx: typer.Context,
    item: str,
    point: str = typer.Option(
        "latest",
        help="latest (process pending data first), latest-processed, latest-app, or a point id.",
    ),
    shutdown_source: bool = typer.Option(
        True, help="Try to stop the source's writers first (failover continues if that fails)."
    ),
    wait: bool = WAIT,
    json_out: bool = JSON,
) -> None:
    """Unplanned failover to a recovery point; works when the source site cannot be reached."""
    then = f"commit with 'siterecovery failover commit {item}'"
    _run(
        ctx,
        failover.request_failover,
        (item,),
        wait,
        json_out,
        _failed_over(item, then),
        planned=False,
        point=point,
        shutdown_source=shutdown_source,
    )


@app.command("change-point")
def change_point(
    ctx: typer.Context,
    item: str,
    point: str = typer.Option(..., help="latest, latest-app, or a point id."),
    wait: bool = WAIT,
    json_out: bool = JSON,
) -> None:
    """Rebuild the failed-over machine from another recovery point (before commit)."""
    _run(
        ctx,
        failover.request_change_point,
        (item, point),
        wait,
        json_out,
        lambda i, _r: f"{item} now runs from {i['point_id']}",
    )


@app.command("cancel")
def cancel(ctx: typer.Context, item: str, wait: bool = WAIT, json_out: bool = JSON) -> None:
    """Cancel a planned failover: remove the machine at the target, start the source again."""
    _run(
        ctx,
        failover.request_cancel,
        (item,),
        wait,
        json_out,
        lambda _i, _r: f"failover of {item} cancelled; replication resumes as before",
    )


@app.command("commit")
def commit(ctx: typer.Context, item: str, wait: bool = WAIT, json_out: bool = JSON) -> None:
    """Make the failover final; the item's other recovery points are released."""
    _run(
        ctx,
        failover.request_commit,
        (item,),
        wait,
        json_out,
        lambda _i, _r: f"failover of {item} committed; protect it again with 'siterecovery reprotect {item}'",
    )


def reprotect(ctx: typer.Context, item: str, wait: bool = WAIT, json_out: bool = JSON) -> None:
    """Replicate in the other direction, using the disks at the other site as the seed."""
    _run(
        ctx,
        failover.request_reprotect,
        (item,),
        wait,
        json_out,
        lambda i, r: (
            f"{item} is protected ({i['direction']}); compared {r.get('bytes_compared', 0)} "
            f"bytes, sent {r.get('bytes_sent', 0)} of {r.get('disk_bytes', 0)}"
        ),
    )


def failback(
    ctx: typer.Context,
    item: str,
    planned: bool = typer.Option(True, help="Planned (no data loss); --no-planned fails back to --point."),
    point: str = typer.Option("latest", help="For an unplanned failback: the point."),
    wait: bool = WAIT,
    json_out: bool = JSON,
) -> None:
    """Fail back to the primary site (a failover in the reverse direction)."""
    _run(
        ctx,
        failover.request_failback,
        (item,),
        wait,
        json_out,
        lambda _i, r: (
            f"{item} runs at the primary site again from {r.get('point_id')}; commit with "
            f"'siterecovery failover commit {item}', then 'siterecovery reprotect {item}'"
        ),
        planned=planned,
        point=point,
    )


@migration.command("complete")
def complete(ctx: typer.Context, item: str, wait: bool = WAIT, json_out: bool = JSON) -> None:
    """Complete a migration: (planned failover and commit, when still Protected) then stop
    replicating; the machine stays at the recovery site."""
    _run(
        ctx,
        failover.request_complete_migration,
        (item,),
        wait,
        json_out,
        lambda _i, _r: f"{item} is migrated; replication stopped",
    )
