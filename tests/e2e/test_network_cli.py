"""End-to-end tests of the network, mapping, size and item-settings commands, run as a user would
(the CLI in a subprocess) on a small raw site: networks and subnets, the "-asr" mirror and
mappings that enabling replication makes, per-NIC settings and target sizes with their refusals
and exit codes, site capacity, and ``--json`` on every listing.

One module-scoped lab: a raw primary site ``dc1`` with ``web01`` (one 1 MiB image, three NICs on
``prod``, the second on DHCP) and ``stray`` (a NIC on ``dmz``, a network dc1 does not define),
a raw recovery site ``dr``, and web01 protected. Tests that change a setting put it back before
they end, so they can run in any order.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_cli import Run, run_cli

from siterecovery.demo.fabric import fill_image, write_inventory

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
INVALID_INPUT, NOT_FOUND, ALREADY_EXISTS, NOT_ALLOWED = 2, 3, 4, 5


class NetLab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.vault = root / "vault"

    def run(self, *args: str, expect: int | None = 0) -> Run:
        return run_cli(self.vault, *args, expect=expect)


def nic(name: str, ip: str, network: str, tail: int) -> dict[str, str]:
    return {"name": name, "mac": f"52:54:00:00:03:{tail:02x}", "ip": ip, "network": network}


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    root = Path(tempfile.mkdtemp(prefix="sr-net-"))
    made = NetLab(root)
    try:
        disks = {}
        for i, name in enumerate(("web01", "stray")):
            disks[name] = root / "disks" / f"{name}.img"
            fill_image(disks[name], MIB, 256 * 1024, seed=i, fmt="raw")
        write_inventory(
            root / "inventory.toml",
            [
                {
                    "name": "web01",
                    "cpus": 1,
                    "memory_mib": 1024,
                    "disk": [{"name": "disk0", "path": disks["web01"]}],
                    "nic": [
                        nic("nic0", "10.0.0.10", "prod", 1),
                        nic("nic1", "dhcp", "prod", 2),
                        nic("nic2", "10.0.0.12", "prod", 3),
                    ],
                },
                {
                    "name": "stray",
                    "disk": [{"name": "disk0", "path": disks["stray"]}],
                    "nic": [nic("nic0", "10.5.0.9", "dmz", 4)],
                },
            ],
        )
        made.run("vault", "create", "nets")
        made.run(
            "site",
            "add",
            "dc1",
            "--kind",
            "raw",
            "--role",
            "primary",
            "--inventory",
            str(root / "inventory.toml"),
        )
        made.run("site", "add", "dr", "--kind", "raw", "--role", "recovery", "--path", str(root / "dr"))
        made.run("site", "discover", "dc1")
        made.run("network", "add", "prod", "--site", "dc1", "--subnet", "default=10.0.0.0/24,dns=10.0.0.53")
        made.run("policy", "create", "p", "--crash-frequency", "5m", "--app-frequency", "0")
        made.run("replication", "enable", "web01", "--policy", "p", "--recovery-site", "dr")
        yield made
    finally:
        if (made.vault / "vault.key").exists():
            run_cli(made.vault, "worker", "stop", expect=None)
        with contextlib.suppress(Exception):
            shutil.rmtree(root, ignore_errors=True)


def settings(lab: NetLab) -> dict:
    return lab.run("replication", "settings", "web01", "--json").json()


# ---------------------------------------------------------------------------------------------
# Networks and mappings


def test_enable_made_the_mirror_network_and_mappings_both_ways(lab: NetLab) -> None:
    nets = {(n["site"], n["name"]): n for n in lab.run("network", "list", "--json").json()}
    assert set(nets) == {("dc1", "prod"), ("dr", "prod-asr")}
    mirror = nets[("dr", "prod-asr")]
    assert mirror["mirror_of"] == "dc1/prod"
    assert [(s["name"], s["cidr"], s["gateway"], s["dns"]) for s in mirror["subnets"]] == [
        ("default", "10.0.0.0/24", "10.0.0.1", ["10.0.0.53"])
    ]
    assert nets[("dc1", "prod")]["mapped_to"] == ["dr/prod-asr"]
    maps = {(m["source"], m["target"], m["test"]) for m in lab.run("network", "map", "list", "--json").json()}
    assert maps == {("dc1/prod", "dr/prod-asr", None), ("dr/prod-asr", "dc1/prod", None)}


def test_enable_machine_on_undefined_network_says_how_to_define_it(lab: NetLab) -> None:
    run = lab.run(
        "replication", "enable", "stray", "--policy", "p", "--recovery-site", "dr", expect=INVALID_INPUT
    )
    assert (
        "machine stray nic0 is on network 'dmz', which site dc1 does not define; add it with "
        "'siterecovery network add dmz --site dc1 --subnet default=CIDR'" in run.error
    )
    assert [i["name"] for i in lab.run("status", "--json").json()] == ["web01"]


def test_network_add_with_test_purpose_map_and_delete(lab: NetLab) -> None:
    lab.run(
        "network", "add", "other", "--site", "dc1", "--subnet", "a=10.7.0.0/24", "--subnet", "b=10.8.0.0/24"
    )
    lab.run("network", "add", "other-dr", "--site", "dr", "--subnet", "a=10.7.0.0/24")
    lab.run("network", "add", "drill", "--site", "dr", "--subnet", "a=10.7.0.0/24", "--purpose", "test")
    try:
        info = lab.run(
            "network",
            "map",
            "add",
            "--source",
            "dc1/other",
            "--target",
            "dr/other-dr",
            "--test",
            "dr/drill",
            "--json",
        ).json()
        assert (info["source"], info["target"], info["test"]) == ("dc1/other", "dr/other-dr", "dr/drill")
        again = lab.run(
            "network", "map", "add", "--source", "dc1/other", "--target", "dr/drill", expect=INVALID_INPUT
        )
        assert "dr/drill is a test network; give it as --test" in again.error
        busy = lab.run("network", "delete", "other-dr", "--site", "dr", expect=NOT_ALLOWED)
        assert "is used by network mapping(s): dc1/other -> dr/other-dr (test dr/drill)" in busy.error
        assert "siterecovery network map delete --source dc1/other --target dr/other-dr" in busy.error
    finally:
        lab.run("network", "map", "delete", "--source", "dc1/other", "--target", "dr/other-dr", expect=None)
        for name, site in (("other", "dc1"), ("other-dr", "dr"), ("drill", "dr")):
            lab.run("network", "delete", name, "--site", site, expect=None)
    names = {n["name"] for n in lab.run("network", "list", "--json").json()}
    assert names == {"prod", "prod-asr"}


def test_network_in_use_cannot_be_deleted_nor_its_mapping(lab: NetLab) -> None:
    run = lab.run("network", "delete", "prod", "--site", "dc1", expect=NOT_ALLOWED)
    assert "network dc1/prod is used by network mapping(s)" in run.error
    run = lab.run(
        "network", "map", "delete", "--source", "dc1/prod", "--target", "dr/prod-asr", expect=NOT_ALLOWED
    )
    assert "mapping dc1/prod -> dr/prod-asr is used by web01; disable their replication first." in run.error


@pytest.mark.parametrize(
    ("subnet", "message"),
    [
        ("10.9.0.0/24", "is not NAME=CIDR"),
        ("a=10.9.0.5/24", "has host bits set: the subnet is 10.9.0.0/24"),
        ("a=10.9.0.0/30", "too small"),
        ("a=10.9.0.0/24,gateway=10.1.1.1", "gateway 10.1.1.1 is not a host address of 10.9.0.0/24"),
    ],
)
def test_network_add_bad_subnet_is_refused(lab: NetLab, subnet: str, message: str) -> None:
    run = lab.run("network", "add", "bad", "--site", "dc1", "--subnet", subnet, expect=INVALID_INPUT)
    assert message in run.error


def test_network_add_twice_and_unknown_site(lab: NetLab) -> None:
    run = lab.run(
        "network", "add", "prod", "--site", "dc1", "--subnet", "d=10.0.0.0/24", expect=ALREADY_EXISTS
    )
    assert "network 'prod' already exists at site dc1" in run.error
    run = lab.run("network", "add", "x", "--site", "nowhere", "--subnet", "d=10.0.0.0/24", expect=NOT_FOUND)
    assert "site 'nowhere' not found. Known sites: dc1, dr." in run.error


# ---------------------------------------------------------------------------------------------
# Item settings: NICs and target size


def test_settings_show_defaults_and_nics_the_size_cannot_hold(lab: NetLab) -> None:
    info = settings(lab)
    assert info["size"] == {"name": "small", "cpus": 1, "memory_mib": 1024, "max_nics": 2}
    assert info["target_size"] is None
    assert [
        (n["nic"], n["role"], n["network"], n["subnet"], n["ip"], n["created"]) for n in info["nics"]
    ] == [
        ("nic0", "primary", "prod-asr", "default", "auto", True),
        ("nic1", "secondary", "prod-asr", "default", "auto", True),
        ("nic2", "secondary", "prod-asr", "default", "auto", False),
    ]
    assert info["nics_not_created"] == [{"name": "nic2", "reason": "size small allows 2 NICs"}]
    human = lab.run("replication", "settings", "web01")
    assert "nic2 will not be created: size small allows 2 NICs" in " ".join(human.stdout.split())


def test_target_size_too_small_is_refused_and_larger_one_creates_all_nics(lab: NetLab) -> None:
    lab.run("size", "add", "nano", "--site", "dr", "--cpus", "1", "--memory", "512M", "--max-nics", "1")
    try:
        run = lab.run("replication", "update", "web01", "--target-size", "nano", expect=INVALID_INPUT)
        assert "size nano (1 CPU, 512 MiB, 1 NICs) is smaller than the machine (1 CPU, 1024 MiB)" in run.error
        assert "sizes that fit: small, medium, large, xlarge, 2xlarge." in run.error
        info = lab.run("replication", "update", "web01", "--target-size", "medium", "--json").json()
        assert info["size"]["name"] == "medium" and info["nics_not_created"] == []
        run = lab.run("size", "delete", "medium", "--site", "dr", expect=NOT_ALLOWED)
        assert "size medium is the target size of web01" in run.error
    finally:
        lab.run("replication", "update", "web01", "--target-size", "auto")
        lab.run("size", "delete", "nano", "--site", "dr")
    assert settings(lab)["size"]["name"] == "small"


def test_nic_roles_one_primary_and_moving_it(lab: NetLab) -> None:
    run = lab.run("replication", "nic", "web01", "nic0", "--role", "none", expect=INVALID_INPUT)
    assert "web01: no NIC is primary (nic0 none, nic1 secondary, nic2 secondary)" in run.error
    assert "'siterecovery replication nic web01 NIC --role primary'" in run.error
    try:
        info = lab.run("replication", "nic", "web01", "nic2", "--role", "primary", "--json").json()
        assert [(n["nic"], n["role"], n["created"]) for n in info["nics"]] == [
            ("nic0", "secondary", True),
            ("nic1", "secondary", False),
            ("nic2", "primary", True),
        ]
        assert info["nics_not_created"] == [{"name": "nic1", "reason": "size small allows 2 NICs"}]
    finally:
        lab.run("replication", "nic", "web01", "nic0", "--role", "primary")
    assert [n["role"] for n in settings(lab)["nics"]] == ["primary", "secondary", "secondary"]


def test_nic_static_ip_checked_against_subnet(lab: NetLab) -> None:
    run = lab.run("replication", "nic", "web01", "nic0", "--ip", "10.0.0.2", expect=INVALID_INPUT)
    assert "web01 nic0 --ip: address 10.0.0.2 is reserved in 10.0.0.0/24" in run.error
    assert "usable addresses of 10.0.0.0/24 are 10.0.0.4-10.0.0.254" in run.error
    run = lab.run("replication", "nic", "web01", "nic0", "--ip", "10.0.0.53", expect=NOT_ALLOWED)
    assert "address 10.0.0.53 is taken by a DNS server of subnet default" in run.error
    run = lab.run("replication", "nic", "web01", "nic0", "--subnet", "nope", expect=INVALID_INPUT)
    assert "subnet 'nope' is not in network dr/prod-asr (subnets: default; or 'auto')" in run.error
    run = lab.run("replication", "nic", "web01", "nic9", "--ip", "dhcp", expect=NOT_FOUND)
    assert "web01 has no NIC 'nic9'; its NICs: nic0, nic1, nic2." in run.error
    try:
        info = lab.run(
            "replication", "nic", "web01", "nic0", "--ip", "10.0.0.99", "--test-ip", "10.0.0.200", "--json"
        ).json()
        assert (info["nics"][0]["ip"], info["nics"][0]["test_ip"]) == ("10.0.0.99", "10.0.0.200")
    finally:
        lab.run("replication", "nic", "web01", "nic0", "--ip", "auto", "--test-ip", "auto")
    assert (settings(lab)["nics"][0]["ip"], settings(lab)["nics"][0]["test_ip"]) == ("auto", "auto")


# ---------------------------------------------------------------------------------------------
# Sizes and capacity


def test_size_catalogue_is_seeded_at_recovery_sites(lab: NetLab) -> None:
    sizes = lab.run("size", "list", "--site", "dr", "--json").json()
    assert [(s["name"], s["cpus"], s["memory_mib"], s["max_nics"]) for s in sizes] == [
        ("small", 1, 1024, 2),
        ("medium", 2, 4096, 4),
        ("large", 4, 8192, 8),
        ("xlarge", 8, 16384, 8),
        ("2xlarge", 16, 65536, 8),
    ]
    run = lab.run(
        "size", "add", "small", "--site", "dr", "--cpus", "1", "--memory", "1G", "--max-nics", "1", expect=4
    )
    assert "size 'small' already exists at site dr" in run.error
    run = lab.run(
        "size", "add", "odd", "--site", "dr", "--cpus", "1", "--memory", "1.5G", "--max-nics", "1", expect=2
    )
    assert "--memory '1.5G' is not understood" in run.error
    run = lab.run("size", "delete", "huge", "--site", "dr", expect=NOT_FOUND)
    assert "size 'huge' not found at site dr. Sizes: small, medium, large, xlarge, 2xlarge" in run.error


def test_site_capacity_update(lab: NetLab) -> None:
    try:
        info = lab.run(
            "site", "update", "dr", "--capacity-cpus", "16", "--capacity-memory", "64G", "--json"
        ).json()
        assert info == {
            "name": "dr",
            "capacity_cpus": 16,
            "capacity_memory_mib": 65536,
            "used_cpus": 0,
            "used_memory_mib": 0,
        }
        human = lab.run("site", "update", "dr", "--capacity-cpus", "8")
        assert "site dr: capacity 8 CPUs, 65536 MiB; in use 0 CPUs, 0 MiB" in " ".join(human.stdout.split())
        run = lab.run("site", "update", "dr", "--capacity-cpus", "many", expect=INVALID_INPUT)
        assert "--capacity-cpus 'many' is not a whole number (or 'unlimited')" in run.error
        run = lab.run("site", "update", "dr", expect=INVALID_INPUT)
        assert "nothing to change" in run.error
    finally:
        info = lab.run(
            "site", "update", "dr", "--capacity-cpus", "unlimited", "--capacity-memory", "unlimited", "--json"
        ).json()
    assert info["capacity_cpus"] is None and info["capacity_memory_mib"] is None


LIST_COMMANDS = [
    ["network", "list"],
    ["network", "list", "--site", "dr"],
    ["network", "map", "list"],
    ["size", "list", "--site", "dr"],
]


def test_every_new_list_command_prints_json(lab: NetLab) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(lambda command: lab.run(*command, "--json"), LIST_COMMANDS))
    for command, run in zip(LIST_COMMANDS, runs, strict=True):
        data = run.json()
        assert isinstance(data, list) and data, command
        assert all(isinstance(row, dict) for row in data), command
