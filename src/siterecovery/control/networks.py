"""Networks, subnets, network mappings, IP allocation and target sizes: the control-plane side of
ASR's "Compute and Network" settings. The rules themselves are in :mod:`siterecovery.domain.networking`.

Rows (adapters/db/models.py): NetworkRow (a site's network; ``purpose`` production | test;
``mirror_of`` set on "<name>-asr" mirrors), SubnetRow, NetworkMappingRow (source network ->
target network at another site, optionally a test network there), IpAllocationRow (one owner per
address and subnet), SizeRow (a site's size catalogue; a site without rows uses
:data:`~siterecovery.domain.networking.DEFAULT_SIZES`).

``ItemRow.nic_settings`` (set by :func:`ensure_item_networks` at enable, changed by
:func:`update_nic`)::

    [{"nic": "nic0",            # the machine's NIC name
      "role": "primary",        # primary | secondary | none (not created)
      "network": "prod-asr",    # target network at the recovery site (None: NIC on no network)
      "subnet": None,           # None: the subnet named like the source one, else the first by name
      "ip": None,               # None: auto, "dhcp", or a static address
      "test_ip": None}]         # None: auto, or a static address for test failover

Auto addresses (ASR's rules): a DHCP source NIC stays DHCP; otherwise the source address is
kept when it lies in the target subnet and is free, else the next free address is taken. A test
failover keeps the failover address when it is free in the test network, else takes the next
free one from the end of the range.

An address is taken when an IpAllocationRow holds it, when it is the subnet's gateway or one of
its DNS servers, or when another present machine of the same site has it on a NIC on that
network (the item's own machine does not count against itself).

The plan returned by :func:`plan_failover_network` (JSON-able)::

    {"site": "dr", "size": {"name", "cpus", "memory_mib", "max_nics"},
     "nics": [{"name", "mac", "network", "subnet", "cidr", "prefix", "gateway", "dns": [...],
               "ip": "10.0.0.10" | "dhcp", "primary": bool}],      # primary first
     "nics_not_created": [{"name", "reason"}],
     "test_network": "web01-test-1a2b3c" | None}                  # made for this test only

Every function that takes a ``session`` works in the caller's transaction and commits nothing;
checks come first, so a refusal changes nothing. Functions that take a ``vault`` open their own
unit of work.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from siterecovery.adapters.db.models import (
    IpAllocationRow,
    ItemRow,
    MachineRow,
    NetworkMappingRow,
    NetworkRow,
    SiteRow,
    SizeRow,
    SubnetRow,
)
from siterecovery.control.vault import check_name
from siterecovery.domain import networking as rules
from siterecovery.domain.networking import DHCP, NONE, PRIMARY, SECONDARY, Address, Size, SubnetSpec
from siterecovery.errors import AlreadyExists, InvalidInput, NotFound, OperationNotAllowed

PURPOSES = ("production", "test")
ALLOCATION_PURPOSES = ("failover", "test", "reserved")
MIRROR_SUFFIX = "-asr"
NETWORK_NAME_MAX = 64 - len(MIRROR_SUFFIX)  # room for the mirror's suffix
UNLIMITED = "unlimited"


# ---------------------------------------------------------------------------------------------
# Look-ups


def _get_site(session: Session, name: str) -> SiteRow:
    # control.sites imports this module (to seed sizes): its get_site cannot be imported here.
    row = session.scalar(select(SiteRow).where(SiteRow.name == name))
    if row is None:
        names = ", ".join(session.scalars(select(SiteRow.name).order_by(SiteRow.name))) or "none yet"
        raise NotFound(kind="site", name=name, hint=f" Known sites: {names}.")
    return row


def _find_network(session: Session, site: SiteRow, name: str) -> NetworkRow | None:
    return session.scalar(select(NetworkRow).where(NetworkRow.site_id == site.id, NetworkRow.name == name))


def get_network(session: Session, site: SiteRow, name: str) -> NetworkRow:
    row = _find_network(session, site, name)
    if row is None:
        names = (
            ", ".join(
                session.scalars(
                    select(NetworkRow.name).where(NetworkRow.site_id == site.id).order_by(NetworkRow.name)
                )
            )
            or "none yet"
        )
        raise NotFound(
            f"network {name!r} not found at site {site.name}. Networks of {site.name}: {names}; add one "
            f"with 'siterecovery network add {name} --site {site.name} --subnet default=CIDR'."
        )
    return row


def _ref(net: NetworkRow) -> str:
    return f"{net.site.name}/{net.name}"


def _parse_ref(session: Session, text: str, option: str) -> NetworkRow:
    site, sep, name = text.partition("/")
    if not sep or not site or not name or "/" in name:
        raise InvalidInput(f"{option} {text!r} is not SITE/NETWORK, like dc1/prod.")
    return get_network(session, _get_site(session, site), name)


def _get_item(session: Session, name: str) -> ItemRow:
    from siterecovery.control.protection import get_item

    return get_item(session, name)


def _subnets(net: NetworkRow) -> dict[str, rules.Subnet]:
    return {s.name: rules.parse_subnet(s.cidr) for s in net.subnets}


def _mappings_from(session: Session, source: NetworkRow) -> list[NetworkMappingRow]:
    return list(
        session.scalars(select(NetworkMappingRow).where(NetworkMappingRow.source_network_id == source.id))
    )


def _mapping_to_site(session: Session, source: NetworkRow, site: SiteRow) -> NetworkMappingRow | None:
    for m in _mappings_from(session, source):
        if m.target_network.site_id == site.id:
            return m
    return None


def _source_network(session: Session, site: SiteRow, machine: str, nic: dict[str, Any]) -> NetworkRow:
    net = _find_network(session, site, nic["network"])
    if net is None:
        raise InvalidInput(
            f"machine {machine} {nic['name']} is on network {nic['network']!r}, which site {site.name} does "
            f"not define; add it with 'siterecovery network add {nic['network']} --site {site.name} "
            f"--subnet default=CIDR' (the subnet that holds {nic.get('ip') or 'its address'})."
        )
    return net


# ---------------------------------------------------------------------------------------------
# Sizes


def seed_default_sizes(session: Session, site: SiteRow) -> None:
    """Give a site the default catalogue (done when a recovery site is added)."""
    if session.scalar(select(SizeRow.id).where(SizeRow.site_id == site.id).limit(1)) is not None:
        return
    for s in rules.DEFAULT_SIZES:
        session.add(
            SizeRow(site_id=site.id, name=s.name, cpus=s.cpus, memory_mib=s.memory_mib, max_nics=s.max_nics)
        )
    session.flush()


def site_sizes(session: Session, site: SiteRow) -> list[Size]:
    """The site's catalogue; a site that has none (made before catalogues) has the default one."""
    rows = list(session.scalars(select(SizeRow).where(SizeRow.site_id == site.id)))
    if not rows:
        return list(rules.DEFAULT_SIZES)
    return sorted(
        (Size(r.name, r.cpus, r.memory_mib, r.max_nics) for r in rows),
        key=lambda s: (s.cpus, s.memory_mib, s.max_nics, s.name),
    )


def _size_named(catalogue: Sequence[Size], name: str, site: SiteRow) -> Size:
    for s in catalogue:
        if s.name == name:
            return s
    raise NotFound(
        f"size {name!r} not found at site {site.name}. Sizes: {', '.join(s.name for s in catalogue)} "
        f"(see 'siterecovery size list --site {site.name}')."
    )


def site_usage(session: Session, site: SiteRow, exclude: tuple[int, str] | None = None) -> tuple[int, int]:
    """CPUs and MiB used at ``site`` by recovered and test machines (``exclude``: (item id,
    "failover" | "test"), the item's own machine that a new plan replaces)."""
    cpus = memory = 0
    for item in session.scalars(select(ItemRow)):
        for purpose, blob in (("failover", item.recovered_machine), ("test", item.test_failover)):
            if not blob or blob.get("site") != site.name or not isinstance(blob.get("size"), dict):
                continue
            if exclude == (item.id, purpose):
                continue
            cpus += int(blob["size"].get("cpus", 0))
            memory += int(blob["size"].get("memory_mib", 0))
    return cpus, memory


def _room(session: Session, site: SiteRow, exclude: tuple[int, str] | None = None) -> rules.Room:
    used_cpus, used_mem = site_usage(session, site, exclude)
    return rules.Room(site.capacity_cpus, site.capacity_memory_mib, used_cpus, used_mem)


def _pick_size(
    session: Session,
    item: ItemRow,
    site: SiteRow,
    spec: dict[str, Any],
    override: str | None,
    *,
    use_item_size: bool = True,
) -> Size:
    catalogue = site_sizes(session, site)
    cpus, memory = int(spec.get("cpus", 1)), int(spec.get("memory_mib", 1024))
    name = override or (item.target_size if use_item_size else None)
    if name:
        return rules.check_size(_size_named(catalogue, name, site), catalogue, cpus, memory, what=item.name)
    return rules.default_size(
        catalogue,
        cpus,
        memory,
        what=f"{item.name} at site {site.name}",
        hint=f"Add one with 'siterecovery size add NAME --site {site.name} --cpus {cpus} --memory "
        f"{memory}M --max-nics N'.",
    )


# ---------------------------------------------------------------------------------------------
# NIC settings


def _nics(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("nics") or [])


def effective_settings(item: ItemRow, spec: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The item's settings for each NIC the machine has now: NICs discovered since enable get
    defaults (secondary, or primary when no NIC is), NICs gone from the inventory are dropped."""
    spec = spec if spec is not None else item.machine.spec
    saved = {s["nic"]: s for s in (item.nic_settings or [])}
    out: list[dict[str, Any]] = []
    for nic in _nics(spec):
        s = dict(saved.get(nic["name"]) or {})
        if not s:
            s = {
                "nic": nic["name"],
                "role": None,
                "network": None,
                "subnet": None,
                "ip": None,
                "test_ip": None,
            }
        if nic.get("network") is None:
            s["role"] = NONE
        out.append(s)
    if any(s["role"] is None for s in out):
        have_primary = any(s["role"] == PRIMARY for s in out)
        for s in out:
            if s["role"] is None:
                s["role"] = SECONDARY if have_primary else PRIMARY
                have_primary = True
    return out


def ensure_item_networks(session: Session, item: ItemRow) -> None:
    """At enable: map every network the machine's NICs are on to a network of the recovery site
    (creating the "<name>-asr" mirror and the mappings both ways when there is none), and set the
    item's NIC settings to their defaults. A NIC on no network is "not connected" (role none);
    a NIC on a network its site does not define is refused."""
    spec = item.machine.spec
    source, target = item.source_site, item.recovery_site
    nics = _nics(spec)
    roles = rules.default_roles([n.get("network") is not None for n in nics])
    settings: list[dict[str, Any]] = []
    for nic, role in zip(nics, roles, strict=True):
        entry: dict[str, Any] = {
            "nic": nic["name"],
            "role": role,
            "network": None,
            "subnet": None,
            "ip": None,
            "test_ip": None,
        }
        if nic.get("network") is not None:
            net = _source_network(session, source, item.name, nic)
            mapping = _mapping_to_site(session, net, target)
            entry["network"] = (mapping.target_network if mapping else _mirror(session, net, target)).name
        settings.append(entry)
    item.nic_settings = settings


def _mirror(session: Session, net: NetworkRow, site: SiteRow) -> NetworkRow:
    """The "<name>-asr" network at ``site`` with ``net``'s address space, mapped both ways."""
    name = f"{net.name}{MIRROR_SUFFIX}"
    mirror = _find_network(session, site, name)
    if mirror is not None and mirror.mirror_of_id != net.id:
        raise InvalidInput(
            f"network {net.name} of site {net.site.name} has no mapping to site {site.name}, and "
            f"{site.name}/{name} exists but is not its mirror; map it with 'siterecovery network map add "
            f"--source {_ref(net)} --target {site.name}/NETWORK'."
        )
    now = time.time()
    if mirror is None:
        mirror = NetworkRow(
            site_id=site.id, name=name, purpose="production", mirror_of_id=net.id, created_at=now
        )
        mirror.subnets = [
            SubnetRow(name=s.name, cidr=s.cidr, gateway=s.gateway, dns=list(s.dns or [])) for s in net.subnets
        ]
        session.add(mirror)
        session.flush()
    session.add(NetworkMappingRow(source_network_id=net.id, target_network_id=mirror.id, created_at=now))
    if _mapping_to_site(session, mirror, net.site) is None:
        session.add(NetworkMappingRow(source_network_id=mirror.id, target_network_id=net.id, created_at=now))
    session.flush()
    return mirror


# ---------------------------------------------------------------------------------------------
# Taken addresses


@dataclass
class _Target:
    """A subnet addresses are allocated in: a stored one, or one of a test network still to be made."""

    name: str
    cidr: str
    gateway: str | None
    dns: list[str]
    network: str
    row: SubnetRow | None = None
    taken: dict[Address, str] = field(default_factory=dict)

    @property
    def net(self) -> rules.Subnet:
        return rules.parse_subnet(self.cidr)


def _add_taken(taken: dict[Address, str], net: rules.Subnet, address: str | None, owner: str) -> None:
    if address is None or address == DHCP:
        return
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return
    if addr.version == net.version and addr in net:
        taken.setdefault(addr, owner)


def _taken_in(
    session: Session,
    target: _Target,
    *,
    site: SiteRow | None,
    skip: tuple[int, str] | None = None,
    own_machine_id: int | None = None,
) -> dict[Address, str]:
    """Who holds which address of the subnet (``skip``: an item's allocations of one purpose,
    that a new plan replaces; ``own_machine_id``: the machine that does not count against itself)."""
    net = target.net
    taken: dict[Address, str] = {}
    _add_taken(taken, net, target.gateway, f"the gateway of subnet {target.name}")
    for d in target.dns:
        _add_taken(taken, net, d, f"a DNS server of subnet {target.name}")
    if target.row is not None:
        for a in session.scalars(select(IpAllocationRow).where(IpAllocationRow.subnet_id == target.row.id)):
            if skip is not None and (a.item_id, a.purpose) == skip:
                continue
            what = a.purpose + (f", {a.nic}" if a.nic else "")
            _add_taken(taken, net, a.address, f"{a.owner} ({what})")
    if site is not None:
        for m in session.scalars(select(MachineRow).where(MachineRow.site_id == site.id, MachineRow.present)):
            if m.id == own_machine_id:
                continue
            for nic in _nics(m.spec):
                if nic.get("network") == target.network:
                    _add_taken(taken, net, nic.get("ip"), f"machine {m.name} ({nic['name']})")
    return taken


def _stored_target(session: Session, net: NetworkRow, subnet: SubnetRow, **kw: Any) -> _Target:
    t = _Target(subnet.name, subnet.cidr, subnet.gateway, list(subnet.dns or []), net.name, row=subnet)
    t.taken = _taken_in(session, t, site=net.site, **kw)
    return t


# ---------------------------------------------------------------------------------------------
# The failover plan


def _nic_hint(item: str, nic: str) -> str:
    return f"Change it with 'siterecovery replication nic {item} {nic} --ip ADDRESS|auto|dhcp'."


def plan_failover_network(
    session: Session,
    item: ItemRow,
    *,
    purpose: str,
    size_override: str | None = None,
    source_spec: dict[str, Any] | None = None,
    source_site: SiteRow | None = None,
    target_site: SiteRow | None = None,
) -> dict[str, Any]:
    """Validate and allocate the target size and network of a failover ("failover") or a test
    failover ("test") of ``item``; see the module docstring for the plan's format.

    Everything is checked before anything is written; then the item's earlier allocations of
    this purpose are replaced by the new ones (a repeated job step gets the same plan) and, for
    a test without a mapped test network, the test's own network is made. By default the machine
    is ``item.machine`` at ``item.source_site`` going to ``item.recovery_site``; a failback passes
    the recovered machine's spec and the sites the other way round (the item's per-NIC network,
    subnet and address settings and its target size then do not apply: they describe the machine
    at the recovery site).
    """
    if purpose not in ("failover", "test"):
        raise InvalidInput(f"plan purpose {purpose!r} is not allowed: use failover or test.")
    spec = source_spec if source_spec is not None else item.machine.spec
    src = source_site if source_site is not None else item.source_site
    tgt = target_site if target_site is not None else item.recovery_site
    own_machine_id = item.machine_id
    settings = effective_settings(item, spec)
    # The item's network, subnet, address and size settings describe its machine at the recovery
    # site; a plan towards another site (failback) uses the mappings and the default rules there.
    forward = tgt.id == item.recovery_site_id
    if not forward:
        for st in settings:
            st.update(network=None, subnet=None, ip=None, test_ip=None)
    rules.check_nic_roles(
        [(s["nic"], s["role"]) for s in settings],
        what=item.name,
        hint=f"Set one with 'siterecovery replication nic {item.name} NIC --role primary'.",
    )

    size = _pick_size(session, item, tgt, spec, size_override, use_item_size=forward)
    created, dropped = rules.cap_nics([(s["nic"], s["role"]) for s in settings], size)
    room = _room(session, tgt, exclude=(item.id, purpose))
    fitting = rules.sizes_for_room(
        room, site_sizes(session, tgt), int(spec.get("cpus", 1)), int(spec.get("memory_mib", 1024))
    )
    alternatives = f" (sizes that fit {item.name} and the room left: {', '.join(s.name for s in fitting)})"
    rules.check_room(
        room,
        size,
        site=tgt.name,
        machine=item.name,
        hint=(
            "clean up test failovers, pick a smaller size with "
            f"'siterecovery replication update {item.name} --target-size NAME'"
            f"{alternatives if fitting else ''}, or raise the capacity with "
            f"'siterecovery site update {tgt.name} --capacity-cpus N --capacity-memory SIZE'."
        ),
    )

    by_nic = {n["name"]: n for n in _nics(spec)}
    by_setting = {s["nic"]: s for s in settings}
    skip = (item.id, purpose)
    targets: dict[tuple[str, str], _Target] = {}  # (network, subnet) -> target subnet
    test_subnets: list[tuple[NetworkRow, SubnetRow, _Target]] = []  # of the test's own network
    test_network_name: str | None = None
    planned: list[dict[str, Any]] = []
    used: list[_Target] = []  # the subnet of each planned NIC
    owner = item.name if purpose == "failover" else f"{item.name}-test"

    for nic_name in created:
        nic, s = by_nic[nic_name], by_setting[nic_name]
        what = f"{item.name} {nic_name} ({purpose})"
        target_net = _target_network(session, item, src, tgt, nic, s)
        subnet = _target_subnet(item, nic, s, target_net, src_site=src, session=session)
        failover_ip = s.get("ip")
        dhcp = failover_ip == DHCP or (failover_ip is None and nic.get("ip") in (None, DHCP))
        if purpose == "failover":
            key = (target_net.name, subnet.name)
            if key not in targets:
                targets[key] = _stored_target(
                    session, target_net, subnet, skip=skip, own_machine_id=own_machine_id
                )
            t = targets[key]
            requested, keep, from_end = (None if dhcp else failover_ip), nic.get("ip"), False
        else:
            mapping = _find_mapping(session, target_net, src, nic)
            if mapping is not None and mapping.test_network is not None:
                test_net = mapping.test_network
                test_sub = next(
                    (x for x in test_net.subnets if x.name == subnet.name),
                    None,
                ) or _subnet_row(test_net, rules.default_subnet([x.name for x in test_net.subnets], None))
                key = (test_net.name, test_sub.name)
                if key not in targets:
                    targets[key] = _stored_target(
                        session, test_net, test_sub, skip=skip, own_machine_id=own_machine_id
                    )
                t = targets[key]
            else:
                if test_network_name is None:
                    test_network_name = _test_network_name(session, tgt, item.name)
                t = _test_target(test_subnets, target_net, subnet, test_network_name)
            test_ip = s.get("test_ip")
            dhcp = dhcp and test_ip is None
            requested, from_end = test_ip, True
            keep = failover_ip if failover_ip not in (None, DHCP) else nic.get("ip")
        if dhcp:
            ip = DHCP
        else:
            addr = rules.allocate_ip(
                t.net,
                t.taken,
                requested=requested,
                keep=keep,
                from_end=from_end,
                what=what,
                hint=_nic_hint(item.name, nic_name) if requested is not None else "",
            )
            t.taken[addr] = f"{owner} ({purpose}, {nic_name})"
            ip = str(addr)
        planned.append(
            {
                "name": nic_name,
                "mac": nic.get("mac"),
                "network": t.network,
                "subnet": t.name,
                "cidr": t.cidr,
                "prefix": t.net.prefixlen,
                "gateway": t.gateway,
                "dns": list(t.dns),
                "ip": ip,
                "primary": s["role"] == PRIMARY,
            }
        )
        used.append(t)

    # Every check passed: write.
    _release_at(session, item.id, purpose, tgt)
    if purpose == "test":
        for old in _own_test_networks(session, tgt, item.name):
            remove_test_network(session, old.name)  # left by an earlier attempt of this test
    if test_network_name is not None:
        _make_test_network(session, tgt, test_network_name, test_subnets)
    now = time.time()
    for p, t in zip(planned, used, strict=True):
        if p["ip"] != DHCP:
            assert t.row is not None
            session.add(
                IpAllocationRow(
                    subnet_id=t.row.id,
                    address=p["ip"],
                    item_id=item.id,
                    owner=owner,
                    nic=p["name"],
                    purpose=purpose,
                    created_at=now,
                )
            )
    try:
        session.flush()
    except IntegrityError as err:
        raise OperationNotAllowed(
            f"{item.name}: an address of the plan was taken by another operation at the same time; try again."
        ) from err
    return {
        "site": tgt.name,
        "size": size.as_dict(),
        "nics": planned,
        "nics_not_created": [{"name": n, "reason": r} for n, r in dropped],
        "test_network": test_network_name,
    }


def _find_mapping(
    session: Session, target_net: NetworkRow, src: SiteRow, nic: dict[str, Any]
) -> NetworkMappingRow | None:
    source = _find_network(session, src, nic["network"])
    if source is None:
        return None
    return session.scalar(
        select(NetworkMappingRow).where(
            NetworkMappingRow.source_network_id == source.id,
            NetworkMappingRow.target_network_id == target_net.id,
        )
    )


def _target_network(
    session: Session, item: ItemRow, src: SiteRow, tgt: SiteRow, nic: dict[str, Any], s: dict[str, Any]
) -> NetworkRow:
    if s.get("network"):
        net = _find_network(session, tgt, s["network"])
        if net is not None:
            return net
    source = _source_network(session, src, item.name, nic)
    mapping = _mapping_to_site(session, source, tgt)
    if mapping is None:
        raise InvalidInput(
            f"{item.name} {nic['name']}: network {_ref(source)} has no mapping to site {tgt.name}; add "
            f"one with 'siterecovery network map add --source {_ref(source)} --target {tgt.name}/NETWORK'."
        )
    return mapping.target_network


def _subnet_row(net: NetworkRow, name: str) -> SubnetRow:
    return next(x for x in net.subnets if x.name == name)


def _target_subnet(
    item: ItemRow,
    nic: dict[str, Any],
    s: dict[str, Any],
    net: NetworkRow,
    *,
    src_site: SiteRow,
    session: Session,
) -> SubnetRow:
    names = [x.name for x in net.subnets]
    if s.get("subnet"):
        if s["subnet"] not in names:
            raise InvalidInput(
                f"{item.name} {nic['name']}: subnet {s['subnet']!r} is not in network {_ref(net)} (subnets: "
                f"{', '.join(names) or 'none'}); change it with 'siterecovery replication nic {item.name} "
                f"{nic['name']} --subnet NAME'."
            )
        return _subnet_row(net, s["subnet"])
    preferred = None
    source = _find_network(session, src_site, nic["network"]) if nic.get("network") else None
    if source is not None:
        preferred = rules.subnet_of(_subnets(source), nic.get("ip"))
    return _subnet_row(net, rules.default_subnet(names, preferred, what=f"network {_ref(net)}"))


TEST_SUFFIX_LEN = len("-test-") + 6


def _test_network_name(session: Session, site: SiteRow, item: str) -> str:
    while True:
        name = f"{item[: 64 - TEST_SUFFIX_LEN]}-test-{secrets.token_hex(3)}"
        if _find_network(session, site, name) is None:
            return name


def _own_test_networks(session: Session, site: SiteRow, item: str) -> list[NetworkRow]:
    """Test networks that a test failover of ``item`` made at ``site`` (named by _test_network_name)."""
    pattern = re.compile(rf"^{re.escape(item[: 64 - TEST_SUFFIX_LEN])}-test-[0-9a-f]{{6}}$")
    rows = session.scalars(
        select(NetworkRow).where(NetworkRow.site_id == site.id, NetworkRow.purpose == "test")
    )
    return [n for n in rows if pattern.match(n.name) and not _mapping_uses(session, n)]


def _test_target(
    test_subnets: list[tuple[NetworkRow, SubnetRow, _Target]],
    target_net: NetworkRow,
    subnet: SubnetRow,
    network_name: str,
) -> _Target:
    """The copy of ``subnet`` in the test's own network (made when the plan is written)."""
    for net, sub, t in test_subnets:
        if net.id == target_net.id and sub.id == subnet.id:
            return t
    used = {t.name for _, _, t in test_subnets}
    # Subnets of two target networks may share a name; the second copy is told apart.
    name = subnet.name if subnet.name not in used else f"{target_net.name}-{subnet.name}"[:64]
    t = _Target(name, subnet.cidr, subnet.gateway, list(subnet.dns or []), network_name)
    _add_taken(t.taken, t.net, t.gateway, f"the gateway of subnet {name}")
    for d in t.dns:
        _add_taken(t.taken, t.net, d, f"a DNS server of subnet {name}")
    test_subnets.append((target_net, subnet, t))
    return t


def _make_test_network(
    session: Session, site: SiteRow, name: str, test_subnets: list[tuple[NetworkRow, SubnetRow, _Target]]
) -> None:
    net = NetworkRow(site_id=site.id, name=name, purpose="test", created_at=time.time())
    for _, _, t in test_subnets:
        t.row = SubnetRow(name=t.name, cidr=t.cidr, gateway=t.gateway, dns=list(t.dns))
        net.subnets.append(t.row)
    session.add(net)
    session.flush()


def _release_at(session: Session, item_id: int, purpose: str, site: SiteRow) -> None:
    """Give back the item's addresses of one purpose in the networks of ``site``."""
    rows = session.scalars(
        select(IpAllocationRow)
        .join(SubnetRow)
        .join(NetworkRow)
        .where(
            IpAllocationRow.item_id == item_id,
            IpAllocationRow.purpose == purpose,
            NetworkRow.site_id == site.id,
        )
    )
    for r in list(rows):
        session.delete(r)
    session.flush()


def release_addresses(session: Session, item_id: int, purpose: str | None) -> int:
    """Give back the item's addresses of one purpose (None: all of them); returns how many."""
    q = select(IpAllocationRow).where(IpAllocationRow.item_id == item_id)
    if purpose is not None:
        q = q.where(IpAllocationRow.purpose == purpose)
    rows = list(session.scalars(q))
    for r in rows:
        session.delete(r)
    if rows:
        session.flush()
    return len(rows)


def remove_test_network(session: Session, name: str) -> None:
    """Delete a network made for a test failover, with its subnets and addresses (no-op when it
    is gone already, so that a repeated cleanup step succeeds)."""
    for net in list(session.scalars(select(NetworkRow).where(NetworkRow.name == name))):
        if net.purpose != "test":
            raise InvalidInput(
                f"network {_ref(net)} is a {net.purpose} network, not a test failover's own network."
            )
        if _mapping_uses(session, net):
            raise OperationNotAllowed(
                f"network {_ref(net)} is used by a network mapping; it is not a test failover's own network."
            )
        for sub in net.subnets:
            for a in session.scalars(select(IpAllocationRow).where(IpAllocationRow.subnet_id == sub.id)):
                session.delete(a)
        session.flush()
        session.delete(net)
    session.flush()


# ---------------------------------------------------------------------------------------------
# Networks (CRUD)


def subnet_dict(s: SubnetRow, session: Session | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": s.name, "cidr": s.cidr, "gateway": s.gateway, "dns": list(s.dns or [])}
    net = rules.parse_subnet(s.cidr)
    d["usable"] = rules.describe_usable(net)
    if session is not None:
        d["allocated"] = len(
            list(session.scalars(select(IpAllocationRow.id).where(IpAllocationRow.subnet_id == s.id)))
        )
    return d


def _mirror_source(session: Session, net: NetworkRow) -> NetworkRow | None:
    return None if net.mirror_of_id is None else session.get(NetworkRow, net.mirror_of_id)


def network_dict(session: Session, net: NetworkRow) -> dict[str, Any]:
    maps = _mappings_from(session, net)
    return {
        "name": net.name,
        "site": net.site.name,
        "purpose": net.purpose,
        "mirror_of": _ref(mirror) if (mirror := _mirror_source(session, net)) is not None else None,
        "subnets": [subnet_dict(s, session) for s in net.subnets],
        "mapped_to": [_ref(m.target_network) for m in maps],
    }


def add_network(
    vault: Any, name: str, *, site: str, subnets: Sequence[str | SubnetSpec], purpose: str = "production"
) -> dict[str, Any]:
    check_name("network", name)
    if len(name) > NETWORK_NAME_MAX:
        raise InvalidInput(
            f"network name {name!r} is too long: at most {NETWORK_NAME_MAX} characters, so that its "
            f"mirror '{name}{MIRROR_SUFFIX}' fits in 64."
        )
    if purpose not in PURPOSES:
        raise InvalidInput(f"network purpose {purpose!r} is not allowed: use {' or '.join(PURPOSES)}.")
    if not subnets:
        raise InvalidInput(
            f"network {name} needs at least one subnet: --subnet {rules.SUBNET_SPEC_FORM}, like "
            "--subnet default=10.10.0.0/24."
        )
    specs = [
        s if isinstance(s, SubnetSpec) else rules.parse_subnet_spec(s, what=f"network {name}")
        for s in subnets
    ]
    rules.check_no_overlap(specs, what=f"network {name}")
    with vault.store.uow() as s:
        site_row = _get_site(s, site)
        if _find_network(s, site_row, name) is not None:
            raise AlreadyExists(
                f"network {name!r} already exists at site {site}; see 'siterecovery network list'."
            )
        net = NetworkRow(site_id=site_row.id, name=name, purpose=purpose, created_at=time.time())
        net.subnets = [SubnetRow(name=x.name, cidr=x.cidr, gateway=x.gateway, dns=list(x.dns)) for x in specs]
        s.add(net)
        s.flush()
        return network_dict(s, net)


def list_networks(vault: Any, site: str | None = None) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        q = select(NetworkRow).join(SiteRow).order_by(SiteRow.name, NetworkRow.name)
        if site:
            q = q.where(NetworkRow.site_id == _get_site(s, site).id)
        return [network_dict(s, n) for n in s.scalars(q)]


def _mapping_uses(session: Session, net: NetworkRow) -> list[NetworkMappingRow]:
    return list(
        session.scalars(
            select(NetworkMappingRow).where(
                (NetworkMappingRow.source_network_id == net.id)
                | (NetworkMappingRow.target_network_id == net.id)
                | (NetworkMappingRow.test_network_id == net.id)
            )
        )
    )


def _items_on(session: Session, net: NetworkRow) -> list[str]:
    """Protected items whose NIC settings send a NIC to ``net``."""
    rows = session.scalars(select(ItemRow).where(ItemRow.recovery_site_id == net.site_id))
    return sorted(i.name for i in rows if any(x.get("network") == net.name for x in i.nic_settings or []))


def delete_network(vault: Any, name: str, *, site: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        net = get_network(s, _get_site(s, site), name)
        maps = _mapping_uses(s, net)
        if maps:
            listed = "; ".join(_mapping_text(m) for m in maps)
            first = maps[0]
            raise OperationNotAllowed(
                f"network {site}/{name} is used by network mapping(s): {listed}; delete them first with "
                f"'siterecovery network map delete --source {_ref(first.source_network)} --target "
                f"{_ref(first.target_network)}'."
            )
        held = list(
            s.scalars(
                select(IpAllocationRow)
                .join(SubnetRow)
                .where(SubnetRow.network_id == net.id)
                .order_by(IpAllocationRow.address)
            )
        )
        if held:
            owners = ", ".join(f"{a.address} by {a.owner} ({a.purpose})" for a in held[:5])
            more = f" and {len(held) - 5} more" if len(held) > 5 else ""
            raise OperationNotAllowed(
                f"network {site}/{name} has addresses in use: {owners}{more}; clean up the test failovers or "
                "fail back the machines that use them first."
            )
        items = _items_on(s, net)
        if items:
            raise OperationNotAllowed(
                f"network {site}/{name} is the target network of {', '.join(items)}; disable their "
                "replication or map their networks elsewhere first."
            )
        s.delete(net)
        return {"site": site, "name": name, "deleted": True}


# ---------------------------------------------------------------------------------------------
# Mappings (CRUD)


def _mapping_text(m: NetworkMappingRow) -> str:
    test = f" (test {_ref(m.test_network)})" if m.test_network is not None else ""
    return f"{_ref(m.source_network)} -> {_ref(m.target_network)}{test}"


def mapping_dict(m: NetworkMappingRow) -> dict[str, Any]:
    return {
        "source": _ref(m.source_network),
        "target": _ref(m.target_network),
        "test": None if m.test_network is None else _ref(m.test_network),
        "created_at": m.created_at,
    }


def add_mapping(vault: Any, *, source: str, target: str, test: str | None = None) -> dict[str, Any]:
    with vault.store.uow() as s:
        src = _parse_ref(s, source, "--source")
        tgt = _parse_ref(s, target, "--target")
        if src.site_id == tgt.site_id:
            raise InvalidInput(
                f"{source} and {target} are networks of the same site; a mapping sends a network to "
                "a network of another site."
            )
        if tgt.purpose == "test":
            raise InvalidInput(
                f"{target} is a test network; give it as --test, and a production network as --target."
            )
        existing = _mapping_to_site(s, src, tgt.site)
        if existing is not None:
            raise AlreadyExists(
                f"network {source} is already mapped to site {tgt.site.name}: {_mapping_text(existing)}; "
                f"delete that mapping first ('siterecovery network map delete --source {source} --target "
                f"{_ref(existing.target_network)}')."
            )
        test_row = None
        if test is not None:
            test_row = _parse_ref(s, test, "--test")
            if test_row.site_id != tgt.site_id:
                raise InvalidInput(f"test network {test} must be at the target's site {tgt.site.name}.")
            if test_row.id == tgt.id:
                raise InvalidInput(
                    f"test network {test} is the target network itself; a test failover must not join the "
                    "production network. Give an isolated network."
                )
            used_as_target = s.scalar(
                select(NetworkMappingRow).where(NetworkMappingRow.target_network_id == test_row.id).limit(1)
            )
            if used_as_target is not None:
                raise InvalidInput(
                    f"test network {test} is the target of mapping {_mapping_text(used_as_target)}: it is a "
                    "production network. Give an isolated network."
                )
        m = NetworkMappingRow(
            source_network_id=src.id,
            target_network_id=tgt.id,
            test_network_id=None if test_row is None else test_row.id,
            created_at=time.time(),
        )
        s.add(m)
        s.flush()
        s.refresh(m)
        return mapping_dict(m)


def list_mappings(vault: Any) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        rows = list(s.scalars(select(NetworkMappingRow)))
        return sorted((mapping_dict(m) for m in rows), key=lambda d: (d["source"], d["target"]))


def delete_mapping(vault: Any, *, source: str, target: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        src = _parse_ref(s, source, "--source")
        tgt = _parse_ref(s, target, "--target")
        m = s.scalar(
            select(NetworkMappingRow).where(
                NetworkMappingRow.source_network_id == src.id, NetworkMappingRow.target_network_id == tgt.id
            )
        )
        if m is None:
            raise NotFound(f"no network mapping {source} -> {target}; see 'siterecovery network map list'.")
        users = sorted(
            i.name
            for i in s.scalars(select(ItemRow).where(ItemRow.recovery_site_id == tgt.site_id))
            if i.source_site_id == src.site_id
            and any(
                x.get("network") == tgt.name and nic.get("network") == src.name
                for x in i.nic_settings or []
                for nic in _nics(i.machine.spec)
                if nic["name"] == x.get("nic")
            )
        )
        if users:
            raise OperationNotAllowed(
                f"mapping {source} -> {target} is used by {', '.join(users)}; disable their replication "
                "first."
            )
        s.delete(m)
        return {"source": source, "target": target, "deleted": True}


# ---------------------------------------------------------------------------------------------
# Sizes and capacity (CRUD)


def list_sizes(vault: Any, site: str) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        row = _get_site(s, site)
        return [{"site": site, **x.as_dict()} for x in site_sizes(s, row)]


def add_size(
    vault: Any, name: str, *, site: str, cpus: int, memory_mib: int | str, max_nics: int
) -> dict[str, Any]:
    check_name("size", name)
    mem = rules.parse_memory_mib(str(memory_mib), what="--memory")
    size = Size(name, int(cpus), mem, int(max_nics))
    with vault.store.uow() as s:
        row = _get_site(s, site)
        # A site still on the implicit default catalogue keeps it: adding one size extends it.
        seed_default_sizes(s, row)
        if s.scalar(select(SizeRow).where(SizeRow.site_id == row.id, SizeRow.name == name)) is not None:
            raise AlreadyExists(
                f"size {name!r} already exists at site {site}; see 'siterecovery size list --site {site}'."
            )
        s.add(
            SizeRow(
                site_id=row.id, name=name, cpus=size.cpus, memory_mib=size.memory_mib, max_nics=size.max_nics
            )
        )
        s.flush()
        return {"site": site, **size.as_dict()}


def delete_size(vault: Any, name: str, *, site: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        row = _get_site(s, site)
        seed_default_sizes(s, row)
        size = s.scalar(select(SizeRow).where(SizeRow.site_id == row.id, SizeRow.name == name))
        if size is None:
            _size_named(site_sizes(s, row), name, row)  # raises NotFound naming the sizes
        assert size is not None
        users = sorted(
            s.scalars(
                select(ItemRow.name).where(ItemRow.recovery_site_id == row.id, ItemRow.target_size == name)
            )
        )
        if users:
            raise OperationNotAllowed(
                f"size {name} is the target size of {', '.join(users)}; change it first with "
                f"'siterecovery replication update {users[0]} --target-size NAME'."
            )
        if (
            s.scalar(select(SizeRow.id).where(SizeRow.site_id == row.id, SizeRow.id != size.id).limit(1))
            is None
        ):
            raise OperationNotAllowed(
                f"size {name} is the last size of site {site}; a site needs at least one."
            )
        s.delete(size)
        return {"site": site, "name": name, "deleted": True}


def _capacity(value: int | str | None, what: str, parse: Any) -> tuple[bool, int | None]:
    """(changed, new value): None leaves it, "unlimited" clears it."""
    if value is None:
        return False, None
    if isinstance(value, str) and value.strip().lower() in (UNLIMITED, "none"):
        return True, None
    n = parse(value)
    if n < 1:
        raise InvalidInput(f"{what} must be at least 1 (or '{UNLIMITED}'), not {value!r}.")
    return True, n


def _parse_count(value: int | str) -> int:
    try:
        return int(value)
    except ValueError as err:
        raise InvalidInput(f"--capacity-cpus {value!r} is not a whole number (or '{UNLIMITED}').") from err


def site_capacity_dict(session: Session, site: SiteRow) -> dict[str, Any]:
    used_cpus, used_mem = site_usage(session, site)
    return {
        "name": site.name,
        "capacity_cpus": site.capacity_cpus,
        "capacity_memory_mib": site.capacity_memory_mib,
        "used_cpus": used_cpus,
        "used_memory_mib": used_mem,
    }


def update_site_capacity(
    vault: Any, name: str, *, cpus: int | str | None = None, memory: int | str | None = None
) -> dict[str, Any]:
    """Set how much a site may run (``"unlimited"`` clears a cap; None leaves it). Lowering a cap
    under what runs there is allowed: running machines stay, new plans are refused."""
    set_cpus, new_cpus = _capacity(cpus, "--capacity-cpus", _parse_count)
    set_mem, new_mem = _capacity(
        memory, "--capacity-memory", lambda v: rules.parse_memory_mib(str(v), what="--capacity-memory")
    )
    if not (set_cpus or set_mem):
        raise InvalidInput(
            "nothing to change: give --capacity-cpus N and/or --capacity-memory SIZE (or 'unlimited')."
        )
    with vault.store.uow() as s:
        site = _get_site(s, name)
        if set_cpus:
            site.capacity_cpus = new_cpus
        if set_mem:
            site.capacity_memory_mib = new_mem
        s.flush()
        return site_capacity_dict(s, site)


# ---------------------------------------------------------------------------------------------
# Item settings


def _settings_view(session: Session, item: ItemRow) -> dict[str, Any]:
    spec = item.machine.spec
    settings = effective_settings(item, spec)
    tgt = item.recovery_site
    catalogue = site_sizes(session, tgt)
    size: Size | None = None
    size_error = None
    try:
        size = _pick_size(session, item, tgt, spec, None)
    except (InvalidInput, NotFound) as err:
        size_error = str(err)
    nics = []
    by_nic = {n["name"]: n for n in _nics(spec)}
    for st in settings:
        nic = by_nic[st["nic"]]
        subnet = None
        if st.get("network"):
            net = _find_network(session, tgt, st["network"])
            if net is not None:
                try:
                    subnet = _target_subnet(
                        item, nic, st, net, src_site=item.source_site, session=session
                    ).name
                except InvalidInput:
                    subnet = None
        nics.append(
            {
                "nic": st["nic"],
                "mac": nic.get("mac"),
                "source_network": nic.get("network"),
                "source_ip": nic.get("ip"),
                "role": st["role"],
                "network": st.get("network"),
                "subnet": subnet,
                "subnet_setting": st.get("subnet"),
                "ip": st.get("ip") or "auto",
                "test_ip": st.get("test_ip") or "auto",
            }
        )
    not_created: list[dict[str, str]] = []
    if size is not None:
        created, dropped = rules.cap_nics([(x["nic"], x["role"]) for x in settings], size)
        not_created = [{"name": n, "reason": r} for n, r in dropped]
    else:
        created = [x["nic"] for x in settings if x["role"] != NONE]
    for n in nics:
        n["created"] = n["nic"] in created
        if by_nic[n["nic"]].get("network") is None:
            for d in not_created:
                if d["name"] == n["nic"]:
                    d["reason"] = "not connected to a network in the inventory"
    return {
        "item": item.name,
        "recovery_site": tgt.name,
        "target_size": item.target_size,
        "size": None if size is None else size.as_dict(),
        "size_error": size_error,
        "sizes": [x.name for x in catalogue],
        "nics": nics,
        "nics_not_created": not_created,
    }


def item_settings(vault: Any, item_name: str) -> dict[str, Any]:
    with vault.store.uow() as s:
        return _settings_view(s, _get_item(s, item_name))


def update_item_target(vault: Any, item_name: str, *, target_size: str | None) -> dict[str, Any]:
    """Set the item's target size ("auto": back to the default choice)."""
    if target_size is None:
        raise InvalidInput("nothing to change: give --target-size NAME (or 'auto' for the default size).")
    with vault.store.uow() as s:
        item = _get_item(s, item_name)
        if target_size == "auto":
            item.target_size = None
        else:
            tgt = item.recovery_site
            catalogue = site_sizes(s, tgt)
            spec = item.machine.spec
            rules.check_size(
                _size_named(catalogue, target_size, tgt),
                catalogue,
                int(spec.get("cpus", 1)),
                int(spec.get("memory_mib", 1024)),
                what=item.name,
            )
            item.target_size = target_size
        item.updated_at = time.time()
        s.flush()
        return _settings_view(s, item)


def update_nic(
    vault: Any,
    item_name: str,
    nic_name: str,
    *,
    role: str | None = None,
    subnet: str | None = None,
    ip: str | None = None,
    test_ip: str | None = None,
) -> dict[str, Any]:
    """Change one NIC's target settings. Making a NIC primary makes the former primary
    secondary; an address is checked against its subnet (and, as far as it is known now, that
    it is free) but is only taken at failover."""
    if role is None and subnet is None and ip is None and test_ip is None:
        raise InvalidInput("nothing to change: give --role, --subnet, --ip or --test-ip.")
    with vault.store.uow() as s:
        item = _get_item(s, item_name)
        spec = item.machine.spec
        settings = effective_settings(item, spec)
        by_nic = {n["name"]: n for n in _nics(spec)}
        if nic_name not in by_nic:
            raise NotFound(f"{item_name} has no NIC {nic_name!r}; its NICs: {', '.join(by_nic) or 'none'}.")
        nic = by_nic[nic_name]
        st = next(x for x in settings if x["nic"] == nic_name)
        what = f"{item_name} {nic_name}"
        if nic.get("network") is None and (
            (role is not None and role != NONE) or subnet is not None or ip is not None or test_ip is not None
        ):
            raise InvalidInput(
                f"{what} is on no network in the inventory, so it is not created at failover; put it on a "
                "network in the site's inventory and run 'siterecovery site discover SITE' first."
            )
        if role is not None:
            rules.check_role(role, what=what)
            if role == PRIMARY:
                for other in settings:
                    if other is not st and other["role"] == PRIMARY:
                        other["role"] = SECONDARY
            st["role"] = role
            rules.check_nic_roles(
                [(x["nic"], x["role"]) for x in settings],
                what=item_name,
                hint=(
                    "Make another NIC primary first: "
                    f"'siterecovery replication nic {item_name} NIC --role primary'."
                ),
            )
        tgt = item.recovery_site
        net = None
        if st.get("network"):
            net = _find_network(s, tgt, st["network"])
        if net is None and (
            subnet is not None or ip not in (None, "auto", DHCP) or test_ip not in (None, "auto")
        ):
            raise InvalidInput(
                f"{what} has no target network at site {tgt.name}; map its network with "
                "'siterecovery network map add' first."
            )
        if subnet is not None:
            names = [x.name for x in net.subnets] if net is not None else []
            if subnet != "auto" and subnet not in names:
                raise InvalidInput(
                    f"{what}: subnet {subnet!r} is not in network {tgt.name}/{st['network']} (subnets: "
                    f"{', '.join(names) or 'none'}; or 'auto')."
                )
            st["subnet"] = None if subnet == "auto" else subnet
        if ip is not None:
            st["ip"] = None if ip == "auto" else ip
        if test_ip is not None:
            st["test_ip"] = None if test_ip == "auto" else test_ip
        if net is not None:
            sub_row = _target_subnet(item, nic, st, net, src_site=item.source_site, session=s)
            hint = f"Give --subnet too if the address is in another subnet of {tgt.name}/{net.name}."
            if st.get("ip") not in (None, DHCP):
                t = _stored_target(
                    s, net, sub_row, skip=(item.id, "failover"), own_machine_id=item.machine_id
                )
                rules.allocate_ip(t.net, t.taken, requested=st["ip"], what=f"{what} --ip", hint=hint)
            if st.get("test_ip") is not None:
                _check_test_ip(s, item, nic, net, sub_row, st["test_ip"], what=f"{what} --test-ip")
        item.nic_settings = settings
        item.updated_at = time.time()
        s.flush()
        return _settings_view(s, item)


def _check_test_ip(
    session: Session,
    item: ItemRow,
    nic: dict[str, Any],
    net: NetworkRow,
    sub: SubnetRow,
    address: str,
    *,
    what: str,
) -> None:
    """A test address must lie in the test subnet: the mapped test network's, else a copy of the
    target subnet (the test's own network)."""
    mapping = _find_mapping(session, net, item.source_site, nic)
    if mapping is not None and mapping.test_network is not None:
        test_net = mapping.test_network
        test_sub = next((x for x in test_net.subnets if x.name == sub.name), None) or _subnet_row(
            test_net, rules.default_subnet([x.name for x in test_net.subnets], None)
        )
        t = _stored_target(
            session, test_net, test_sub, skip=(item.id, "test"), own_machine_id=item.machine_id
        )
    else:
        t = _Target(sub.name, sub.cidr, sub.gateway, list(sub.dns or []), net.name)
        _add_taken(t.taken, t.net, t.gateway, f"the gateway of subnet {sub.name}")
        for d in t.dns:
            _add_taken(t.taken, t.net, d, f"a DNS server of subnet {sub.name}")
    rules.allocate_ip(t.net, t.taken, requested=address, what=what)
