"""Rendering for the CLI: Rich tables for people, ``--json`` for programs, one error style."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["-" if v is None else str(v) for v in r])
    console.print(t)


def listing(
    data: list[dict[str, Any]],
    as_json: bool,
    title: str,
    columns: Sequence[str],
    row: Callable[[dict[str, Any]], Sequence[Any]],
) -> None:
    if as_json:
        emit_json(data)
    elif not data:
        console.print(f"[dim]no {title.lower()}[/dim]")
    else:
        table(title, columns, (row(d) for d in data))


def follow_job(vault: Any, job_id: str, *, quiet: bool = False) -> dict[str, Any]:
    """Show a job's progress bar until it ends; return its final record."""
    from siterecovery.control.jobs import wait_for

    if quiet:
        return wait_for(vault, job_id)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=err_console,
        transient=False,
    ) as progress:
        task = progress.add_task(job_id, total=1.0, detail="")

        def update(info: dict[str, Any]) -> None:
            step = next((s["name"] for s in info["steps"] if s["state"] == "Running"), info["state"])
            progress.update(
                task,
                completed=info["progress"],
                description=f"{info['kind']} {info['target']}",
                detail=f"{step}: {info['detail'] or ''}",
            )

        final = wait_for(vault, job_id, update)
        time.sleep(0.05)
    return final
