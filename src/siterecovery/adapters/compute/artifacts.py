"""What a recovered machine is made of besides its disks: its definition and first-boot settings.

:func:`write_machine_artifacts` writes into the machine's directory, each file atomically
(temporary name, fsync, rename)::

    machine.json          the machine document as given (name, size, disks, NICs, point ...)
    domain.xml            a libvirt domain: KVM, q35, one virtio disk per machine disk, the
                          seed ISO as a SATA cdrom, one virtio NIC per created NIC, serial console
    seed/meta-data        cloud-init NoCloud: instance-id (new per build), local-hostname
    seed/user-data        "#cloud-config" + hostname
    seed/network-config   network config version 2 (below)
    seed.iso              the three seed files on an ISO 9660 + Joliet + Rock Ridge image with
                          volume id "cidata", which is how NoCloud finds its seed on a cdrom

The seed files are YAML documents written as JSON, which is valid YAML (cloud-init reads them
with a YAML loader), so no YAML writer is needed and every string is quoted.

network-config (version 2): one ``ethernets`` entry per NIC, keyed by the NIC name, matched by
MAC address and renamed to the NIC name (``set-name``). A static NIC has ``addresses:
[ip/prefix]``, its DNS servers and, on the primary NIC only, a default route via the subnet's
gateway (a default route per NIC would make the machine's routing depend on interface order).
A DHCP NIC has ``dhcp4: true``, or ``dhcp6: true`` on an IPv6 subnet.

A NIC without a MAC address gets a stable one derived from the machine and NIC names (QEMU's
52:54:00 prefix), used in both domain.xml and network-config so that the match holds; the
written machine.json keeps the document as given. The instance-id changes with every build, so
cloud-init applies the network settings again on a machine built from a new point. The domain's
UUID is derived from its name (UUID 5), so rebuilding a machine keeps its libvirt identity.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import re
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pycdlib

from siterecovery.durable import write_atomic
from siterecovery.errors import InvalidInput

# Fixed namespace for the UUID 5 of domain names: the same name always gives the same UUID.
_DOMAIN_NAMESPACE = uuid.UUID("6f1c1c5e-9f55-4c1e-9b0e-2d5a4f3e8b17")
_DISK_FORMATS = ("qcow2", "raw")
_HOSTNAME_BAD = re.compile(r"[^a-z0-9-]+")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# ISO 9660 level-1 names (8.3, upper case) for readers without Joliet or Rock Ridge.
_SEED_FILES = (("meta-data", "META_DAT.;1"), ("user-data", "USER_DAT.;1"), ("network-config", "NETWORK_.;1"))


def hostname_for(name: str) -> str:
    """An RFC 1123 host name label for a machine name: lower case, letters, digits and '-'."""
    label = _HOSTNAME_BAD.sub("-", name.lower()).strip("-")[:63].strip("-")
    return label or "machine"


def mac_for(machine: str, nic: str) -> str:
    """A stable, locally administered MAC (QEMU's 52:54:00 prefix) for a NIC without one."""
    digest = hashlib.sha256(f"{machine}\0{nic}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def disk_target(i: int) -> str:
    """The guest device name of the i-th virtio disk: vda .. vdz, vdaa, vdab ..."""
    letters = ""
    n = i
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def _require(machine: dict[str, Any], key: str) -> Any:
    if key not in machine or machine[key] is None:
        raise InvalidInput(f"the machine document has no {key!r}; it is needed to build the machine.")
    return machine[key]


def _check(machine: dict[str, Any]) -> None:
    name = _require(machine, "name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("the machine's name must be a non-empty string.")
    for key in ("cpus", "memory_mib"):
        value = _require(machine, key)
        if not isinstance(value, int) or value <= 0:
            raise InvalidInput(f"machine {name!r}: {key} is {value!r}; allowed is a positive integer.")
    disks = _require(machine, "disks")
    if not disks:
        raise InvalidInput(f"machine {name!r} has no disks; a machine needs at least one.")
    for disk in disks:
        if disk.get("format") not in _DISK_FORMATS:
            raise InvalidInput(
                f"disk {disk.get('name')!r} of machine {name!r} has format {disk.get('format')!r}; "
                f"allowed are {', '.join(_DISK_FORMATS)}."
            )
        if not disk.get("path"):
            raise InvalidInput(f"disk {disk.get('name')!r} of machine {name!r} has no path.")
    for nic in machine.get("nics") or []:
        if not nic.get("name") or not nic.get("network"):
            raise InvalidInput(f"a NIC of machine {name!r} lacks its name or network: {nic!r}.")
        mac = nic.get("mac")
        if mac is not None and not _MAC.match(str(mac).lower()):
            raise InvalidInput(
                f"NIC {nic['name']!r} of machine {name!r} has MAC {mac!r}; expected 6 hex pairs."
            )


def _macs(machine: dict[str, Any]) -> dict[str, str]:
    return {
        nic["name"]: str(nic["mac"]).lower() if nic.get("mac") else mac_for(machine["name"], nic["name"])
        for nic in machine.get("nics") or []
    }


def _static_address(nic: dict[str, Any]) -> tuple[str, int]:
    """``(address/prefix, ip version)`` of a static NIC."""
    try:
        ip = ipaddress.ip_address(nic["ip"])
    except ValueError as err:
        raise InvalidInput(
            f"NIC {nic['name']!r} has IP {nic['ip']!r}, which is neither an address nor 'dhcp'."
        ) from err
    prefix = nic.get("prefix")
    if prefix is None and nic.get("cidr"):
        prefix = ipaddress.ip_network(nic["cidr"], strict=False).prefixlen
    if prefix is None:
        raise InvalidInput(f"NIC {nic['name']!r} has a static IP but neither a prefix nor a subnet cidr.")
    return f"{ip}/{int(prefix)}", ip.version


def network_config(machine: dict[str, Any], macs: dict[str, str] | None = None) -> dict[str, Any]:
    """The cloud-init network config (version 2) of the machine (see the module docstring)."""
    macs = macs or _macs(machine)
    ethernets: dict[str, Any] = {}
    for nic in machine.get("nics") or []:
        name = nic["name"]
        entry: dict[str, Any] = {"match": {"macaddress": macs[name]}, "set-name": name}
        ip = nic.get("ip") or "dhcp"
        if ip == "dhcp":
            version = ipaddress.ip_network(nic["cidr"], strict=False).version if nic.get("cidr") else 4
            entry["dhcp6" if version == 6 else "dhcp4"] = True
        else:
            address, version = _static_address(nic)
            entry["addresses"] = [address]
            if nic.get("primary") and nic.get("gateway"):
                entry["routes"] = [
                    {"to": "::/0" if version == 6 else "0.0.0.0/0", "via": str(nic["gateway"])}
                ]
            if nic.get("dns"):
                entry["nameservers"] = {"addresses": [str(d) for d in nic["dns"]]}
        ethernets[name] = entry
    return {"version": 2, "ethernets": ethernets}


def domain_xml(machine: dict[str, Any], seed_iso: Path, macs: dict[str, str] | None = None) -> str:
    """The libvirt domain XML of the machine (see the module docstring)."""
    macs = macs or _macs(machine)
    name = machine["name"]
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = str(uuid.uuid5(_DOMAIN_NAMESPACE, name))
    point = machine.get("recovery_point") or {}
    ET.SubElement(dom, "description").text = (
        f"siterecovery {machine.get('role', 'failover')} machine of {machine.get('source_machine', name)}"
        f" from recovery point {point.get('id', '?')} ({point.get('type', '?')})"
    )
    ET.SubElement(dom, "memory", unit="MiB").text = str(machine["memory_mib"])
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(machine["memory_mib"])
    ET.SubElement(dom, "vcpu", placement="static").text = str(machine["cpus"])
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    for i, disk in enumerate(machine["disks"]):
        el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(el, "driver", name="qemu", type=disk["format"], discard="unmap")
        ET.SubElement(el, "source", file=str(disk["path"]))
        ET.SubElement(el, "target", dev=disk_target(i), bus="virtio")
        if disk.get("name"):
            ET.SubElement(el, "serial").text = str(disk["name"])[:20]
    cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cdrom, "driver", name="qemu", type="raw")
    ET.SubElement(cdrom, "source", file=str(seed_iso))
    ET.SubElement(cdrom, "target", dev="sda", bus="sata")
    ET.SubElement(cdrom, "readonly")
    for nic in machine.get("nics") or []:
        el = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(el, "mac", address=macs[nic["name"]])
        ET.SubElement(el, "source", network=str(nic["network"]))
        ET.SubElement(el, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def seed_files(machine: dict[str, Any], macs: dict[str, str] | None = None) -> dict[str, bytes]:
    """The NoCloud seed: ``{"meta-data", "user-data", "network-config": bytes}``."""
    host = hostname_for(machine["name"])
    meta = {"instance-id": f"iid-{host}-{uuid.uuid4().hex}", "local-hostname": host}
    user = {"hostname": host, "preserve_hostname": False}
    return {
        "meta-data": (json.dumps(meta, indent=2) + "\n").encode(),
        "user-data": ("#cloud-config\n" + json.dumps(user, indent=2) + "\n").encode(),
        "network-config": (json.dumps(network_config(machine, macs), indent=2) + "\n").encode(),
    }


def seed_iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 + Joliet + Rock Ridge image, volume id "cidata", holding the seed files."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident="cidata", joliet=3, rock_ridge="1.09")
    try:
        for name, iso_name in _SEED_FILES:
            data = files[name]
            iso.add_fp(io.BytesIO(data), len(data), f"/{iso_name}", rr_name=name, joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_machine_artifacts(directory: Path, machine: dict[str, Any]) -> dict[str, str]:
    """Write the machine's artifacts into ``directory`` (module docstring); return their paths
    by kind: ``machine_json``, ``domain_xml``, ``seed_dir``, ``meta_data``, ``user_data``,
    ``network_config``, ``seed_iso``."""
    _check(machine)
    directory = Path(directory).absolute()
    seed_dir = directory / "seed"
    seed_dir.mkdir(parents=True, exist_ok=True)
    macs = _macs(machine)
    files = seed_files(machine, macs)
    paths = {
        "machine_json": directory / "machine.json",
        "domain_xml": directory / "domain.xml",
        "seed_dir": seed_dir,
        "meta_data": seed_dir / "meta-data",
        "user_data": seed_dir / "user-data",
        "network_config": seed_dir / "network-config",
        "seed_iso": directory / "seed.iso",
    }
    for name, data in files.items():
        write_atomic(seed_dir / name, data)
    write_atomic(paths["seed_iso"], seed_iso(files))
    write_atomic(paths["domain_xml"], domain_xml(machine, paths["seed_iso"], macs).encode())
    write_atomic(paths["machine_json"], (json.dumps(machine, indent=2) + "\n").encode())
    return {kind: str(p) for kind, p in paths.items()}
