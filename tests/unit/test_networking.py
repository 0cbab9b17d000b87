"""Network and size rules: examples for each rule and refusal, Hypothesis for the allocator's
invariants (inside the subnet, never reserved, never taken, keep when possible, from_end gives
the highest free address, a request is honoured or refused, a full subnet is refused)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from siterecovery.domain.networking import (
    DEFAULT_SIZES,
    NONE,
    PRIMARY,
    SECONDARY,
    Address,
    Room,
    Size,
    Subnet,
    allocate_ip,
    cap_nics,
    check_nic_roles,
    check_no_overlap,
    check_room,
    check_size,
    default_roles,
    default_size,
    default_subnet,
    describe_usable,
    make_subnet_spec,
    parse_memory_mib,
    parse_subnet,
    parse_subnet_spec,
    reserved_addresses,
    sizes_for_room,
    subnet_of,
    usable_count,
    usable_range,
)
from siterecovery.errors import InvalidInput, OperationNotAllowed


def ip(text: str) -> Address:
    return ipaddress.ip_address(text)


NET = parse_subnet("10.0.0.0/24")


# ---------------------------------------------------------------------------------------------
# Subnets and reserved addresses


def test_reserved_are_network_first_three_hosts_and_broadcast() -> None:
    assert reserved_addresses(NET) == {ip(f"10.0.0.{n}") for n in (0, 1, 2, 3, 255)}
    assert usable_range(NET) == (ip("10.0.0.4"), ip("10.0.0.254"))
    assert usable_count(NET) == 251
    assert describe_usable(NET) == "10.0.0.4-10.0.0.254"


def test_smallest_subnet_is_slash_29_with_three_usable() -> None:
    net = parse_subnet("192.168.1.8/29")
    assert usable_count(net) == 3
    assert usable_range(net) == (ip("192.168.1.12"), ip("192.168.1.14"))
    with pytest.raises(InvalidInput, match="too small.*/29 or larger"):
        parse_subnet("192.168.1.8/30")


def test_ipv6_subnet_follows_the_same_rule() -> None:
    net = parse_subnet("fd00::/64")
    assert ip("fd00::3") in reserved_addresses(net)
    assert usable_range(net)[0] == ip("fd00::4")
    assert allocate_ip(net, {}) == ip("fd00::4")


def test_subnet_with_host_bits_names_the_subnet_meant() -> None:
    with pytest.raises(InvalidInput, match=r"host bits set: the subnet is 10\.0\.0\.0/24"):
        parse_subnet("10.0.0.7/24")


def test_subnet_that_is_no_cidr_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not a subnet: write it as CIDR"):
        parse_subnet("10.0.0/abc")


def test_subnet_spec_with_gateway_and_dns() -> None:
    spec = parse_subnet_spec("app=10.1.0.0/24,gateway=10.1.0.1,dns=10.1.0.53+1.1.1.1")
    assert (spec.name, spec.cidr, spec.gateway, spec.dns) == (
        "app",
        "10.1.0.0/24",
        "10.1.0.1",
        ("10.1.0.53", "1.1.1.1"),
    )


def test_subnet_spec_gateway_defaults_to_first_host() -> None:
    assert parse_subnet_spec("default=10.2.0.0/16").gateway == "10.2.0.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.0/24", "is not NAME=CIDR"),
        ("default=", "is not NAME=CIDR"),
        ("d=10.0.0.0/24,mtu=9000", "'mtu=9000' is not understood"),
        ("d=10.0.0.0/24,gateway=10.9.0.1", "gateway 10.9.0.1 is not a host address of 10.0.0.0/24"),
        ("d=10.0.0.0/24,gateway=10.0.0.255", "is not a host address"),
        ("d=10.0.0.0/24,dns=nope", "'nope' is not an IP address"),
        ("d=10.0.0.0/24,dns=1.1.1.1+1.1.1.1", "listed twice"),
        ("-bad=10.0.0.0/24", "subnet name '-bad' is not allowed"),
    ],
)
def test_bad_subnet_specs_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_subnet_spec(text)


def test_overlapping_subnets_and_duplicate_names_are_refused() -> None:
    a = make_subnet_spec("a", "10.0.0.0/24")
    with pytest.raises(
        InvalidInput, match=r"subnets a \(10\.0\.0\.0/24\) and b \(10\.0\.0\.128/25\) overlap"
    ):
        check_no_overlap([a, make_subnet_spec("b", "10.0.0.128/25")])
    with pytest.raises(InvalidInput, match="'a' is used twice"):
        check_no_overlap([a, make_subnet_spec("a", "10.0.1.0/24")])
    check_no_overlap([a, make_subnet_spec("b", "10.0.1.0/24"), make_subnet_spec("c", "fd00::/64")])


# ---------------------------------------------------------------------------------------------
# Allocation by example


def test_requested_free_address_is_given() -> None:
    assert allocate_ip(NET, {}, requested="10.0.0.50", keep="10.0.0.9") == ip("10.0.0.50")


def test_requested_taken_address_names_its_holder() -> None:
    with pytest.raises(
        OperationNotAllowed, match=r"web01 nic0: address 10\.0\.0\.50 is taken by db01 \(failover\)"
    ):
        allocate_ip(NET, {ip("10.0.0.50"): "db01 (failover)"}, requested="10.0.0.50", what="web01 nic0")


def test_requested_reserved_address_is_refused_with_the_usable_range() -> None:
    with pytest.raises(InvalidInput, match=r"10\.0\.0\.1 is reserved.*10\.0\.0\.4-10\.0\.0\.254"):
        allocate_ip(NET, {}, requested="10.0.0.1")


def test_requested_address_outside_subnet_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"10\.9\.0\.5 is not in subnet 10\.0\.0\.0/24"):
        allocate_ip(NET, {}, requested="10.9.0.5")
    with pytest.raises(InvalidInput, match="not in subnet"):
        allocate_ip(NET, {}, requested="fd00::5")


def test_source_address_is_kept_when_free_else_next_free() -> None:
    assert allocate_ip(NET, {}, keep="10.0.0.10") == ip("10.0.0.10")
    assert allocate_ip(NET, {ip("10.0.0.10"): "x", ip("10.0.0.4"): "y"}, keep="10.0.0.10") == ip("10.0.0.5")
    assert allocate_ip(NET, {}, keep="192.168.0.10") == ip("10.0.0.4")  # not in the target subnet
    assert allocate_ip(NET, {}, keep="10.0.0.2") == ip("10.0.0.4")  # reserved there


def test_from_end_takes_the_highest_free() -> None:
    assert allocate_ip(NET, {}, from_end=True) == ip("10.0.0.254")
    assert allocate_ip(NET, {ip("10.0.0.254"): "t"}, from_end=True) == ip("10.0.0.253")
    assert allocate_ip(NET, {}, keep="10.0.0.10", from_end=True) == ip("10.0.0.10")


def test_full_subnet_is_refused() -> None:
    net = parse_subnet("10.0.0.0/29")
    taken = {ip(f"10.0.0.{n}"): "m" for n in (4, 5, 6)}
    with pytest.raises(OperationNotAllowed, match=r"no free address in subnet 10\.0\.0\.0/29: all 3 usable"):
        allocate_ip(net, taken, keep="10.0.0.5")


def test_hint_is_appended_to_refusals() -> None:
    with pytest.raises(InvalidInput, match=r"Change it with 'x'\.$"):
        allocate_ip(NET, {}, requested="10.0.0.0", hint="Change it with 'x'.")


# ---------------------------------------------------------------------------------------------
# Allocation invariants (Hypothesis)

PREFIX = st.integers(min_value=24, max_value=29)


@st.composite
def subnet_and_taken(draw: st.DrawFn) -> tuple[Subnet, dict[Address, str]]:
    prefix = draw(PREFIX)
    base = draw(st.integers(min_value=0, max_value=2**32 - 1)) >> (32 - prefix) << (32 - prefix)
    net = ipaddress.ip_network(f"{ipaddress.IPv4Address(base)}/{prefix}")
    hosts = [ipaddress.IPv4Address(int(net.network_address) + i) for i in range(net.num_addresses)]
    taken = draw(st.sets(st.sampled_from(hosts), max_size=len(hosts)))
    return net, {a: f"owner{i}" for i, a in enumerate(sorted(taken))}


def _free(net: Subnet, taken: dict[Address, str]) -> list[Address]:
    reserved = reserved_addresses(net)
    return [a for a in net if a not in reserved and a not in taken]


@settings(max_examples=300)
@given(subnet_and_taken(), st.booleans(), st.integers(min_value=0, max_value=2**32 - 1))
def test_allocation_is_inside_free_and_not_reserved(
    case: tuple[Subnet, dict[Address, str]], from_end: bool, keep_int: int
) -> None:
    net, taken = case
    keep = str(ipaddress.IPv4Address(keep_int))
    free = _free(net, taken)
    if not free:
        with pytest.raises(OperationNotAllowed, match="no free address"):
            allocate_ip(net, taken, keep=keep, from_end=from_end)
        return
    got = allocate_ip(net, taken, keep=keep, from_end=from_end)
    assert got in net
    assert got not in reserved_addresses(net)
    assert got not in taken
    if ip(keep) in free:
        assert got == ip(keep)  # kept whenever possible
    else:
        assert got == (max(free) if from_end else min(free))


@settings(max_examples=300)
@given(subnet_and_taken(), st.data())
def test_request_is_honoured_or_refused(case: tuple[Subnet, dict[Address, str]], data: st.DataObject) -> None:
    net, taken = case
    hosts = list(net)
    requested = data.draw(st.sampled_from(hosts))
    if requested in _free(net, taken):
        assert allocate_ip(net, taken, requested=str(requested), keep=str(hosts[-2])) == requested
    elif requested in taken and requested not in reserved_addresses(net):
        with pytest.raises(OperationNotAllowed, match=f"taken by {taken[requested]}"):
            allocate_ip(net, taken, requested=str(requested))
    else:
        with pytest.raises(InvalidInput, match="reserved"):
            allocate_ip(net, taken, requested=str(requested))


@given(subnet_and_taken())
def test_repeated_allocation_fills_the_subnet_then_refuses(case: tuple[Subnet, dict[Address, str]]) -> None:
    net, taken = case
    assume(len(_free(net, taken)) <= 64)
    taken = dict(taken)
    got = []
    for _ in range(len(_free(net, taken))):
        a = allocate_ip(net, taken)
        taken[a] = "new"
        got.append(a)
    assert got == sorted(got)  # lowest free first, each time
    with pytest.raises(OperationNotAllowed):
        allocate_ip(net, taken)


# ---------------------------------------------------------------------------------------------
# NIC roles and subnets


def test_default_roles_first_connected_is_primary() -> None:
    assert default_roles([True, True, False, True]) == [PRIMARY, SECONDARY, NONE, SECONDARY]
    assert default_roles([False, True]) == [NONE, PRIMARY]
    assert default_roles([]) == []


def test_exactly_one_primary_among_created_nics() -> None:
    check_nic_roles([("nic0", PRIMARY), ("nic1", SECONDARY), ("nic2", NONE)])
    check_nic_roles([("nic0", NONE)])  # nothing created: a machine without network
    with pytest.raises(InvalidInput, match=r"web01: no NIC is primary \(nic0 secondary, nic1 none\)"):
        check_nic_roles([("nic0", SECONDARY), ("nic1", NONE)], what="web01")
    with pytest.raises(InvalidInput, match=r"2 NICs are primary \(nic0, nic1\)"):
        check_nic_roles([("nic0", PRIMARY), ("nic1", PRIMARY)])
    with pytest.raises(InvalidInput, match="role 'main' is not allowed: use primary, secondary, none"):
        check_nic_roles([("nic0", "main")])


def test_default_subnet_same_name_else_first_by_name() -> None:
    assert default_subnet(["web", "app", "db"], "db") == "db"
    assert default_subnet(["web", "app"], "db") == "app"
    assert default_subnet(["web", "app"], None) == "app"
    with pytest.raises(InvalidInput, match="no subnet"):
        default_subnet([], None)


def test_subnet_of_finds_the_subnet_holding_an_address() -> None:
    subnets = {"a": parse_subnet("10.0.0.0/24"), "b": parse_subnet("10.0.1.0/24")}
    assert subnet_of(subnets, "10.0.1.9") == "b"
    assert subnet_of(subnets, "10.0.9.9") is None
    assert subnet_of(subnets, "dhcp") is None


# ---------------------------------------------------------------------------------------------
# Sizes, NIC caps, room


def test_default_size_is_the_same_or_next_larger() -> None:
    assert default_size(DEFAULT_SIZES, 1, 512).name == "small"
    assert default_size(DEFAULT_SIZES, 2, 4096).name == "medium"
    assert default_size(DEFAULT_SIZES, 2, 4097).name == "large"
    assert default_size(DEFAULT_SIZES, 3, 1024).name == "large"
    with pytest.raises(InvalidInput, match="no size fits a machine of 32 CPU"):
        default_size(DEFAULT_SIZES, 32, 1024)


@given(st.integers(min_value=1, max_value=16), st.integers(min_value=1, max_value=65536))
def test_default_size_is_the_smallest_that_fits(cpus: int, memory: int) -> None:
    chosen = default_size(DEFAULT_SIZES, cpus, memory)
    assert chosen.cpus >= cpus and chosen.memory_mib >= memory
    smaller = [s for s in DEFAULT_SIZES if (s.cpus, s.memory_mib) < (chosen.cpus, chosen.memory_mib)]
    assert not any(s.fits(cpus, memory) for s in smaller)


def test_explicit_size_smaller_than_machine_names_sizes_that_fit() -> None:
    small = DEFAULT_SIZES[0]
    with pytest.raises(
        InvalidInput, match=r"smaller than the machine \(4 CPU, 2048 MiB\); sizes that fit: large, xlarge"
    ):
        check_size(small, DEFAULT_SIZES, 4, 2048)
    assert check_size(DEFAULT_SIZES[2], DEFAULT_SIZES, 4, 2048).name == "large"


def test_size_must_have_positive_fields() -> None:
    with pytest.raises(InvalidInput, match="max_nics must be at least 1"):
        Size("tiny", 1, 512, 0)


def test_nic_cap_keeps_primary_first_then_secondaries_in_order() -> None:
    nics = [("nic0", SECONDARY), ("nic1", NONE), ("nic2", PRIMARY), ("nic3", SECONDARY)]
    created, dropped = cap_nics(nics, Size("s", 1, 1024, 2))
    assert created == ["nic2", "nic0"]
    assert dropped == [("nic1", "role none: set not to be created"), ("nic3", "size s allows 2 NICs")]
    created, dropped = cap_nics(nics, Size("l", 1, 1024, 8))
    assert created == ["nic2", "nic0", "nic3"]
    assert [n for n, _ in dropped] == ["nic1"]


@given(st.lists(st.sampled_from([PRIMARY, SECONDARY, NONE]), max_size=10), st.integers(1, 8))
def test_nic_cap_never_exceeds_the_size_and_loses_no_nic(roles: list[str], max_nics: int) -> None:
    nics = [(f"nic{i}", r) for i, r in enumerate(roles)]
    created, dropped = cap_nics(nics, Size("s", 1, 1, max_nics))
    assert len(created) <= max_nics
    assert sorted(created + [n for n, _ in dropped]) == sorted(n for n, _ in nics)
    if PRIMARY in roles:
        assert created[0] == f"nic{roles.index(PRIMARY)}"


def test_room_refusal_says_used_capacity_and_need() -> None:
    room = Room(capacity_cpus=16, capacity_memory_mib=None, used_cpus=14, used_memory_mib=99999)
    medium = DEFAULT_SIZES[1]
    assert room.fits(DEFAULT_SIZES[1])
    large = DEFAULT_SIZES[2]
    with pytest.raises(OperationNotAllowed) as err:
        check_room(room, large, site="dr", machine="web01", hint="clean up test failovers.")
    assert str(err.value) == (
        "recovery site dr has no room: 14 of 16 CPUs in use, web01 needs 4 (size large); "
        "clean up test failovers."
    )
    assert [s.name for s in sizes_for_room(room, DEFAULT_SIZES, 2, 2048)] == [medium.name]


def test_room_refusal_for_memory() -> None:
    room = Room(capacity_cpus=None, capacity_memory_mib=8192, used_cpus=0, used_memory_mib=6144)
    with pytest.raises(OperationNotAllowed, match="6144 of 8192 MiB of memory in use, vm needs 4096 MiB"):
        check_room(room, DEFAULT_SIZES[1], site="dr", machine="vm")
    check_room(Room(None, None, 10**6, 10**9), DEFAULT_SIZES[-1], site="dr", machine="vm")


@pytest.mark.parametrize(
    ("text", "mib"),
    [("4096", 4096), ("512M", 512), ("4G", 4096), ("4GiB", 4096), ("1T", 1024 * 1024), (" 2 g ", 2048)],
)
def test_memory_sizes(text: str, mib: int) -> None:
    assert parse_memory_mib(text) == mib


@pytest.mark.parametrize("text", ["", "0", "4X", "-1G", "1.5G"])
def test_bad_memory_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="not understood"):
        parse_memory_mib(text)
