"""The vault the CLI works on (``--vault`` / ``SITERECOVERY_VAULT``), opened once per command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from siterecovery.control.vault import DEFAULT_VAULT, Vault, open_vault

VaultOption = typer.Option(
    None, "--vault", envvar="SITERECOVERY_VAULT", help=f"Vault directory (default {DEFAULT_VAULT})."
)


def vault_path(ctx: typer.Context) -> Path:
    root = ctx.find_root()
    obj: dict[str, Any] = root.obj or {}
    return Path(obj.get("vault") or DEFAULT_VAULT)


def get_vault(ctx: typer.Context) -> Vault:
    root = ctx.find_root()
    root.obj = root.obj or {}
    if "opened" not in root.obj:
        root.obj["opened"] = open_vault(vault_path(ctx))
        root.call_on_close(root.obj["opened"].close)
    vault: Vault = root.obj["opened"]
    return vault
