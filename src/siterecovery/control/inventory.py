"""Site inventory files: how machines are described to a site.

An inventory is a TOML file with one ``[[machine]]`` table per machine::

    [[machine]]
    name = "web01"
    os = "linux"
    cpus = 2
    memory_mib = 2048
    qmp = "/run/vms/web01/qmp.sock"      # qemu sites: the VM's (or storage daemon's) QMP socket
    nbd = "/run/vms/web01/nbd.sock"      # qemu sites, optional: an NBD server already running there
    [machine.hooks]                      # optional: app-consistency
    freeze = "/usr/local/bin/db-freeze"  # run by a shell; exit status 0 means frozen
    thaw = "/usr/local/bin/db-thaw"
    timeout_s = 30
    [[machine.disk]]
    name = "disk0"
    node = "disk0"                        # qemu sites: the QEMU block node name
    path = "/srv/images/web01-disk0.qcow2" # raw sites: the image file or block device
    [[machine.nic]]
    name = "nic0"
    mac = "52:54:00:12:34:56"
    ip = "10.10.0.11"
    network = "prod"

:func:`load_inventory` validates everything and names the file, machine and field at fault.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from siterecovery.errors import InvalidInput

MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _fail(path: Path, where: str, what: str) -> InvalidInput:
    return InvalidInput(f"inventory {path}: {where}: {what}")


def _name(path: Path, where: str, value: Any, field: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _fail(
            path, where, f"{field} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'."
        )
    return value


def load_inventory(path: Path, kind: str) -> dict[str, dict[str, Any]]:
    """Read and validate an inventory; return machine name -> normalised spec."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise InvalidInput(
            f"inventory {path} does not exist; give the path of a TOML inventory file."
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise InvalidInput(f"inventory {path} is not valid TOML: {err}") from err
    machines: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(raw.get("machine", [])):
        where = f"machine #{i + 1}"
        name = _name(path, where, m.get("name"), "name")
        where = f"machine {name!r}"
        if name in machines:
            raise _fail(path, where, "the name is used twice; machine names must be unique in a site.")
        disks: list[dict[str, Any]] = []
        for d in m.get("disk", []):
            dname = _name(path, where, d.get("name"), "disk name")
            if any(x["name"] == dname for x in disks):
                raise _fail(path, where, f"disk {dname!r} is listed twice.")
            disk = {"name": dname, "node": d.get("node", dname), "path": d.get("path")}
            if kind == "raw" and not disk["path"]:
                raise _fail(
                    path, f"{where} disk {dname!r}", "raw sites need 'path' (image file or block device)."
                )
            if disk["path"]:
                disk["path"] = str(Path(disk["path"]).expanduser())
            disks.append(disk)
        if not disks:
            raise _fail(path, where, "a machine needs at least one [[machine.disk]].")
        nics: list[dict[str, Any]] = []
        for n in m.get("nic", []):
            nname = _name(path, where, n.get("name", f"nic{len(nics)}"), "nic name")
            mac = n.get("mac")
            if mac is not None and not MAC_RE.match(str(mac)):
                raise _fail(
                    path,
                    f"{where} nic {nname!r}",
                    f"mac {mac!r} is not a MAC address like 52:54:00:12:34:56.",
                )
            ip = n.get("ip")
            if ip not in (None, "", "dhcp"):
                try:
                    ipaddress.ip_address(ip)
                except ValueError as err:
                    raise _fail(
                        path, f"{where} nic {nname!r}", f"ip {ip!r} is not an IP address (or 'dhcp')."
                    ) from err
            nics.append({"name": nname, "mac": mac, "ip": ip or "dhcp", "network": n.get("network")})
        hooks = m.get("hooks") or {}
        if kind == "qemu" and not m.get("qmp"):
            raise _fail(path, where, "qemu sites need 'qmp' (the path of the machine's QMP socket).")
        for field in ("cpus", "memory_mib"):
            if field in m and (not isinstance(m[field], int) or m[field] < 1):
                raise _fail(path, where, f"{field} must be a positive whole number, not {m[field]!r}.")
        machines[name] = {
            "name": name,
            "os": m.get("os", "linux"),
            "cpus": m.get("cpus", 1),
            "memory_mib": m.get("memory_mib", 1024),
            "qmp": m.get("qmp"),
            "nbd": m.get("nbd"),
            "hooks": {
                "freeze": hooks.get("freeze"),
                "thaw": hooks.get("thaw"),
                "timeout_s": float(hooks.get("timeout_s", 60)),
            },
            "disks": disks,
            "nics": nics,
        }
    return machines
