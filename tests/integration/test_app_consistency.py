"""App-consistent points on a qemu site: a freeze hook that succeeds gives an ``app-consistent``
point; one that fails or times out gives a ``crash-consistent`` point instead (never a better
label than the truth), the item's health warns about the freeze failure, and nothing hangs."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest

from siterecovery.control.replication import take_point

MIB = 1024 * 1024

pytestmark = pytest.mark.integration


def _hooks(log: Path, freeze_tail: str = "", timeout_s: float = 10) -> dict[str, object]:
    q = shlex.quote(str(log))
    return {
        "freeze": f"echo freeze >> {q}{freeze_tail}",
        "thaw": f"echo thaw >> {q}",
        "timeout_s": timeout_s,
    }


def _lab(lab_factory, hooks: dict[str, object]):
    lab = lab_factory(size=16 * MIB, data=2 * MIB, hooks=hooks)
    job = lab.enable("vm1")
    assert job["state"] == "Succeeded", job["error"]
    return lab


def test_freeze_hook_ok_gives_app_consistent_point(lab_factory, tmp_path):
    log = tmp_path / "hooks.log"
    lab = _lab(lab_factory, _hooks(log))
    assert lab.item("vm1")["last_app_consistent_point_at"] is None

    r = take_point(lab.vault, "vm1", app=True)
    assert r.consistency == "app-consistent"
    assert r.method == "dirty-bitmap"
    assert r.warning is None
    assert log.read_text().split() == ["freeze", "thaw"]
    item = lab.item("vm1")
    assert item["last_app_consistent_point_at"] == r.created_at
    assert item["health"] == "Normal", item["health_reasons"]

    # A crash-consistent cycle runs no hooks and keeps the app-consistent time.
    r2 = take_point(lab.vault, "vm1")
    assert r2.consistency == "crash-consistent"
    assert log.read_text().split() == ["freeze", "thaw"]
    assert lab.item("vm1")["last_app_consistent_point_at"] == r.created_at
    manifest = lab.vault.datastore.read_manifest(r.point_id)
    assert manifest.consistency == "app-consistent"


def test_failing_freeze_hook_falls_back_to_crash_consistent_with_warning(lab_factory, tmp_path):
    log = tmp_path / "hooks.log"
    lab = _lab(lab_factory, _hooks(log, " && echo 'database busy' >&2 && exit 1"))

    r = take_point(lab.vault, "vm1", app=True)
    assert r.consistency == "crash-consistent"
    assert r.warning is not None
    assert "freeze hook" in r.warning and "exited with status 1: database busy" in r.warning
    # What the failed freeze may have frozen is thawed again.
    assert log.read_text().split() == ["freeze", "thaw"]

    item = lab.item("vm1")
    assert item["last_app_consistent_point_at"] is None
    assert item["last_point_at"] == r.created_at
    assert item["health"] == "Warning"
    assert any("freeze hook failed" in reason for reason in item["health_reasons"]), item["health_reasons"]
    assert [p["type"] for p in _points(lab)][:1] == ["crash-consistent"]


def test_freeze_hook_timeout_falls_back_and_nothing_hangs(lab_factory, tmp_path):
    log = tmp_path / "hooks.log"
    # The shell's child keeps running; the cycle must not wait for it.
    lab = _lab(lab_factory, _hooks(log, " && sleep 31.7", timeout_s=1))

    t0 = time.monotonic()
    r = take_point(lab.vault, "vm1", app=True)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"the cycle took {elapsed:.1f}s with a 1s freeze timeout"
    assert r.consistency == "crash-consistent"
    assert r.warning is not None and "did not finish within 1s" in r.warning
    assert log.read_text().split() == ["freeze", "thaw"]
    assert not _processes_with_args(["sleep", "31.7"]), "the timed-out hook's child still runs"

    item = lab.item("vm1")
    assert item["health"] == "Warning"
    assert any("freeze hook failed" in reason for reason in item["health_reasons"])

    # Replication is not held up: a crash-consistent cycle right after works as usual.
    r2 = take_point(lab.vault, "vm1")
    assert r2.consistency == "crash-consistent" and r2.method == "dirty-bitmap"


def _points(lab):
    from siterecovery.control.protection import list_points

    return list_points(lab.vault, "vm1")


def _processes_with_args(args: list[str]) -> list[int]:
    want = "\0".join(args).encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0")
        except OSError:
            continue
        if cmdline == want:
            found.append(int(pid))
    return found
