"""``siterecovery site`` and ``siterecovery machine``: sites and their discovered machines."""

from __future__ import annotations

from pathlib import Path

import typer

from siterecovery.control import sites
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json, listing, when

app = typer.Typer(help="Primary and recovery sites.", no_args_is_help=True)
machines = typer.Typer(help="Discovered machines.", no_args_is_help=True)


@app.command("add")
def add(
    ctx: typer.Context,
    name: str,
    kind: str = typer.Option(..., help="qemu (QMP + dirty bitmaps) or raw (image files, block devices)."),
    role: str = typer.Option(..., help="primary or recovery."),
    inventory: Path = typer.Option(None, help="TOML inventory of the site's machines (primary sites)."),
    path: Path = typer.Option(None, help="Directory for recovered machines (recovery sites)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Add a site."""
    info = sites.add_site(get_vault(ctx), name, kind, role, inventory, path)
    if json_out:
        emit_json(info)
    else:
        console.print(f"site [bold]{name}[/bold] added ({role}, {kind})")


@app.command("update")
def update(
    ctx: typer.Context,
    name: str,
    capacity_cpus: str = typer.Option(None, help="CPUs the site can run, or 'unlimited'."),
    capacity_memory: str = typer.Option(
        None, help="Memory the site can run (64G, 65536 MiB), or 'unlimited'."
    ),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Change what a site can run (failovers that would not fit are refused)."""
    from siterecovery.control import networks

    info = networks.update_site_capacity(get_vault(ctx), name, cpus=capacity_cpus, memory=capacity_memory)
    if json_out:
        emit_json(info)
        return

    def cap(value: int | None, unit: str) -> str:
        return "unlimited" if value is None else f"{value}{unit}"

    console.print(
        f"site {name}: capacity {cap(info['capacity_cpus'], ' CPUs')}, "
        f"{cap(info['capacity_memory_mib'], ' MiB')}; in use {info['used_cpus']} CPUs, "
        f"{info['used_memory_mib']} MiB"
    )


@app.command("list")
def list_(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """List sites."""
    listing(
        sites.list_sites(get_vault(ctx)),
        json_out,
        "Sites",
        ["name", "role", "kind", "machines", "inventory / path", "discovered"],
        lambda d: [
            d["name"],
            d["role"],
            d["kind"],
            d["machines"],
            d["inventory"] or d["path"],
            when(d["discovered_at"]),
        ],
    )


@app.command("discover")
def discover(ctx: typer.Context, name: str, json_out: bool = typer.Option(False, "--json")) -> None:
    """Read the site's inventory again and report what changed."""
    report = sites.discover(get_vault(ctx), name)
    if json_out:
        emit_json(report)
        return
    for key in ("added", "changed", "removed"):
        for m in report[key]:
            console.print(f"  {key:8} {m}")
    console.print(
        f"site {name}: {len(report['added'])} added, {len(report['changed'])} changed, "
        f"{len(report['removed'])} removed, {len(report['unchanged'])} unchanged"
    )


@machines.command("list")
def machine_list(
    ctx: typer.Context,
    site: str = typer.Option(None, help="Only this site."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """List discovered machines."""
    listing(
        sites.list_machines(get_vault(ctx), site),
        json_out,
        "Machines",
        ["name", "site", "present", "cpus", "memory", "disks", "nics", "hooks"],
        lambda d: [
            d["name"],
            d["site"],
            d["present"],
            d["cpus"],
            f"{d['memory_mib']} MiB",
            ", ".join(d["disks"]),
            "; ".join(d["nics"]),
            d["hooks"],
        ],
    )
