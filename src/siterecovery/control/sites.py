"""Sites and their machines: add a site, discover (and re-discover) its machines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from siterecovery.adapters.db.models import MachineRow, SiteRow
from siterecovery.control.inventory import load_inventory
from siterecovery.control.networks import seed_default_sizes
from siterecovery.control.vault import Vault, check_name
from siterecovery.errors import AlreadyExists, InvalidInput, NotFound

KINDS = ("qemu", "raw")
ROLES = ("primary", "recovery")


def site_dict(row: SiteRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "kind": row.kind,
        "role": row.role,
        "inventory": row.inventory,
        "path": row.path,
        "machines": sum(1 for m in row.machines if m.present),
        "discovered_at": row.discovered_at,
    }


def get_site(session: Any, name: str) -> SiteRow:
    row = session.scalar(select(SiteRow).where(SiteRow.name == name))
    if row is None:
        names = ", ".join(session.scalars(select(SiteRow.name).order_by(SiteRow.name))) or "none yet"
        raise NotFound(kind="site", name=name, hint=f" Known sites: {names}.")
    return row


def add_site(
    vault: Vault, name: str, kind: str, role: str, inventory: Path | None, path: Path | None
) -> dict[str, Any]:
    check_name("site", name)
    if kind not in KINDS:
        raise InvalidInput(f"site kind {kind!r} is not supported: allowed are {', '.join(KINDS)}.")
    if role not in ROLES:
        raise InvalidInput(f"site role {role!r} is not allowed: use {' or '.join(ROLES)}.")
    if role == "primary" and inventory is None:
        raise InvalidInput("a primary site needs --inventory FILE (the TOML list of its machines).")
    if role == "recovery" and path is None:
        raise InvalidInput("a recovery site needs --path DIR (where recovered machines' disks are written).")
    if inventory is not None:
        inventory = inventory.expanduser().resolve()
        load_inventory(inventory, kind)  # refuse a broken inventory now, not at discovery
    if path is not None:
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
    with vault.store.uow() as s:
        if s.scalar(select(SiteRow).where(SiteRow.name == name)) is not None:
            raise AlreadyExists(kind="site", name=name)
        row = SiteRow(
            name=name,
            kind=kind,
            role=role,
            inventory=str(inventory) if inventory else None,
            path=str(path) if path else None,
            created_at=time.time(),
        )
        s.add(row)
        s.flush()
        if role == "recovery":
            seed_default_sizes(s, row)
        return site_dict(row)


def list_sites(vault: Vault) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        return [site_dict(r) for r in s.scalars(select(SiteRow).order_by(SiteRow.name))]


def discover(vault: Vault, site_name: str) -> dict[str, Any]:
    """Read the site's inventory again; record and report what was added, removed or changed."""
    with vault.store.uow() as s:
        site = get_site(s, site_name)
        if not site.inventory:
            raise InvalidInput(f"site {site_name!r} has no inventory to discover machines from.")
        found = load_inventory(Path(site.inventory), site.kind)
        now = time.time()
        known = {m.name: m for m in site.machines}
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        for name, spec in found.items():
            row = known.get(name)
            if row is None:
                s.add(MachineRow(site_id=site.id, name=name, spec=spec, present=True, discovered_at=now))
                report["added"].append(name)
            elif row.spec != spec or not row.present:
                changes = sorted(k for k in spec if row.spec.get(k) != spec[k])
                row.spec, row.present, row.discovered_at = spec, True, now
                report["changed"].append(f"{name} ({', '.join(changes) or 'reappeared'})")
            else:
                report["unchanged"].append(name)
        for name, row in known.items():
            if name not in found and row.present:
                row.present = False
                report["removed"].append(name)
        site.discovered_at = now
        return {"site": site_name, **report}


def machine_dict(row: MachineRow) -> dict[str, Any]:
    spec = row.spec
    return {
        "name": row.name,
        "site": row.site.name,
        "present": row.present,
        "os": spec["os"],
        "cpus": spec["cpus"],
        "memory_mib": spec["memory_mib"],
        "disks": [d["name"] for d in spec["disks"]],
        "nics": [f"{n['name']} {n['ip']} ({n['network']})" for n in spec["nics"]],
        "hooks": bool(spec["hooks"].get("freeze")),
    }


def list_machines(vault: Vault, site_name: str | None = None) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        q = select(MachineRow).join(SiteRow).order_by(SiteRow.name, MachineRow.name)
        if site_name:
            get_site(s, site_name)
            q = q.where(SiteRow.name == site_name)
        return [machine_dict(m) for m in s.scalars(q)]
