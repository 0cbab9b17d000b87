"""``siterecovery worker``: the vault's background worker (started automatically when needed)."""

from __future__ import annotations

import typer

from siterecovery.control import worker as w
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json

app = typer.Typer(
    help="The background worker that runs jobs and the replication schedule.", no_args_is_help=True
)


@app.command("start")
def start(ctx: typer.Context) -> None:
    """Start the worker in the background (no-op if it runs)."""
    console.print(f"worker running, pid {w.ensure_worker(get_vault(ctx))}")


@app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop the worker (running cycles finish first)."""
    console.print("worker stopped" if w.stop_worker(get_vault(ctx)) else "worker was not running")


@app.command("status")
def status(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Whether the worker runs."""
    pid = w.worker_pid(get_vault(ctx))
    if json_out:
        emit_json({"running": pid is not None, "pid": pid})
    else:
        console.print(f"worker running, pid {pid}" if pid else "worker not running")


@app.command("run")
def run(ctx: typer.Context) -> None:
    """Run the worker in the foreground (for service managers such as systemd)."""
    import logging
    import signal

    from siterecovery.control import handlers  # noqa: F401

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = w.Worker(get_vault(ctx))
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    worker.run_forever()


__all__ = ["app", "emit_json"]
