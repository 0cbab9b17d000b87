"""Network and size rules of failover (ASR's): subnets, reserved addresses, IP allocation, NIC
roles, target sizes, NIC caps and the room a recovery site has. Pure: stdlib only, no I/O.

Formats
    Subnet spec (CLI and API): ``NAME=CIDR[,gateway=IP][,dns=IP+IP...]``, for example
    ``default=10.10.0.0/24,gateway=10.10.0.1,dns=10.10.0.53+1.1.1.1``. The CIDR must be the
    network itself (``10.10.0.0/24``, not ``10.10.0.7/24``). Without ``gateway`` the subnet's
    gateway is its first host address, as in Azure.
    Memory: a whole number of MiB (``4096``), or with a unit: ``512M``/``512MiB``, ``4G``/``4GiB``,
    ``1T``/``1TiB``.

Subnets and reserved addresses
    A subnet holds at least 8 addresses (IPv4 /29, Azure's smallest subnet). Five addresses of
    every subnet are reserved and never given out, as in Azure: the network address, the first
    three host addresses (gateway and DNS there) and the last address (the broadcast address on
    IPv4; IPv6 keeps the same rule so that one rule holds for both). The usable range is what
    lies between them.

IP allocation (:func:`allocate_ip`)
    1. A requested address must parse, lie in the subnet, not be reserved and not be taken;
       otherwise the allocation is refused (it never falls back to another address: the user
       asked for that one). A taken address is refused naming who holds it.
    2. Else ``keep`` (the source address, or for a test failover the failover address) is
       returned when it lies in the subnet, is not reserved and is free.
    3. Else the next free address: the lowest free one, or with ``from_end`` (test failover)
       the highest free one.
    4. A subnet with no free usable address is refused.
    Invariant: an address returned lies in the usable range, is not reserved and is not a key
    of ``taken``.

NIC roles
    ``primary``, ``secondary`` or ``none`` (not created at the target). Among the NICs that are
    created, exactly one is primary; a machine with no NIC created at all recovers without
    network.

Sizes
    A recovery site offers a catalogue of sizes (CPUs, memory in MiB, how many NICs). The default
    size of a machine is the smallest one that fits it (cpus >= the machine's, memory >= the
    machine's; smallest by CPUs, then memory, then NICs, then name). An explicit size smaller
    than the machine is refused. NICs beyond the size's maximum are not created: the primary is
    kept first, then secondaries in their order.

Room
    A recovery site may cap the CPUs and memory of what runs there (None: unlimited). A plan that
    would take the site over either cap is refused, saying how much is used and what is needed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from siterecovery.errors import InvalidInput, OperationNotAllowed

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network

MIN_SUBNET_ADDRESSES = 8
RESERVED_AT_START = 4  # the network address and the first three host addresses
RESERVED_AT_END = 1  # the broadcast address
RESERVED_NOTE = (
    "the network address, the first three host addresses and the last (broadcast) address are reserved"
)

PRIMARY, SECONDARY, NONE = "primary", "secondary", "none"
ROLES = (PRIMARY, SECONDARY, NONE)

DHCP = "dhcp"


def _prefix(what: str) -> str:
    return f"{what}: " if what else ""


# ---------------------------------------------------------------------------------------------
# Subnets and addresses


def parse_subnet(cidr: str, *, what: str = "") -> Subnet:
    """A subnet from its CIDR; refuses host bits, bad syntax and subnets under 8 addresses."""
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as err:
        try:
            loose = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise InvalidInput(
                f"{_prefix(what)}{cidr!r} is not a subnet: write it as CIDR, like 10.10.0.0/24."
            ) from err
        raise InvalidInput(
            f"{_prefix(what)}{cidr!r} has host bits set: the subnet is {loose}; write that instead."
        ) from err
    if net.num_addresses < MIN_SUBNET_ADDRESSES:
        smallest = "/29" if net.version == 4 else "/125"
        raise InvalidInput(
            f"{_prefix(what)}subnet {net} is too small: a subnet needs at least {MIN_SUBNET_ADDRESSES} "
            f"addresses ({smallest} or larger) because {RESERVED_NOTE}."
        )
    return net


def parse_address(text: str, *, what: str = "") -> Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError as err:
        raise InvalidInput(f"{_prefix(what)}{text!r} is not an IP address.") from err


def _at(net: Subnet, n: int) -> Address:
    """The address ``n`` (an integer) of the subnet's own family."""
    if net.version == 4:
        return ipaddress.IPv4Address(n)
    return ipaddress.IPv6Address(n)


def _bounds(net: Subnet) -> tuple[int, int]:
    """First and last usable address, as integers."""
    first = int(net.network_address) + RESERVED_AT_START
    last = int(net.broadcast_address) - RESERVED_AT_END
    return first, last


def reserved_addresses(net: Subnet) -> frozenset[Address]:
    """The addresses of ``net`` that are never given out (see the module docstring)."""
    base, top = int(net.network_address), int(net.broadcast_address)
    start = {_at(net, base + i) for i in range(RESERVED_AT_START)}
    end = {_at(net, top - i) for i in range(RESERVED_AT_END)}
    return frozenset(start | end)


def usable_range(net: Subnet) -> tuple[Address, Address]:
    first, last = _bounds(net)
    return _at(net, first), _at(net, last)


def usable_count(net: Subnet) -> int:
    first, last = _bounds(net)
    return last - first + 1


def describe_usable(net: Subnet) -> str:
    """``10.10.0.4-10.10.0.254``: the range messages quote."""
    first, last = usable_range(net)
    return f"{first}-{last}"


def is_usable(net: Subnet, address: Address) -> bool:
    first, last = _bounds(net)
    return address.version == net.version and first <= int(address) <= last


@dataclass(frozen=True)
class SubnetSpec:
    """A subnet as a user defines it: name, CIDR (normalised), gateway, DNS servers."""

    name: str
    cidr: str
    gateway: str | None
    dns: tuple[str, ...] = ()

    @property
    def network(self) -> Subnet:
        return parse_subnet(self.cidr)


SUBNET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUBNET_SPEC_FORM = "NAME=CIDR[,gateway=IP][,dns=IP+IP]"


def make_subnet_spec(
    name: str, cidr: str, gateway: str | None = None, dns: Iterable[str] = (), *, what: str = ""
) -> SubnetSpec:
    """Validate a subnet: name, CIDR, a gateway inside it (default: its first host), DNS addresses."""
    if not SUBNET_NAME_RE.match(name):
        raise InvalidInput(
            f"{_prefix(what)}subnet name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit."
        )
    where = f"{what} subnet {name}".strip()
    net = parse_subnet(cidr, what=where)
    if gateway is None:
        gw: Address = _at(net, int(net.network_address) + 1)
    else:
        gw = parse_address(gateway, what=f"{where} gateway")
        top = int(net.broadcast_address)
        if gw not in net or int(gw) in (int(net.network_address), top):
            raise InvalidInput(
                f"{where}: gateway {gw} is not a host address of {net}; give an address between "
                f"{_at(net, int(net.network_address) + 1)} and {_at(net, top - 1)}."
            )
    servers = tuple(str(parse_address(d, what=f"{where} dns")) for d in dns)
    if len(set(servers)) != len(servers):
        raise InvalidInput(f"{where}: a DNS server is listed twice ({', '.join(servers)}).")
    return SubnetSpec(name=name, cidr=str(net), gateway=str(gw), dns=servers)


def parse_subnet_spec(text: str, *, what: str = "") -> SubnetSpec:
    """``NAME=CIDR[,gateway=IP][,dns=IP+IP]`` -> :class:`SubnetSpec`."""
    head, *options = [p.strip() for p in text.split(",")]
    name, sep, cidr = head.partition("=")
    if not sep or not name.strip() or not cidr.strip():
        raise InvalidInput(
            f"{_prefix(what)}subnet {text!r} is not {SUBNET_SPEC_FORM}, "
            "like default=10.10.0.0/24,gateway=10.10.0.1,dns=10.10.0.53+1.1.1.1."
        )
    gateway: str | None = None
    dns: list[str] = []
    for opt in options:
        key, sep, value = opt.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("gateway", "dns") or not value.strip():
            raise InvalidInput(
                f"{_prefix(what)}subnet {text!r}: {opt!r} is not understood; after NAME=CIDR only "
                "gateway=IP and dns=IP+IP may follow, separated by commas."
            )
        if key == "gateway":
            gateway = value.strip()
        else:
            dns.extend(v for v in value.split("+") if v.strip())
    return make_subnet_spec(name.strip(), cidr.strip(), gateway, dns, what=what)


def check_no_overlap(specs: Sequence[SubnetSpec], *, what: str = "") -> None:
    """Subnets of one network must have distinct names and must not overlap (as in Azure)."""
    seen: dict[str, SubnetSpec] = {}
    for s in specs:
        if s.name in seen:
            raise InvalidInput(f"{_prefix(what)}subnet name {s.name!r} is used twice.")
        for other in seen.values():
            a, b = s.network, other.network
            if a.version == b.version and a.overlaps(b):
                raise InvalidInput(
                    f"{_prefix(what)}subnets {other.name} ({other.cidr}) and {s.name} ({s.cidr}) "
                    "overlap; the subnets of a network must not overlap."
                )
        seen[s.name] = s


# ---------------------------------------------------------------------------------------------
# IP allocation


def allocate_ip(
    net: Subnet,
    taken: Mapping[Address, str],
    *,
    requested: str | None = None,
    keep: str | None = None,
    from_end: bool = False,
    what: str = "",
    hint: str = "",
) -> Address:
    """An address of ``net`` for a NIC, by the rules in the module docstring.

    ``taken`` maps the addresses in use to who holds them (for messages). ``what`` names the NIC
    in messages ("web01 nic0 (failover)"); ``hint`` is appended to refusals (what to run).
    Raises InvalidInput (requested address not usable in this subnet) or OperationNotAllowed
    (requested address taken, or no free address left).
    """
    pre = _prefix(what)
    tail = f" {hint}" if hint else ""
    usable = f"usable addresses of {net} are {describe_usable(net)}"
    if requested is not None:
        addr = parse_address(requested, what=what)
        if addr.version != net.version or addr not in net:
            raise InvalidInput(f"{pre}address {addr} is not in subnet {net}; the {usable}.{tail}")
        if not is_usable(net, addr):
            raise InvalidInput(
                f"{pre}address {addr} is reserved in {net} ({RESERVED_NOTE}); the {usable}.{tail}"
            )
        owner = taken.get(addr)
        if owner is not None:
            raise OperationNotAllowed(
                f"{pre}address {addr} is taken by {owner}; choose a free address (the {usable}) or let "
                f"one be assigned.{tail}"
            )
        return addr
    if keep is not None and keep != DHCP:
        try:
            kept: Address | None = ipaddress.ip_address(keep)
        except ValueError:
            kept = None
        if kept is not None and is_usable(net, kept) and kept not in taken:
            return kept
    first, last = _bounds(net)
    candidates = range(last, first - 1, -1) if from_end else range(first, last + 1)
    # At most len(taken) + 1 steps: every step that does not return skips a taken address.
    for n in candidates:
        addr = _at(net, n)
        if addr not in taken:
            return addr
    raise OperationNotAllowed(
        f"{pre}no free address in subnet {net}: all {usable_count(net)} usable addresses "
        f"({describe_usable(net)}) are taken; release one, pick another subnet or use DHCP.{tail}"
    )


# ---------------------------------------------------------------------------------------------
# NIC roles and subnets


def check_role(role: str, *, what: str = "") -> str:
    if role not in ROLES:
        raise InvalidInput(f"{_prefix(what)}role {role!r} is not allowed: use {', '.join(ROLES)}.")
    return role


def check_nic_roles(roles: Sequence[tuple[str, str]], *, what: str = "", hint: str = "") -> None:
    """``roles`` is [(nic, role)] in NIC order: every role is known, and among the NICs that are
    created exactly one is primary."""
    for nic, role in roles:
        check_role(role, what=f"{what} {nic}".strip())
    created = [(n, r) for n, r in roles if r != NONE]
    if not created:
        return
    primaries = [n for n, r in created if r == PRIMARY]
    if len(primaries) == 1:
        return
    listed = ", ".join(f"{n} {r}" for n, r in roles)
    tail = f" {hint}" if hint else ""
    if not primaries:
        raise InvalidInput(
            f"{_prefix(what)}no NIC is primary ({listed}); exactly one NIC that is created must be "
            f"primary.{tail}"
        )
    raise InvalidInput(
        f"{_prefix(what)}{len(primaries)} NICs are primary ({', '.join(primaries)}); exactly one may be."
        f"{tail}"
    )


def default_roles(connected: Sequence[bool]) -> list[str]:
    """Roles for NICs in order: the first connected NIC is primary, the other connected ones are
    secondary, NICs on no network are not created."""
    roles: list[str] = []
    have_primary = False
    for c in connected:
        if not c:
            roles.append(NONE)
        elif not have_primary:
            roles.append(PRIMARY)
            have_primary = True
        else:
            roles.append(SECONDARY)
    return roles


def default_subnet(names: Sequence[str], preferred: str | None, *, what: str = "") -> str:
    """The subnet named like the source NIC's subnet, else the first by name."""
    if not names:
        raise InvalidInput(f"{_prefix(what)}the network has no subnet; add one.")
    if preferred is not None and preferred in names:
        return preferred
    return sorted(names)[0]


def subnet_of(subnets: Mapping[str, Subnet], address: str | None) -> str | None:
    """The name of the subnet that holds ``address`` (None: DHCP, no address, or no such subnet)."""
    if address is None or address == DHCP:
        return None
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return None
    for name in sorted(subnets):
        if addr.version == subnets[name].version and addr in subnets[name]:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Size:
    name: str
    cpus: int
    memory_mib: int
    max_nics: int

    def __post_init__(self) -> None:
        for field, value in (
            ("cpus", self.cpus),
            ("memory_mib", self.memory_mib),
            ("max_nics", self.max_nics),
        ):
            if value < 1:
                raise InvalidInput(f"size {self.name}: {field} must be at least 1, not {value}.")

    def fits(self, cpus: int, memory_mib: int) -> bool:
        return self.cpus >= cpus and self.memory_mib >= memory_mib

    def describe(self) -> str:
        return f"{self.name} ({self.cpus} CPU, {self.memory_mib} MiB, {self.max_nics} NICs)"

    def as_dict(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "max_nics": self.max_nics,
        }


#: Seeded at every recovery site when it is added (and used by sites that have no sizes).
DEFAULT_SIZES: tuple[Size, ...] = (
    Size("small", 1, 1024, 2),
    Size("medium", 2, 4096, 4),
    Size("large", 4, 8192, 8),
    Size("xlarge", 8, 16384, 8),
    Size("2xlarge", 16, 65536, 8),
)


def _order(s: Size) -> tuple[int, int, int, str]:
    return (s.cpus, s.memory_mib, s.max_nics, s.name)


def sizes_that_fit(catalogue: Iterable[Size], cpus: int, memory_mib: int) -> list[Size]:
    return sorted((s for s in catalogue if s.fits(cpus, memory_mib)), key=_order)


def default_size(
    catalogue: Sequence[Size], cpus: int, memory_mib: int, *, what: str = "", hint: str = ""
) -> Size:
    """The smallest size that fits the machine (the same or the next larger)."""
    fitting = sizes_that_fit(catalogue, cpus, memory_mib)
    if fitting:
        return fitting[0]
    tail = f" {hint}" if hint else ""
    largest = ", ".join(s.describe() for s in sorted(catalogue, key=_order)[-2:]) or "none"
    raise InvalidInput(
        f"{_prefix(what)}no size fits a machine of {cpus} CPU and {memory_mib} MiB; the largest sizes "
        f"are {largest}; add a larger size.{tail}"
    )


def check_size(size: Size, catalogue: Sequence[Size], cpus: int, memory_mib: int, *, what: str = "") -> Size:
    """Refuse an explicit size smaller than the machine, naming the sizes that fit."""
    if size.fits(cpus, memory_mib):
        return size
    fitting = [s.name for s in sizes_that_fit(catalogue, cpus, memory_mib)]
    raise InvalidInput(
        f"{_prefix(what)}size {size.describe()} is smaller than the machine ({cpus} CPU, {memory_mib} MiB); "
        + (f"sizes that fit: {', '.join(fitting)}." if fitting else "no size of the site fits it; add one.")
    )


def cap_nics(nics: Sequence[tuple[str, str]], size: Size) -> tuple[list[str], list[tuple[str, str]]]:
    """Which NICs are created and in which order, and which are not and why.

    ``nics`` is [(nic, role)] in NIC order. Created: the primary first, then secondaries in
    order, up to ``size.max_nics``. Not created: NICs with role none, then those over the cap.
    """
    created: list[str] = []
    dropped: list[tuple[str, str]] = []
    ordered = [n for n, r in nics if r == PRIMARY] + [n for n, r in nics if r == SECONDARY]
    for n, r in nics:
        if r == NONE:
            dropped.append((n, "role none: set not to be created"))
    for n in ordered:
        if len(created) < size.max_nics:
            created.append(n)
        else:
            dropped.append(
                (n, f"size {size.name} allows {size.max_nics} NIC{'s' if size.max_nics != 1 else ''}")
            )
    return created, dropped


_MEMORY_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")
_MEMORY_UNITS = {
    "": 1,
    "m": 1,
    "mb": 1,
    "mib": 1,
    "g": 1024,
    "gb": 1024,
    "gib": 1024,
    "t": 1024**2,
    "tb": 1024**2,
    "tib": 1024**2,
}


def parse_memory_mib(text: str, *, what: str = "memory") -> int:
    """``4096``, ``512M``, ``4G``, ``1T`` (binary units) -> MiB."""
    m = _MEMORY_RE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _MEMORY_UNITS or int(m.group(1)) < 1:
        raise InvalidInput(
            f"{what} {text!r} is not understood: give MiB (4096) or a size with a unit: 512M, 4G, 1T."
        )
    return int(m.group(1)) * _MEMORY_UNITS[unit]


# ---------------------------------------------------------------------------------------------
# Room at the recovery site


@dataclass(frozen=True)
class Room:
    """What a site can run (None: unlimited) and what runs there now."""

    capacity_cpus: int | None
    capacity_memory_mib: int | None
    used_cpus: int
    used_memory_mib: int

    def fits(self, size: Size) -> bool:
        cpu_ok = self.capacity_cpus is None or self.used_cpus + size.cpus <= self.capacity_cpus
        mem_ok = (
            self.capacity_memory_mib is None
            or self.used_memory_mib + size.memory_mib <= self.capacity_memory_mib
        )
        return cpu_ok and mem_ok


def sizes_for_room(room: Room, catalogue: Iterable[Size], cpus: int, memory_mib: int) -> list[Size]:
    """Sizes that fit both the machine and the room left, smallest first."""
    return [s for s in sizes_that_fit(catalogue, cpus, memory_mib) if room.fits(s)]


def check_room(room: Room, size: Size, *, site: str, machine: str, hint: str = "") -> None:
    """Refuse a size that does not fit in the room left, saying what is used and what is needed."""
    if room.fits(size):
        return
    short: list[str] = []
    if room.capacity_cpus is not None and room.used_cpus + size.cpus > room.capacity_cpus:
        short.append(
            f"{room.used_cpus} of {room.capacity_cpus} CPUs in use, {machine} needs {size.cpus} "
            f"(size {size.name})"
        )
    cap_mem = room.capacity_memory_mib
    if cap_mem is not None and room.used_memory_mib + size.memory_mib > cap_mem:
        short.append(
            f"{room.used_memory_mib} of {cap_mem} MiB of memory in use, {machine} needs "
            f"{size.memory_mib} MiB (size {size.name})"
        )
    tail = f"; {hint}" if hint else "."
    raise OperationNotAllowed(f"recovery site {site} has no room: {'; '.join(short)}{tail}")
