"""Networks, mappings, IP allocation and target sizes against a real vault (SQLite): mirrors made
at enable, plans for failover and test failover, refusals that change nothing, release, sizes,
capacity, NIC settings and the deletions that are refused while something uses them.

Machines are described in a raw site's inventory; nothing here reads a disk (enabling replication
only creates the item and queues its job, which these tests do not run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from siterecovery.adapters.db.models import IpAllocationRow, NetworkMappingRow, NetworkRow, SizeRow
from siterecovery.control import networks, policies, protection, sites
from siterecovery.control.vault import Vault, create_vault
from siterecovery.demo.fabric import write_inventory
from siterecovery.errors import AlreadyExists, InvalidInput, NotFound, OperationNotAllowed

pytestmark = pytest.mark.integration


def nic(name: str, ip: str, network: str | None = "prod", mac_tail: int = 1) -> dict[str, Any]:
    return {"name": name, "mac": f"52:54:00:00:02:{mac_tail:02x}", "ip": ip, "network": network}


MACHINES: dict[str, dict[str, Any]] = {
    "web01": {
        "cpus": 2,
        "memory_mib": 2048,
        "nic": [nic("nic0", "10.0.0.10"), nic("nic1", "dhcp", mac_tail=2)],
    },
    "db01": {"cpus": 1, "memory_mib": 1024, "nic": [nic("nic0", "10.0.0.11", mac_tail=3)]},
    "big": {
        "cpus": 1,
        "memory_mib": 1024,
        "nic": [nic(f"nic{i}", f"10.0.0.{30 + i}", mac_tail=10 + i) for i in range(3)],
    },
    "app01": {"cpus": 1, "memory_mib": 1024, "nic": [nic("nic0", "10.0.1.7", network="app", mac_tail=20)]},
    "lonely": {"cpus": 1, "memory_mib": 512, "nic": [nic("nic0", "10.0.0.40", network=None, mac_tail=30)]},
    "stray": {"cpus": 1, "memory_mib": 512, "nic": [nic("nic0", "10.5.0.9", network="dmz", mac_tail=40)]},
}


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    inventory = [
        {"name": name, **m, "disk": [{"name": "disk0", "path": tmp_path / "disks" / f"{name}.img"}]}
        for name, m in MACHINES.items()
    ]
    write_inventory(tmp_path / "inventory.toml", inventory)
    v = create_vault(tmp_path / "vault", "nets")
    sites.add_site(v, "dc1", "raw", "primary", tmp_path / "inventory.toml", None)
    sites.add_site(v, "dr", "raw", "recovery", None, tmp_path / "dr")
    sites.discover(v, "dc1")
    policies.create_policy(
        v, "p", crash_frequency="5m", rpo_threshold="15m", retention="24h", app_frequency=0
    )
    networks.add_network(v, "prod", site="dc1", subnets=["default=10.0.0.0/24,dns=10.0.0.53"])
    networks.add_network(v, "app", site="dc1", subnets=["front=10.0.1.0/24", "back=10.0.2.0/24"])
    yield v
    v.close()


def enable(vault: Vault, machine: str) -> None:
    protection.enable_replication(vault, machine, policy="p", recovery_site="dr")


def plan(vault: Vault, item: str, purpose: str = "failover", **kw: Any) -> dict[str, Any]:
    with vault.store.uow() as s:
        return networks.plan_failover_network(s, protection.get_item(s, item), purpose=purpose, **kw)


def allocations(vault: Vault) -> list[tuple[str, str, str, str]]:
    """(network, address, owner, purpose) of every allocation."""
    with vault.store.uow() as s:
        rows = s.scalars(select(IpAllocationRow).order_by(IpAllocationRow.address))
        return [(a.subnet.network.name, a.address, a.owner, a.purpose) for a in rows]


def set_nic(vault: Vault, item: str, nic_name: str, **kw: Any) -> dict[str, Any]:
    return networks.update_nic(vault, item, nic_name, **kw)


# ---------------------------------------------------------------------------------------------
# Enable: mirrors, mappings, defaults


def test_enable_makes_mirror_network_with_same_space_and_both_mappings(vault: Vault) -> None:
    enable(vault, "web01")
    nets = {(n["site"], n["name"]): n for n in networks.list_networks(vault)}
    mirror = nets[("dr", "prod-asr")]
    assert mirror["mirror_of"] == "dc1/prod"
    assert [(x["name"], x["cidr"], x["gateway"], x["dns"]) for x in mirror["subnets"]] == [
        ("default", "10.0.0.0/24", "10.0.0.1", ["10.0.0.53"])
    ]
    maps = {(m["source"], m["target"]) for m in networks.list_mappings(vault)}
    assert maps == {("dc1/prod", "dr/prod-asr"), ("dr/prod-asr", "dc1/prod")}
    settings = networks.item_settings(vault, "web01")
    assert [(n["nic"], n["role"], n["network"], n["subnet"], n["ip"]) for n in settings["nics"]] == [
        ("nic0", "primary", "prod-asr", "default", "auto"),
        ("nic1", "secondary", "prod-asr", "default", "auto"),
    ]
    assert settings["size"]["name"] == "medium"  # 2 CPU, 2048 MiB: the next larger size
    # A second machine on the same network reuses the mirror and its mappings.
    enable(vault, "db01")
    assert len(networks.list_mappings(vault)) == 2


def test_enable_uses_an_existing_mapping_instead_of_a_mirror(vault: Vault) -> None:
    networks.add_network(vault, "dr-prod", site="dr", subnets=["default=10.20.0.0/24"])
    networks.add_mapping(vault, source="dc1/prod", target="dr/dr-prod")
    enable(vault, "db01")
    assert [n["name"] for n in networks.list_networks(vault, "dr")] == ["dr-prod"]
    p = plan(vault, "db01")
    # The source address is not in the target subnet: the next free one is taken.
    assert p["nics"][0]["ip"] == "10.20.0.4"
    assert p["nics"][0]["network"] == "dr-prod"


def test_enable_machine_on_undefined_network_is_refused_and_creates_nothing(vault: Vault) -> None:
    with pytest.raises(InvalidInput) as err:
        enable(vault, "stray")
    assert str(err.value) == (
        "machine stray nic0 is on network 'dmz', which site dc1 does not define; add it with 'siterecovery "
        "network add dmz --site dc1 --subnet default=CIDR' (the subnet that holds 10.5.0.9)."
    )
    assert protection.status(vault, worker_running=True) == []
    assert networks.list_networks(vault, "dr") == []


def test_nic_on_no_network_is_not_created(vault: Vault) -> None:
    enable(vault, "lonely")
    settings = networks.item_settings(vault, "lonely")
    assert settings["nics"][0]["role"] == "none"
    assert settings["nics_not_created"] == [
        {"name": "nic0", "reason": "not connected to a network in the inventory"}
    ]
    p = plan(vault, "lonely")
    assert p["nics"] == []
    with pytest.raises(InvalidInput, match="is on no network in the inventory"):
        set_nic(vault, "lonely", "nic0", role="primary")


# ---------------------------------------------------------------------------------------------
# Failover plans


def test_failover_keeps_source_ip_dhcp_stays_dhcp_and_records_allocation(vault: Vault) -> None:
    enable(vault, "web01")
    p = plan(vault, "web01")
    assert p["site"] == "dr"
    assert p["size"] == {"name": "medium", "cpus": 2, "memory_mib": 4096, "max_nics": 4}
    assert p["nics"] == [
        {
            "name": "nic0",
            "mac": "52:54:00:00:02:01",
            "network": "prod-asr",
            "subnet": "default",
            "cidr": "10.0.0.0/24",
            "prefix": 24,
            "gateway": "10.0.0.1",
            "dns": ["10.0.0.53"],
            "ip": "10.0.0.10",
            "primary": True,
        },
        {
            "name": "nic1",
            "mac": "52:54:00:00:02:02",
            "network": "prod-asr",
            "subnet": "default",
            "cidr": "10.0.0.0/24",
            "prefix": 24,
            "gateway": "10.0.0.1",
            "dns": ["10.0.0.53"],
            "ip": "dhcp",
            "primary": False,
        },
    ]
    assert p["nics_not_created"] == [] and p["test_network"] is None
    assert allocations(vault) == [("prod-asr", "10.0.0.10", "web01", "failover")]
    # A repeated plan (a job step run again) replaces its own allocation, it does not collide.
    assert plan(vault, "web01")["nics"][0]["ip"] == "10.0.0.10"
    assert allocations(vault) == [("prod-asr", "10.0.0.10", "web01", "failover")]


def test_source_ip_taken_at_target_gives_next_free(vault: Vault) -> None:
    enable(vault, "web01")
    enable(vault, "db01")
    set_nic(vault, "db01", "nic0", ip="10.0.0.10")  # free now; web01 takes it first
    assert plan(vault, "web01")["nics"][0]["ip"] == "10.0.0.10"
    with pytest.raises(OperationNotAllowed) as err:
        plan(vault, "db01")
    assert "db01 nic0 (failover): address 10.0.0.10 is taken by web01 (failover, nic0)" in str(err.value)
    assert "siterecovery replication nic db01 nic0 --ip ADDRESS|auto|dhcp" in str(err.value)
    assert allocations(vault) == [("prod-asr", "10.0.0.10", "web01", "failover")]  # nothing changed
    set_nic(vault, "db01", "nic0", ip="auto")
    assert plan(vault, "db01")["nics"][0]["ip"] == "10.0.0.11"


def test_requested_static_ip_taken_is_refused_when_set(vault: Vault) -> None:
    enable(vault, "web01")
    enable(vault, "db01")
    plan(vault, "web01")
    with pytest.raises(OperationNotAllowed, match=r"10\.0\.0\.10 is taken by web01 \(failover, nic0\)"):
        set_nic(vault, "db01", "nic0", ip="10.0.0.10")
    with pytest.raises(InvalidInput, match=r"10\.0\.0\.1 is reserved"):
        set_nic(vault, "db01", "nic0", ip="10.0.0.1")
    with pytest.raises(InvalidInput, match=r"10\.9\.0\.1 is not in subnet 10\.0\.0\.0/24"):
        set_nic(vault, "db01", "nic0", ip="10.9.0.1")
    with pytest.raises(OperationNotAllowed, match="the gateway of subnet default|a DNS server"):
        set_nic(vault, "db01", "nic0", ip="10.0.0.53")
    assert networks.item_settings(vault, "db01")["nics"][0]["ip"] == "auto"


def test_target_subnet_defaults_to_same_name_and_can_be_chosen(vault: Vault) -> None:
    enable(vault, "app01")
    settings = networks.item_settings(vault, "app01")
    assert settings["nics"][0]["subnet"] == "front"  # the source address is in dc1/app front
    assert plan(vault, "app01")["nics"][0]["ip"] == "10.0.1.7"
    set_nic(vault, "app01", "nic0", ip="10.0.1.7")  # its own failover address: not taken from itself
    with pytest.raises(InvalidInput, match=r"10\.0\.1\.7 is not in subnet 10\.0\.2\.0/24"):
        set_nic(vault, "app01", "nic0", subnet="back")
    set_nic(vault, "app01", "nic0", subnet="back", ip="10.0.2.50")
    p = plan(vault, "app01")
    assert (p["nics"][0]["subnet"], p["nics"][0]["ip"]) == ("back", "10.0.2.50")
    assert allocations(vault) == [("app-asr", "10.0.2.50", "app01", "failover")]
    with pytest.raises(
        InvalidInput, match=r"subnet 'nope' is not in network dr/app-asr \(subnets: back, front"
    ):
        set_nic(vault, "app01", "nic0", subnet="nope")


def test_machine_at_target_site_counts_as_taken_but_not_the_items_own(vault: Vault) -> None:
    """A failback: the plan goes to dc1, where web01 (the item's own machine) and db01 run. The
    item's settings for the recovery site (address, size) do not apply there."""
    enable(vault, "web01")
    set_nic(vault, "web01", "nic0", ip="10.0.0.20")
    networks.update_item_target(vault, "web01", target_size="large")
    with vault.store.uow() as s:
        item = protection.get_item(s, "web01")
        recovered = {**item.machine.spec, "nics": [nic("nic0", "10.0.0.10", "prod-asr")]}
        back = networks.plan_failover_network(
            s,
            item,
            purpose="failover",
            source_spec=recovered,
            source_site=item.recovery_site,
            target_site=item.source_site,
        )
        assert back["site"] == "dc1" and back["nics"][0]["network"] == "prod"
        assert back["nics"][0]["ip"] == "10.0.0.10"  # its own address at dc1
        assert back["size"]["name"] == "medium"  # dc1's default catalogue, not the item's "large"
        recovered = {**item.machine.spec, "nics": [nic("nic0", "10.0.0.11", "prod-asr")]}
        back = networks.plan_failover_network(
            s,
            item,
            purpose="failover",
            source_spec=recovered,
            source_site=item.recovery_site,
            target_site=item.source_site,
        )
        assert back["nics"][0]["ip"] == "10.0.0.4"  # 10.0.0.11 is db01's at dc1


# ---------------------------------------------------------------------------------------------
# Test failover plans


def test_test_failover_gets_its_own_network_keeps_ip_and_is_cleaned_up(vault: Vault) -> None:
    enable(vault, "web01")
    p = plan(vault, "web01", "test")
    test_net = p["test_network"]
    assert test_net.startswith("web01-test-") and len(test_net) == len("web01-test-") + 6
    assert [n["network"] for n in p["nics"]] == [test_net, test_net]
    assert p["nics"][0]["ip"] == "10.0.0.10" and p["nics"][1]["ip"] == "dhcp"
    nets = {n["name"]: n for n in networks.list_networks(vault, "dr")}
    assert nets[test_net]["purpose"] == "test"
    assert [x["cidr"] for x in nets[test_net]["subnets"]] == ["10.0.0.0/24"]
    assert allocations(vault) == [(test_net, "10.0.0.10", "web01-test", "test")]
    with vault.store.uow() as s:
        networks.remove_test_network(s, test_net)
        networks.remove_test_network(s, test_net)  # a repeated cleanup step is fine
    assert allocations(vault) == []
    assert test_net not in {n["name"] for n in networks.list_networks(vault)}


def test_repeated_test_plan_replaces_its_earlier_network(vault: Vault) -> None:
    enable(vault, "web01")
    first = plan(vault, "web01", "test")["test_network"]
    second = plan(vault, "web01", "test")["test_network"]
    assert first != second
    assert [n["name"] for n in networks.list_networks(vault, "dr")] == sorted(["prod-asr", second])


def test_mapped_test_network_keeps_ip_if_free_else_takes_from_end(vault: Vault) -> None:
    networks.add_network(vault, "drill", site="dr", subnets=["default=10.0.0.0/24"], purpose="test")
    networks.add_network(vault, "dr-prod", site="dr", subnets=["default=10.0.0.0/24"])
    networks.add_mapping(vault, source="dc1/prod", target="dr/dr-prod", test="dr/drill")
    enable(vault, "web01")
    enable(vault, "db01")
    set_nic(vault, "db01", "nic0", ip="10.0.0.10")
    p = plan(vault, "web01", "test")
    assert p["test_network"] is None
    assert (p["nics"][0]["network"], p["nics"][0]["ip"]) == ("drill", "10.0.0.10")
    # db01 fails over to 10.0.0.10; in the drill network that address is web01-test's: from the end.
    assert plan(vault, "db01", "test")["nics"][0]["ip"] == "10.0.0.254"
    set_nic(vault, "db01", "nic0", test_ip="10.0.0.77")
    assert plan(vault, "db01", "test")["nics"][0]["ip"] == "10.0.0.77"
    with pytest.raises(OperationNotAllowed, match=r"10\.0\.0\.10 is taken by web01-test \(test, nic0\)"):
        set_nic(vault, "db01", "nic0", test_ip="10.0.0.10")


def test_refused_test_plan_makes_no_network(vault: Vault) -> None:
    enable(vault, "web01")
    networks.update_site_capacity(vault, "dr", cpus=1)
    with pytest.raises(OperationNotAllowed, match="recovery site dr has no room"):
        plan(vault, "web01", "test")
    assert [n["name"] for n in networks.list_networks(vault, "dr")] == ["prod-asr"]
    assert allocations(vault) == []


def test_release_addresses_gives_back_one_purpose(vault: Vault) -> None:
    enable(vault, "web01")
    plan(vault, "web01")
    plan(vault, "web01", "test")
    with vault.store.uow() as s:
        item = protection.get_item(s, "web01")
        assert networks.release_addresses(s, item.id, "failover") == 1
    assert [a[3] for a in allocations(vault)] == ["test"]


# ---------------------------------------------------------------------------------------------
# Sizes, NIC caps, capacity


def test_nics_beyond_the_size_are_not_created_and_the_plan_says_why(vault: Vault) -> None:
    networks.add_size(vault, "tiny", site="dr", cpus=1, memory_mib="1G", max_nics=1)
    enable(vault, "big")
    assert networks.item_settings(vault, "big")["size"]["name"] == "tiny"  # smallest that fits
    set_nic(vault, "big", "nic2", role="primary")
    p = plan(vault, "big")
    assert [(n["name"], n["primary"]) for n in p["nics"]] == [("nic2", True)]
    assert p["nics_not_created"] == [
        {"name": "nic0", "reason": "size tiny allows 1 NIC"},
        {"name": "nic1", "reason": "size tiny allows 1 NIC"},
    ]
    p = plan(vault, "big", size_override="medium")
    assert [n["name"] for n in p["nics"]] == ["nic2", "nic0", "nic1"]


def test_explicit_size_smaller_than_machine_is_refused(vault: Vault) -> None:
    enable(vault, "web01")
    with pytest.raises(
        InvalidInput, match=r"size small .* is smaller than the machine.*sizes that fit: medium, large"
    ):
        networks.update_item_target(vault, "web01", target_size="small")
    with pytest.raises(NotFound, match="size 'huge' not found at site dr"):
        networks.update_item_target(vault, "web01", target_size="huge")
    assert networks.update_item_target(vault, "web01", target_size="large")["size"]["name"] == "large"
    assert plan(vault, "web01")["size"]["name"] == "large"
    assert networks.update_item_target(vault, "web01", target_size="auto")["size"]["name"] == "medium"


def test_capacity_counts_running_machines_and_refuses_with_the_numbers(vault: Vault) -> None:
    enable(vault, "web01")
    enable(vault, "db01")
    networks.update_site_capacity(vault, "dr", cpus=2, memory="8G")
    with vault.store.uow() as s:
        db = protection.get_item(s, "db01")
        db.recovered_machine = {"site": "dr", "size": {"name": "small", "cpus": 1, "memory_mib": 1024}}
    with pytest.raises(OperationNotAllowed) as err:
        plan(vault, "web01")
    assert str(err.value) == (
        "recovery site dr has no room: 1 of 2 CPUs in use, web01 needs 2 (size medium); clean up test "
        "failovers, pick a smaller size with 'siterecovery replication update web01 --target-size NAME', or "
        "raise the capacity with 'siterecovery site update dr --capacity-cpus N --capacity-memory SIZE'."
    )
    info = networks.update_site_capacity(vault, "dr", cpus="unlimited")
    assert info == {
        "name": "dr",
        "capacity_cpus": None,
        "capacity_memory_mib": 8192,
        "used_cpus": 1,
        "used_memory_mib": 1024,
    }
    assert plan(vault, "web01")["size"]["name"] == "medium"


def test_size_catalogue_seeded_extended_and_guarded(vault: Vault) -> None:
    names = [s["name"] for s in networks.list_sizes(vault, "dr")]
    assert names == ["small", "medium", "large", "xlarge", "2xlarge"]
    with pytest.raises(AlreadyExists):
        networks.add_size(vault, "small", site="dr", cpus=1, memory_mib=512, max_nics=1)
    enable(vault, "web01")
    networks.update_item_target(vault, "web01", target_size="large")
    with pytest.raises(OperationNotAllowed, match="size large is the target size of web01"):
        networks.delete_size(vault, "large", site="dr")
    networks.delete_size(vault, "xlarge", site="dr")
    assert "xlarge" not in [s["name"] for s in networks.list_sizes(vault, "dr")]


def test_site_without_sizes_uses_the_default_catalogue(vault: Vault) -> None:
    with vault.store.uow() as s:
        s.query(SizeRow).delete()  # a recovery site made before size catalogues existed
    assert [s["name"] for s in networks.list_sizes(vault, "dr")][0] == "small"
    networks.add_size(vault, "jumbo", site="dr", cpus=64, memory_mib="256G", max_nics=16)
    assert len(networks.list_sizes(vault, "dr")) == 6  # the defaults were kept, jumbo added


# ---------------------------------------------------------------------------------------------
# Roles


def test_making_a_nic_primary_demotes_the_former_one_and_one_primary_is_required(vault: Vault) -> None:
    enable(vault, "web01")
    view = set_nic(vault, "web01", "nic1", role="primary")
    assert [(n["nic"], n["role"]) for n in view["nics"]] == [("nic0", "secondary"), ("nic1", "primary")]
    with pytest.raises(InvalidInput, match=r"no NIC is primary \(nic0 secondary, nic1 none\)"):
        set_nic(vault, "web01", "nic1", role="none")
    set_nic(vault, "web01", "nic0", role="none")
    p = plan(vault, "web01")
    assert [n["name"] for n in p["nics"]] == ["nic1"]
    assert p["nics_not_created"] == [{"name": "nic0", "reason": "role none: set not to be created"}]
    with pytest.raises(InvalidInput, match="role 'main' is not allowed"):
        set_nic(vault, "web01", "nic0", role="main")
    with pytest.raises(NotFound, match="web01 has no NIC 'nic7'; its NICs: nic0, nic1"):
        set_nic(vault, "web01", "nic7", role="secondary")


# ---------------------------------------------------------------------------------------------
# Networks and mappings: refusals


def test_network_add_refusals(vault: Vault) -> None:
    with pytest.raises(AlreadyExists, match="network 'prod' already exists at site dc1"):
        networks.add_network(vault, "prod", site="dc1", subnets=["default=10.9.0.0/24"])
    with pytest.raises(InvalidInput, match="needs at least one subnet"):
        networks.add_network(vault, "empty", site="dc1", subnets=[])
    with pytest.raises(InvalidInput, match="overlap"):
        networks.add_network(vault, "o", site="dc1", subnets=["a=10.9.0.0/16", "b=10.9.1.0/24"])
    with pytest.raises(NotFound, match="site 'nowhere' not found"):
        networks.add_network(vault, "x", site="nowhere", subnets=["a=10.9.0.0/24"])


def test_mapping_refusals(vault: Vault) -> None:
    networks.add_network(vault, "dr-prod", site="dr", subnets=["default=10.0.0.0/24"])
    with pytest.raises(InvalidInput, match="same site"):
        networks.add_mapping(vault, source="dc1/prod", target="dc1/app")
    with pytest.raises(InvalidInput, match="is not SITE/NETWORK"):
        networks.add_mapping(vault, source="prod", target="dr/dr-prod")
    with pytest.raises(InvalidInput, match="the target network itself"):
        networks.add_mapping(vault, source="dc1/prod", target="dr/dr-prod", test="dr/dr-prod")
    networks.add_mapping(vault, source="dc1/prod", target="dr/dr-prod")
    with pytest.raises(AlreadyExists, match="already mapped to site dr: dc1/prod -> dr/dr-prod"):
        networks.add_mapping(vault, source="dc1/prod", target="dr/dr-prod")
    with pytest.raises(NotFound, match="network 'nope' not found at site dr"):
        networks.add_mapping(vault, source="dc1/app", target="dr/nope")


def test_delete_network_and_mapping_refused_while_used(vault: Vault) -> None:
    enable(vault, "web01")
    with pytest.raises(OperationNotAllowed, match="dc1/prod is used by network mapping"):
        networks.delete_network(vault, "prod", site="dc1")
    with pytest.raises(OperationNotAllowed, match="mapping dc1/prod -> dr/prod-asr is used by web01"):
        networks.delete_mapping(vault, source="dc1/prod", target="dr/prod-asr")
    test_net = plan(vault, "web01", "test")["test_network"]
    with pytest.raises(
        OperationNotAllowed, match=r"has addresses in use: 10\.0\.0\.10 by web01-test \(test\)"
    ):
        networks.delete_network(vault, test_net, site="dr")
    # Unused: the reverse mapping and a network nobody maps.
    networks.delete_mapping(vault, source="dr/prod-asr", target="dc1/prod")
    networks.delete_network(vault, "app", site="dc1")
    with vault.store.uow() as s:
        assert s.scalar(select(func.count()).select_from(NetworkMappingRow)) == 1
        assert s.scalar(select(NetworkRow).where(NetworkRow.name == "app")) is None
