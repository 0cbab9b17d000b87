"""``siterecovery job``: jobs and their steps."""

from __future__ import annotations

import typer

from siterecovery.control import jobs
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json, listing, table, when

app = typer.Typer(help="Jobs (durable operations with steps).", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    target: str = typer.Option(None, help="Only jobs on this item."),
    limit: int = typer.Option(50),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Recent jobs, newest first."""
    listing(
        jobs.list_jobs(get_vault(ctx), target=target, limit=limit),
        json_out,
        "Jobs",
        ["id", "kind", "target", "state", "progress", "started", "duration", "error"],
        lambda d: [
            d["id"],
            d["kind"],
            d["target"],
            d["state"],
            f"{d['progress']:.0%}",
            when(d["started_at"]),
            f"{d['duration_s']:.1f}s" if d["duration_s"] is not None else "-",
            d["error"] or "",
        ],
    )


@app.command("show")
def show(ctx: typer.Context, job_id: str, json_out: bool = typer.Option(False, "--json")) -> None:
    """One job with its steps."""
    d = jobs.show_job(get_vault(ctx), job_id)
    if json_out:
        emit_json(d)
        return
    console.print(f"job {d['id']}: {d['kind']} {d['target']} - {d['state']} ({d['progress']:.0%})")
    if d["error"]:
        console.print(f"[red]error:[/red] {d['error']}")
    table(
        None,
        ["step", "state", "started", "ended", "detail"],
        (
            [s["name"], s["state"], when(s["started_at"]), when(s["ended_at"]), s["detail"] or ""]
            for s in d["steps"]
        ),
    )
    if d["result"]:
        for k, v in d["result"].items():
            console.print(f"  {k}: {v}")
