"""``siterecovery policy``: replication policies."""

from __future__ import annotations

import typer

from siterecovery.control import policies
from siterecovery.domain import policy as rules
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json, listing

app = typer.Typer(
    help="Replication policies (creating one also creates its '-failback' twin).", no_args_is_help=True
)

RANGE = {k: rules.describe_range(*v) for k, v in rules.RANGES.items()}
RPO = typer.Option(None, "--rpo-threshold", help=f"Alert when RPO exceeds this ({RANGE['rpo-threshold']}).")
RET = typer.Option(None, "--retention", help=f"How long recovery points are kept ({RANGE['retention']}).")
CRASH = typer.Option(
    None, "--crash-frequency", help=f"Crash-consistent point frequency ({RANGE['crash-frequency']})."
)
APP = typer.Option(
    None, "--app-frequency", help=f"App-consistent point frequency (0 = off, or {RANGE['app-frequency']})."
)


def _row(d: dict) -> list:
    return [
        d["name"],
        d["rpo_threshold"],
        d["retention"],
        d["crash_consistent_frequency"],
        d["app_consistent_frequency"],
        d["failback_twin_of"] or "",
        d["items"],
    ]


COLUMNS = [
    "name",
    "RPO threshold",
    "retention",
    "crash-consistent",
    "app-consistent",
    "failback twin of",
    "items",
]


@app.command("create")
def create(
    ctx: typer.Context,
    name: str,
    rpo_threshold: str = RPO,
    retention: str = RET,
    crash_frequency: str = CRASH,
    app_frequency: str = APP,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Create a policy and its failback twin."""
    made = policies.create_policy(
        get_vault(ctx),
        name,
        rpo_threshold=rpo_threshold,
        retention=retention,
        crash_frequency=crash_frequency,
        app_frequency=app_frequency,
    )
    listing(made, json_out, "Policies created", COLUMNS, _row)


@app.command("update")
def update(
    ctx: typer.Context,
    name: str,
    rpo_threshold: str = RPO,
    retention: str = RET,
    crash_frequency: str = CRASH,
    app_frequency: str = APP,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Change a policy; every item that uses it follows from its next cycle."""
    d = policies.update_policy(
        get_vault(ctx),
        name,
        rpo_threshold=rpo_threshold,
        retention=retention,
        crash_frequency=crash_frequency,
        app_frequency=app_frequency,
    )
    if json_out:
        emit_json(d)
    else:
        console.print(f"policy {name} updated; applies to {d['items']} item(s)")


@app.command("list")
def list_(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """List policies."""
    listing(policies.list_policies(get_vault(ctx)), json_out, "Policies", COLUMNS, _row)


@app.command("delete")
def delete(ctx: typer.Context, name: str) -> None:
    """Delete an unused policy (and its failback twin)."""
    policies.delete_policy(get_vault(ctx), name)
    console.print(f"policy {name} deleted")
