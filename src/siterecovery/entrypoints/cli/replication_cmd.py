"""``siterecovery replication``, ``status`` and ``point``: protecting machines and watching them."""

from __future__ import annotations

import typer

from siterecovery.control import protection
from siterecovery.control.worker import ensure_worker
from siterecovery.domain.durations import format_duration
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json, follow_job, listing, size, when
from siterecovery.errors import JobFailed

app = typer.Typer(help="Enable and disable replication of machines.", no_args_is_help=True)
points = typer.Typer(help="Recovery points.", no_args_is_help=True)


def finish_job(vault, job_id: str, wait: bool, json_out: bool, extra: dict | None = None) -> dict:
    """Start the worker, then (unless --no-wait) follow the job; a failed job is an error."""
    ensure_worker(vault)
    info = {"job": job_id, **(extra or {})}
    if not wait:
        if json_out:
            emit_json(info)
        else:
            console.print(f"job {job_id} queued; follow it with 'siterecovery job show {job_id}'")
        return info
    final = follow_job(vault, job_id, quiet=json_out)
    if json_out:
        emit_json(final)
    if final["state"] != "Succeeded":
        raise JobFailed(f"job {job_id} {final['state'].lower()}: {final['error']}")
    return final


@app.command("enable")
def enable(
    ctx: typer.Context,
    machine: str,
    policy: str = typer.Option(..., help="Replication policy name."),
    recovery_site: str = typer.Option(..., help="Recovery site name."),
    source_site: str = typer.Option(None, help="Primary site (when the machine name is ambiguous)."),
    exclude_disk: list[str] = typer.Option(None, help="Disk to leave out (repeatable)."),
    wait: bool = typer.Option(True, help="Follow the job (initial replication) until it ends."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Enable replication of a machine: enable protection, initial replication, finalize protection."""
    vault = get_vault(ctx)
    info = protection.enable_replication(
        vault,
        machine,
        policy=policy,
        recovery_site=recovery_site,
        source_site=source_site,
        exclude_disks=exclude_disk,
    )
    finish_job(vault, info["job"], wait, json_out, info)
    if wait and not json_out:
        console.print(
            f"{machine} is protected; replication continues in the background ('siterecovery status')."
        )


@app.command("disable")
def disable(
    ctx: typer.Context,
    item: str,
    keep_points: bool = typer.Option(False, help="Keep the recovery points' data in the datastore."),
    wait: bool = typer.Option(True),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Disable replication: stop it, remove change tracking, remove the item (and its points)."""
    vault = get_vault(ctx)
    info = protection.disable_replication(vault, item, keep_points=keep_points)
    finish_job(vault, info["job"], wait, json_out, info)
    if wait and not json_out:
        console.print(f"replication of {item} disabled")


def status(
    ctx: typer.Context,
    item: str = typer.Argument(None, help="One item (default: all)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Health, RPO, last point and initial replication progress of protected items."""
    data = protection.status(get_vault(ctx), item)

    def row(d: dict) -> list:
        prog = d["initial_replication_progress"]
        return [
            d["name"],
            d["state"],
            d["health"],
            "-" if d["rpo_seconds"] is None else format_duration(round(d["rpo_seconds"])),
            when(d["last_point_at"]),
            "-" if prog is None else f"{prog:.0%}",
            "; ".join(d["health_reasons"]),
        ]

    listing(
        data,
        json_out,
        "Protected items",
        ["item", "state", "health", "RPO", "last point", "initial", "reasons"],
        row,
    )


@points.command("list")
def point_list(ctx: typer.Context, item: str, json_out: bool = typer.Option(False, "--json")) -> None:
    """Recovery points of an item, newest first."""
    listing(
        protection.list_points(get_vault(ctx), item),
        json_out,
        f"Recovery points of {item}",
        ["id", "time", "type", "method", "size", "sent", "stored"],
        lambda d: [
            d["id"],
            when(d["time"]),
            d["type"],
            d["method"],
            size(d["logical_bytes"]),
            size(d["sent_bytes"]),
            size(d["stored_bytes"]),
        ],
    )


@app.command("resync")
def resync(
    ctx: typer.Context,
    item: str,
    wait: bool = typer.Option(True, help="Follow the job until it ends."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Resynchronize: read every disk, send only the chunks that differ from the latest point."""
    vault = get_vault(ctx)
    info = protection.request_resync(vault, item)
    final = finish_job(vault, info["job"], wait, json_out, info)
    if wait and not json_out:
        res = final.get("result") or {}
        console.print(
            f"{item} resynchronized: read {res.get('bytes_read', 0)} bytes, sent {res.get('bytes_sent', 0)}"
        )
