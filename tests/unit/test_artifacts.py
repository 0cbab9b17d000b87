"""Machine artifacts: domain.xml, the cloud-init NoCloud seed and its ISO, read back and checked.

Writes into pytest's tmp_path (the module's job is writing files)."""

from __future__ import annotations

import io
import json
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from siterecovery.adapters.compute.artifacts import (
    disk_target,
    hostname_for,
    mac_for,
    write_machine_artifacts,
)
from siterecovery.errors import InvalidInput


def machine(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "web_01",
        "source_machine": "web_01",
        "role": "failover",
        "recovery_point": {"id": "rp-7", "time": 1700000000.0, "type": "crash-consistent"},
        "size": {"name": "medium", "cpus": 2, "memory_mib": 2048, "max_nics": 2},
        "cpus": 2,
        "memory_mib": 2048,
        "os": "linux",
        "disks": [
            {"name": "disk0", "path": "/srv/rec/web_01/disk0.qcow2", "format": "qcow2", "size": 1 << 30},
            {"name": "disk1", "path": "/srv/rec/web_01/disk1.img", "format": "raw", "size": 1 << 29},
        ],
        "nics": [
            {
                "name": "nic0",
                "mac": "52:54:00:AA:00:01",
                "network": "recovery-net",
                "subnet": "app",
                "cidr": "10.20.0.0/24",
                "prefix": 24,
                "gateway": "10.20.0.1",
                "dns": ["10.20.0.53", "1.1.1.1"],
                "ip": "10.20.0.15",
                "primary": True,
            },
            {
                "name": "nic1",
                "mac": None,
                "network": "backup-net",
                "subnet": "backup",
                "cidr": "10.30.0.0/24",
                "prefix": 24,
                "gateway": "10.30.0.1",
                "dns": [],
                "ip": "10.30.0.9",
                "primary": False,
            },
            {
                "name": "nic2",
                "mac": "52:54:00:aa:00:03",
                "network": "dhcp-net",
                "subnet": "dyn",
                "cidr": "192.168.5.0/24",
                "prefix": 24,
                "gateway": None,
                "dns": [],
                "ip": "dhcp",
                "primary": False,
            },
            {
                "name": "nic3",
                "mac": "52:54:00:aa:00:04",
                "network": "v6-net",
                "subnet": "v6",
                "cidr": "2001:db8:1::/64",
                "prefix": 64,
                "gateway": "2001:db8:1::1",
                "dns": [],
                "ip": "dhcp",
                "primary": False,
            },
        ],
        "nics_not_created": [{"name": "nic4", "reason": "size medium allows 4 NICs"}],
    }
    doc.update(over)
    return doc


def attr(el: ET.Element, path: str, name: str) -> str | None:
    found = el.find(path)
    assert found is not None, f"no {path} in {ET.tostring(el)!r}"
    return found.get(name)


def read_iso(path: Path) -> tuple[pycdlib.PyCdlib, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    files = {}
    for name in ("meta-data", "user-data", "network-config"):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
        files[name] = out.getvalue()
        joliet = io.BytesIO()
        iso.get_file_from_iso_fp(joliet, joliet_path=f"/{name}")
        assert joliet.getvalue() == files[name]
    return iso, files


def test_domain_xml_has_disks_nics_memory_and_seed(tmp_path: Path) -> None:
    doc = machine()
    paths = write_machine_artifacts(tmp_path, doc)
    root = ET.parse(paths["domain_xml"]).getroot()
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert root.findtext("name") == "web_01"
    assert root.findtext("uuid") == str(uuid.UUID(root.findtext("uuid") or ""))
    mem = root.find("memory")
    assert mem is not None and mem.get("unit") == "MiB" and mem.text == "2048"
    assert root.findtext("vcpu") == "2"
    os_type = root.find("os/type")
    assert os_type is not None and os_type.text == "hvm" and os_type.get("machine") == "q35"

    disks = root.findall("devices/disk[@device='disk']")
    assert [
        (attr(d, "driver", "type"), attr(d, "source", "file"), attr(d, "target", "dev")) for d in disks
    ] == [
        ("qcow2", "/srv/rec/web_01/disk0.qcow2", "vda"),
        ("raw", "/srv/rec/web_01/disk1.img", "vdb"),
    ]
    assert all(attr(d, "target", "bus") == "virtio" for d in disks)
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom is not None
    assert attr(cdrom, "source", "file") == paths["seed_iso"]
    assert cdrom.find("readonly") is not None

    nics = root.findall("devices/interface")
    got = [(attr(n, "mac", "address"), attr(n, "source", "network"), attr(n, "model", "type")) for n in nics]
    assert got == [
        ("52:54:00:aa:00:01", "recovery-net", "virtio"),
        (mac_for("web_01", "nic1"), "backup-net", "virtio"),
        ("52:54:00:aa:00:03", "dhcp-net", "virtio"),
        ("52:54:00:aa:00:04", "v6-net", "virtio"),
    ]
    assert root.find("devices/serial") is not None and root.find("devices/console") is not None


def test_uuid_is_stable_per_name_and_instance_id_unique_per_build(tmp_path: Path) -> None:
    a = write_machine_artifacts(tmp_path / "a", machine())
    b = write_machine_artifacts(tmp_path / "b", machine())
    c = write_machine_artifacts(tmp_path / "c", machine(name="db"))
    uuid_of = {
        k: ET.parse(p["domain_xml"]).getroot().findtext("uuid") for k, p in (("a", a), ("b", b), ("c", c))
    }
    assert uuid_of["a"] == uuid_of["b"] != uuid_of["c"]
    ids = {yaml.safe_load(Path(p["meta_data"]).read_text())["instance-id"] for p in (a, b)}
    assert len(ids) == 2


def test_network_config_v2(tmp_path: Path) -> None:
    paths = write_machine_artifacts(tmp_path, machine())
    net = yaml.safe_load(Path(paths["network_config"]).read_text())
    assert net["version"] == 2
    eth = net["ethernets"]
    assert eth["nic0"] == {
        "match": {"macaddress": "52:54:00:aa:00:01"},
        "set-name": "nic0",
        "addresses": ["10.20.0.15/24"],
        "routes": [{"to": "0.0.0.0/0", "via": "10.20.0.1"}],
        "nameservers": {"addresses": ["10.20.0.53", "1.1.1.1"]},
    }
    # Not primary: no default route; no DNS given: no nameservers.
    assert eth["nic1"] == {
        "match": {"macaddress": mac_for("web_01", "nic1")},
        "set-name": "nic1",
        "addresses": ["10.30.0.9/24"],
    }
    assert eth["nic2"] == {"match": {"macaddress": "52:54:00:aa:00:03"}, "set-name": "nic2", "dhcp4": True}
    assert eth["nic3"] == {"match": {"macaddress": "52:54:00:aa:00:04"}, "set-name": "nic3", "dhcp6": True}
    assert "nic4" not in eth


def test_ipv6_static_primary_route(tmp_path: Path) -> None:
    nic = {
        "name": "eth0",
        "mac": "52:54:00:00:00:10",
        "network": "n",
        "subnet": "s",
        "cidr": "2001:db8::/64",
        "prefix": 64,
        "gateway": "2001:db8::1",
        "dns": ["2001:db8::53"],
        "ip": "2001:db8::20",
        "primary": True,
    }
    paths = write_machine_artifacts(tmp_path, machine(nics=[nic]))
    eth = yaml.safe_load(Path(paths["network_config"]).read_text())["ethernets"]["eth0"]
    assert eth["addresses"] == ["2001:db8::20/64"]
    assert eth["routes"] == [{"to": "::/0", "via": "2001:db8::1"}]


def test_seed_files_and_iso(tmp_path: Path) -> None:
    paths = write_machine_artifacts(tmp_path, machine(name="Web Server #1"))
    user_text = Path(paths["user_data"]).read_text()
    assert user_text.startswith("#cloud-config\n")
    assert yaml.safe_load(user_text)["hostname"] == "web-server-1"
    meta = yaml.safe_load(Path(paths["meta_data"]).read_text())
    assert meta["local-hostname"] == "web-server-1"
    iso, files = read_iso(Path(paths["seed_iso"]))
    try:
        assert iso.pvd.volume_identifier.rstrip() == b"cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        for name in ("meta-data", "user-data", "network-config"):
            assert files[name] == (Path(paths["seed_dir"]) / name).read_bytes()
    finally:
        iso.close()
    assert json.loads(Path(paths["machine_json"]).read_text()) == machine(name="Web Server #1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["domain.xml", "machine.json", "seed", "seed.iso"]
    assert sorted(p.name for p in (tmp_path / "seed").iterdir()) == [
        "meta-data",
        "network-config",
        "user-data",
    ]


def test_rewrite_replaces_every_file(tmp_path: Path) -> None:
    write_machine_artifacts(tmp_path, machine(cpus=1))
    paths = write_machine_artifacts(tmp_path, machine(cpus=4))
    assert ET.parse(paths["domain_xml"]).getroot().findtext("vcpu") == "4"
    assert not [p for p in tmp_path.rglob("*.partial")]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"disks": []}, "no disks"),
        ({"memory_mib": 0}, "memory_mib"),
        ({"disks": [{"name": "d", "path": "/x", "format": "vmdk", "size": 1}]}, "vmdk"),
        (
            {"nics": [{"name": "n", "mac": "zz", "network": "x", "ip": "dhcp", "primary": True}]},
            "MAC",
        ),
        (
            {"nics": [{"name": "n", "mac": None, "network": "x", "ip": "10.0.0.300", "primary": True}]},
            "neither an address",
        ),
    ],
)
def test_invalid_machine_is_refused(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        write_machine_artifacts(tmp_path, machine(**over))


def test_names() -> None:
    assert [disk_target(i) for i in (0, 1, 25, 26, 27, 51, 52)] == [
        "vda",
        "vdb",
        "vdz",
        "vdaa",
        "vdab",
        "vdaz",
        "vdba",
    ]
    assert hostname_for("--Ünïcode__Box--") == "n-code-box"
    assert hostname_for("###") == "machine"
    assert len(hostname_for("a" * 100)) == 63
    assert mac_for("m", "nic0") == mac_for("m", "nic0") != mac_for("m", "nic1")
