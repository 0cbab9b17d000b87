"""``siterecovery vault``: create and describe the vault."""

from __future__ import annotations

import typer

from siterecovery.control.vault import create_vault
from siterecovery.entrypoints.cli.context import get_vault, vault_path
from siterecovery.entrypoints.cli.render import console, emit_json

app = typer.Typer(help="Create and inspect the vault.", no_args_is_help=True)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str,
    datastore: str = typer.Option(
        None,
        help="Datastore directory (default: <vault>/datastore) or s3://BUCKET/PREFIX?endpoint=URL "
        "(credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).",
    ),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Create a vault: database, vault key (0600) and an empty datastore."""
    vault = create_vault(vault_path(ctx), name, datastore)
    info = {
        "name": vault.name,
        "path": str(vault.root),
        "datastore": str(vault.datastore_path),
        "key_fingerprint": vault.key.fingerprint(),
    }
    vault.close()
    if json_out:
        emit_json(info)
    else:
        console.print(f"vault [bold]{name}[/bold] created at {vault.root}")
        console.print(
            f"  datastore {vault.datastore_path}; key {vault.root / 'vault.key'} "
            "(back it up: without it the recovery points cannot be read)"
        )


@app.command("show")
def show(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """Show the vault."""
    vault = get_vault(ctx)
    info = {
        "name": vault.name,
        "path": str(vault.root),
        "datastore": str(vault.datastore_path),
        "key_fingerprint": vault.key.fingerprint(),
    }
    if json_out:
        emit_json(info)
    else:
        for k, v in info.items():
            console.print(f"{k}: {v}")
