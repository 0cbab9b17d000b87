"""Inventory parsing: every mistake is named with the file, the machine and the field."""

from __future__ import annotations

import pytest

from siterecovery.control.inventory import load_inventory
from siterecovery.errors import InvalidInput

GOOD = """
[[machine]]
name = "web01"
cpus = 2
memory_mib = 2048
qmp = "/run/web01/qmp.sock"
[machine.hooks]
freeze = "/bin/true"
[[machine.disk]]
name = "disk0"
[[machine.disk]]
name = "disk1"
node = "drive1"
[[machine.nic]]
name = "nic0"
mac = "52:54:00:12:34:56"
ip = "10.0.0.5"
network = "prod"
"""


def load(tmp_path, text, kind="qemu"):
    p = tmp_path / "inv.toml"
    p.write_text(text)
    return load_inventory(p, kind)


def test_a_valid_inventory_is_normalised(tmp_path):
    m = load(tmp_path, GOOD)["web01"]
    assert [d["node"] for d in m["disks"]] == ["disk0", "drive1"]
    assert m["nics"][0]["ip"] == "10.0.0.5" and m["hooks"]["timeout_s"] == 60


@pytest.mark.parametrize(
    ("text", "kind", "expect"),
    [
        ("[[machine]]\nname = 'a'\nqmp='/q'\n", "qemu", "at least one [[machine.disk]]"),
        ("[[machine]]\nname = 'a'\n[[machine.disk]]\nname='d'\n", "qemu", "need 'qmp'"),
        ("[[machine]]\nname = 'a'\n[[machine.disk]]\nname='d'\n", "raw", "need 'path'"),
        ("[[machine]]\nname = 'bad name'\n", "raw", "name 'bad name' is not valid"),
        (
            "[[machine]]\nname='a'\nqmp='/q'\n[[machine.disk]]\nname='d'\n[[machine.disk]]\nname='d'\n",
            "qemu",
            "listed twice",
        ),
        (
            "[[machine]]\nname='a'\nqmp='/q'\n[[machine.disk]]\nname='d'\n[[machine]]\nname='a'\nqmp='/q'\n"
            "[[machine.disk]]\nname='d'\n",
            "qemu",
            "used twice",
        ),
        (
            "[[machine]]\nname='a'\nqmp='/q'\n[[machine.disk]]\nname='d'\n[[machine.nic]]\nmac='zz'\n",
            "qemu",
            "not a MAC address",
        ),
        (
            "[[machine]]\nname='a'\nqmp='/q'\n[[machine.disk]]\nname='d'\n[[machine.nic]]\nip='10.0.0.300'\n",
            "qemu",
            "not an IP address",
        ),
        ("[[machine]]\nname='a'\nqmp='/q'\ncpus=0\n[[machine.disk]]\nname='d'\n", "qemu", "cpus must be"),
        ("[[machine\n", "qemu", "not valid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path, text, kind, expect):
    with pytest.raises(InvalidInput) as err:
        load(tmp_path, text, kind)
    assert expect in str(err.value)
    assert "inv.toml" in str(err.value)


def test_missing_file_says_what_to_give(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        load_inventory(tmp_path / "nope.toml", "qemu")
