"""``siterecovery network``, ``network map``, ``size`` and the item settings commands
(``replication settings | nic | update``): target networks, IPs and sizes of failover."""

from __future__ import annotations

from typing import Any

import typer

from siterecovery.control import networks
from siterecovery.entrypoints.cli.context import get_vault
from siterecovery.entrypoints.cli.render import console, emit_json, listing, table

app = typer.Typer(help="Networks of sites, with their subnets.", no_args_is_help=True)
maps = typer.Typer(help="Network mappings: source network -> recovery network (and test network).")
sizes = typer.Typer(help="Machine sizes a site offers (target sizes of failover).", no_args_is_help=True)
app.add_typer(maps, name="map", no_args_is_help=True)

SUBNET_HELP = (
    "Subnet as NAME=CIDR[,gateway=IP][,dns=IP+IP] (repeatable), e.g. default=10.10.0.0/24,dns=10.10.0.53. "
    "The gateway defaults to the first host address."
)


def _subnets_text(d: dict[str, Any]) -> str:
    parts = []
    for s in d["subnets"]:
        extra = f" gw {s['gateway']}" if s["gateway"] else ""
        if s["dns"]:
            extra += f" dns {'+'.join(s['dns'])}"
        parts.append(f"{s['name']} {s['cidr']}{extra} ({s['allocated']} in use)")
    return "; ".join(parts)


@app.command("add")
def add(
    ctx: typer.Context,
    name: str,
    site: str = typer.Option(..., help="Site the network belongs to."),
    subnet: list[str] = typer.Option(..., help=SUBNET_HELP),
    purpose: str = typer.Option("production", help="production, or test (an isolated network for drills)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Add a network with its subnets to a site."""
    info = networks.add_network(get_vault(ctx), name, site=site, subnets=subnet, purpose=purpose)
    if json_out:
        emit_json(info)
    else:
        console.print(f"network [bold]{site}/{name}[/bold] added: {_subnets_text(info)}")


@app.command("list")
def list_(
    ctx: typer.Context,
    site: str = typer.Option(None, help="Only this site."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """List networks, their subnets, and where they are mapped to."""
    listing(
        networks.list_networks(get_vault(ctx), site),
        json_out,
        "Networks",
        ["site", "name", "purpose", "subnets", "mirror of", "mapped to"],
        lambda d: [
            d["site"],
            d["name"],
            d["purpose"],
            _subnets_text(d),
            d["mirror_of"] or "",
            ", ".join(d["mapped_to"]),
        ],
    )


@app.command("delete")
def delete(ctx: typer.Context, name: str, site: str = typer.Option(..., help="Site of the network.")) -> None:
    """Delete a network that no mapping, item or address uses."""
    networks.delete_network(get_vault(ctx), name, site=site)
    console.print(f"network {site}/{name} deleted")


@maps.command("add")
def map_add(
    ctx: typer.Context,
    source: str = typer.Option(..., help="SITE/NETWORK the machines are on."),
    target: str = typer.Option(..., help="SITE/NETWORK they join on failover."),
    test: str = typer.Option(None, help="SITE/NETWORK for test failover (default: a network made per test)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Map a source network to a recovery network."""
    info = networks.add_mapping(get_vault(ctx), source=source, target=target, test=test)
    if json_out:
        emit_json(info)
    else:
        tail = f" (test failover: {info['test']})" if info["test"] else ""
        console.print(f"mapped {info['source']} -> {info['target']}{tail}")


@maps.command("list")
def map_list(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
    """List network mappings."""
    listing(
        networks.list_mappings(get_vault(ctx)),
        json_out,
        "Network mappings",
        ["source", "target", "test network"],
        lambda d: [d["source"], d["target"], d["test"] or "(made per test)"],
    )


@maps.command("delete")
def map_delete(
    ctx: typer.Context,
    source: str = typer.Option(..., help="SITE/NETWORK."),
    target: str = typer.Option(..., help="SITE/NETWORK."),
) -> None:
    """Delete a network mapping that no protected item uses."""
    networks.delete_mapping(get_vault(ctx), source=source, target=target)
    console.print(f"mapping {source} -> {target} deleted")


SIZE_COLUMNS = ["name", "CPUs", "memory", "max NICs"]


def _size_row(d: dict[str, Any]) -> list[Any]:
    return [d["name"], d["cpus"], f"{d['memory_mib']} MiB", d["max_nics"]]


@sizes.command("list")
def size_list(
    ctx: typer.Context,
    site: str = typer.Option(..., help="Site."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """List the sizes a site offers, smallest first."""
    listing(networks.list_sizes(get_vault(ctx), site), json_out, f"Sizes of {site}", SIZE_COLUMNS, _size_row)


@sizes.command("add")
def size_add(
    ctx: typer.Context,
    name: str,
    site: str = typer.Option(..., help="Site."),
    cpus: int = typer.Option(..., help="Virtual CPUs."),
    memory: str = typer.Option(..., help="Memory: MiB (4096) or with a unit (4G, 512M)."),
    max_nics: int = typer.Option(..., help="How many NICs a machine of this size may have."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Add a size to a site's catalogue."""
    info = networks.add_size(get_vault(ctx), name, site=site, cpus=cpus, memory_mib=memory, max_nics=max_nics)
    if json_out:
        emit_json(info)
    else:
        console.print(
            f"size {name} added to {site}: {info['cpus']} CPU, {info['memory_mib']} MiB, "
            f"{info['max_nics']} NICs"
        )


@sizes.command("delete")
def size_delete(ctx: typer.Context, name: str, site: str = typer.Option(..., help="Site.")) -> None:
    """Delete a size that no item has as its target size."""
    networks.delete_size(get_vault(ctx), name, site=site)
    console.print(f"size {name} deleted from {site}")


# ---------------------------------------------------------------------------------------------
# Item settings: registered under ``siterecovery replication`` (see main.py)


def _show_settings(info: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(info)
        return
    size = info["size"]
    if size is None:
        console.print(f"target size: none fits ({info['size_error']})", soft_wrap=True)
    else:
        how = "set" if info["target_size"] else "default: the smallest that fits"
        console.print(
            f"target size: {size['name']} ({size['cpus']} CPU, {size['memory_mib']} MiB, "
            f"{size['max_nics']} NICs; {how}) at site {info['recovery_site']}"
        )
    table(
        f"NICs of {info['item']}",
        ["nic", "source", "role", "network", "subnet", "ip", "test ip", "created"],
        (
            [
                n["nic"],
                f"{n['source_ip']} ({n['source_network'] or 'no network'})",
                n["role"],
                n["network"],
                n["subnet"],
                n["ip"],
                n["test_ip"],
                "yes" if n["created"] else "no",
            ]
            for n in info["nics"]
        ),
    )
    for d in info["nics_not_created"]:
        console.print(f"  {d['name']} will not be created: {d['reason']}")


def settings(ctx: typer.Context, item: str, json_out: bool = typer.Option(False, "--json")) -> None:
    """Target size and per-NIC network settings of a protected item, and NICs not created."""
    _show_settings(networks.item_settings(get_vault(ctx), item), json_out)


def nic(
    ctx: typer.Context,
    item: str,
    nic_name: str = typer.Argument(..., metavar="NIC"),
    role: str = typer.Option(None, help="primary, secondary or none (not created)."),
    subnet: str = typer.Option(None, help="Target subnet (or 'auto': the same name as the source's)."),
    ip: str = typer.Option(None, help="Static address, 'dhcp', or 'auto' (keep the source address if free)."),
    test_ip: str = typer.Option(None, help="Static address for test failover, or 'auto'."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Change a NIC's target settings (making one primary makes the former primary secondary)."""
    info = networks.update_nic(
        get_vault(ctx), item, nic_name, role=role, subnet=subnet, ip=ip, test_ip=test_ip
    )
    _show_settings(info, json_out)


def update(
    ctx: typer.Context,
    item: str,
    target_size: str = typer.Option(None, help="Size name from 'siterecovery size list', or 'auto'."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Change a protected item's target size."""
    _show_settings(networks.update_item_target(get_vault(ctx), item, target_size=target_size), json_out)
