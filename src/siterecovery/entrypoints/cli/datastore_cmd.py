"""``siterecovery datastore``: verify and garbage-collect the datastore."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer
from rich.markup import escape
from rich.progress import Progress

from siterecovery.control.maintenance import run_gc
from siterecovery.domain.durations import parse_duration
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json, err_console, size
from siterecovery.errors import DatastoreError

app = typer.Typer(help="The datastore of recovery points.", no_args_is_help=True)


@app.command("verify")
def verify(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Check that every chunk of every retained point is present and decrypts to its id."""
    vault = get_vault(ctx)
    with Progress(console=err_console, transient=True, disable=json_out) as progress:
        task = progress.add_task("verifying", total=None)
        report = vault.datastore.verify(
            progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    problems = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(p) for p in report.problems]
    data = {
        "ok": report.ok,
        "points_checked": report.points_checked,
        "chunks_checked": report.chunks_checked,
        "bytes_checked": report.bytes_checked,
        "problems": problems,
    }
    if json_out:
        emit_json(data)
    else:
        for p in problems:
            console.print(f"[red]problem[/red] {escape(_describe(p))}")
        console.print(
            f"{'OK' if report.ok else 'FAILED'}: {report.points_checked} points, "
            f"{report.chunks_checked} chunks, {size(report.bytes_checked)} checked, "
            f"{len(problems)} problem(s)"
        )
    if not report.ok:
        raise DatastoreError(
            f"datastore verification found {len(problems)} problem(s); the first: "
            f"{_describe(problems[0])}. Points with problems cannot be fully recovered; "
            "'siterecovery datastore verify --json' lists them all."
        )


def _describe(p: dict[str, Any]) -> str:
    where = f"point {p['point_id']}"
    if p["disk"]:
        where += f" disk {p['disk']}"
    if p["offset"] is not None:
        where += f" offset {p['offset']}"
    chunk = f" chunk {p['chunk_id']}" if p["chunk_id"] else ""
    return f"{where}:{chunk} {p['reason']}"


@app.command("gc")
def gc(
    ctx: typer.Context,
    grace: str = typer.Option("6h", help="Spare chunks younger than this."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Remove chunks no retained recovery point refers to (mark and sweep with a grace period)."""
    stats = run_gc(get_vault(ctx), parse_duration(grace))
    data = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
    if json_out:
        emit_json(data)
    else:
        console.print(", ".join(f"{k}: {v}" for k, v in data.items()))


@app.command("stats")
def stats(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Chunks and bytes stored."""
    data = get_vault(ctx).datastore.stats()
    if json_out:
        emit_json(data)
    else:
        console.print(", ".join(f"{k}: {size(v) if 'bytes' in k else v}" for k, v in data.items()))
