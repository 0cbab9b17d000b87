"""End-to-end tests of the ``siterecovery`` CLI: the whole flow on a small qemu site, bad input
with its message and exit code, a damaged datastore, and ``--json`` on every list command.

All tests share one module-scoped lab: one qemu machine ``vm1`` (two 64 MiB qcow2 disks with
8 MiB of real data each, owned by a ``qemu-storage-daemon``) plus ``vm2``, an inventory entry
with no process behind it that the second discovery removes. Once the images exist, everything
is done by running the CLI as a user would, in a subprocess; the fixture keeps its set-up runs in
:attr:`Lab.runs` so that tests assert on those steps too.

Tests that only read, or that are refused before they change anything, can run in any order;
the ones that change the item (test failover, damaging a chunk) put everything back before they
end; disabling replication and stopping the worker come last in this file because they end the
item's life.

Exit codes (``siterecovery.errors``): InvalidInput 2, NotFound 3, AlreadyExists 4,
OperationNotAllowed 5, VaultError 6, DatastoreError 7.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from siterecovery.adapters.sources.qemu_daemon import MachineDaemon
from siterecovery.control.vault import open_vault
from siterecovery.demo.fabric import fill_image, write_inventory

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
DISK_SIZE = 64 * MIB
DATA_BYTES = 8 * MIB
DISKS = ("disk0", "disk1")
CLI_TIMEOUT_S = 120


def cli_command() -> list[str]:
    """The installed console script next to this interpreter, else the same entry point."""
    script = Path(sys.executable).with_name("siterecovery")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from siterecovery.entrypoints.cli.main import main; main()"]


@dataclass
class Run:
    """One finished CLI run."""

    args: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as err:
            raise AssertionError(f"{self} did not print valid JSON: {err}") from err

    @property
    def error(self) -> str:
        """stderr with whitespace collapsed, so assertions do not depend on line breaks."""
        return " ".join(self.stderr.split())

    def __str__(self) -> str:
        return (
            f"siterecovery {' '.join(self.args)} -> exit {self.rc}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def run_cli(vault: Path, *args: str, expect: int | None = 0) -> Run:
    """Run ``siterecovery --vault VAULT ARGS``; check its exit status unless ``expect`` is None."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITERECOVERY_")}
    env["COLUMNS"] = "200"  # human output in one line per row; errors are never wrapped anyway
    proc = subprocess.run(
        [*cli_command(), "--vault", str(vault), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    result = Run(tuple(args), proc.returncode, proc.stdout, proc.stderr)
    if expect is not None:
        assert result.rc == expect, f"expected exit {expect}\n{result}"
    return result


@dataclass
class Lab:
    root: Path
    daemon: MachineDaemon
    images: dict[str, Path]
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def vault(self) -> Path:
        return self.root / "vault"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.toml"

    @property
    def recovery(self) -> Path:
        return self.root / "recovery"

    def cli(self, *args: str, expect: int | None = 0) -> Run:
        return run_cli(self.vault, *args, expect=expect)

    def run(self, line: str, *extra: str, expect: int | None = 0) -> Run:
        """``run("site add dc2 --inventory", str(path))``: words split as a shell would, then
        ``extra`` as they are (paths)."""
        return run_cli(self.vault, *shlex.split(line), *extra, expect=expect)

    def inventory_entries(self, *, vm1_memory_mib: int = 512, with_vm2: bool = True) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = [
            {
                "name": "vm1",
                "cpus": 1,
                "memory_mib": vm1_memory_mib,
                "qmp": self.daemon.qmp_socket,
                "nbd": self.daemon.nbd_socket,
                "disk": [{"name": d, "node": d, "path": str(p)} for d, p in self.images.items()],
                "nic": [{"name": "nic0", "mac": "52:54:00:00:01:01", "ip": "10.0.0.10", "network": "prod"}],
            }
        ]
        # Listed but never started: enough for discovery and for refusals that come before
        # the machine is reached (unknown policy or site), which vm1 meets as "already protected".
        entries.append(
            {
                "name": "spare",
                "qmp": str(self.root / "run" / "spare" / "qmp.sock"),
                "disk": [{"name": "disk0", "path": str(self.root / "disks" / "spare-disk0.qcow2")}],
            }
        )
        if with_vm2:
            # Never started either; the second discovery reports it removed.
            entries.append(
                {
                    "name": "vm2",
                    "qmp": str(self.root / "run" / "vm2" / "qmp.sock"),
                    "disk": [{"name": "disk0", "path": str(self.root / "disks" / "vm2-disk0.qcow2")}],
                }
            )
        return entries


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Vault, both sites, two discoveries (the second after an inventory edit) and a policy."""
    # Short path: unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="sr-e2e-"))
    daemon: MachineDaemon | None = None
    made: Lab | None = None
    try:
        images: dict[str, Path] = {}
        for seed, disk in enumerate(DISKS):
            images[disk] = root / "disks" / f"vm1-{disk}.qcow2"
            fill_image(images[disk], DISK_SIZE, DATA_BYTES, seed=seed, fmt="qcow2")
        daemon = MachineDaemon.start(root / "run" / "vm1", images)
        made = Lab(root, daemon, images)
        write_inventory(made.inventory, made.inventory_entries())
        made.runs["vault create"] = made.run("vault create lab --json")
        made.runs["site add primary"] = made.run(
            "site add primary --kind qemu --role primary --json --inventory", str(made.inventory)
        )
        made.runs["site add recovery"] = made.run(
            "site add recovery --kind qemu --role recovery --json --path", str(made.recovery)
        )
        # The network vm1's NIC is on; enabling replication maps it to a "prod-asr" mirror.
        made.runs["network add"] = made.run(
            "network add prod --site primary --subnet default=10.0.0.0/24 --json"
        )
        made.runs["discover 1"] = made.run("site discover primary --json")
        write_inventory(made.inventory, made.inventory_entries(vm1_memory_mib=1024, with_vm2=False))
        made.runs["discover 2"] = made.run("site discover primary --json")
        made.runs["policy create"] = made.run(
            "policy create fast --json --crash-frequency 5s --rpo-threshold 30s --retention 2h "
            "--app-frequency 0"
        )
        yield made
    finally:
        if made is not None and (made.vault / "vault.key").exists():
            run_cli(made.vault, "worker", "stop", expect=None)
        for run_dir in (root / "recovery" / "machines").glob("*/run"):
            with contextlib.suppress(Exception):
                MachineDaemon.attach(run_dir).stop()
        if daemon is not None:
            with contextlib.suppress(Exception):
                daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def protected(lab: Lab) -> Lab:
    """The lab with vm1 protected: ``replication enable`` waited for the initial replication."""
    if "enable" not in lab.runs:
        lab.runs["enable"] = lab.run("replication enable vm1 --policy fast --recovery-site recovery")
    return lab


INVALID_INPUT, NOT_FOUND, ALREADY_EXISTS, NOT_ALLOWED, VAULT_ERROR, DATASTORE_ERROR = 2, 3, 4, 5, 6, 7


# ---------------------------------------------------------------------------------------------
# The flow: vault, sites, discovery, machines, policy


def test_vault_create_makes_vault_with_private_key(lab: Lab) -> None:
    info = lab.runs["vault create"].json()
    assert info["name"] == "lab"
    assert Path(info["path"]) == lab.vault.resolve()
    assert Path(info["datastore"]).is_dir()
    key = lab.vault / "vault.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert lab.cli("vault", "show", "--json").json()["key_fingerprint"] == info["key_fingerprint"]


def test_site_add_primary_with_inventory_and_recovery_with_path(lab: Lab) -> None:
    assert lab.runs["site add primary"].json()["role"] == "primary"
    assert lab.runs["site add recovery"].json()["role"] == "recovery"
    sites = {s["name"]: s for s in lab.cli("site", "list", "--json").json()}
    assert sites["primary"]["kind"] == "qemu"
    assert sites["primary"]["inventory"] == str(lab.inventory.resolve())
    assert sites["recovery"]["path"] == str(lab.recovery.resolve())
    assert lab.recovery.is_dir()


def test_site_discover_reports_added_machines(lab: Lab) -> None:
    report = lab.runs["discover 1"].json()
    assert report["site"] == "primary"
    assert sorted(report["added"]) == ["spare", "vm1", "vm2"]
    assert report["changed"] == report["removed"] == []


def test_site_discover_after_inventory_edit_reports_changed_and_removed(lab: Lab) -> None:
    report = lab.runs["discover 2"].json()
    assert report["added"] == []
    assert report["changed"] == ["vm1 (memory_mib)"]
    assert report["removed"] == ["vm2"]


def test_site_discover_unchanged_inventory_reports_nothing_new(lab: Lab) -> None:
    report = lab.cli("site", "discover", "primary", "--json").json()
    assert report["added"] == report["changed"] == report["removed"] == []
    assert sorted(report["unchanged"]) == ["spare", "vm1"]


def test_machine_list_json_shows_discovered_machines(lab: Lab) -> None:
    machines = {m["name"]: m for m in lab.cli("machine", "list", "--json").json()}
    assert machines["vm1"]["present"] is True
    assert machines["vm1"]["site"] == "primary"
    assert machines["vm1"]["memory_mib"] == 1024
    assert machines["vm1"]["disks"] == list(DISKS)
    assert machines["vm1"]["nics"] == ["nic0 10.0.0.10 (prod)"]
    assert machines["vm2"]["present"] is False


def test_policy_create_makes_failback_twin(lab: Lab) -> None:
    created = lab.runs["policy create"].json()
    assert [p["name"] for p in created] == ["fast", "fast-failback"]
    policies = {p["name"]: p for p in lab.cli("policy", "list", "--json").json()}
    fast, twin = policies["fast"], policies["fast-failback"]
    assert (fast["crash_interval_s"], fast["rpo_threshold_s"], fast["retention_s"]) == (5, 30, 7200)
    assert fast["app_consistent_frequency"] == "off"
    assert twin["failback_twin_of"] == "fast"
    assert fast["failback_twin_of"] is None


# ---------------------------------------------------------------------------------------------
# The flow: replication, status, points, test failover, jobs, datastore


def test_replication_enable_waits_and_starts_worker(protected: Lab) -> None:
    enable = protected.runs["enable"]
    assert "vm1 is protected" in " ".join(enable.stdout.split())
    worker = protected.cli("worker", "status", "--json").json()
    assert worker["running"] is True
    assert isinstance(worker["pid"], int)


def test_status_json_reports_health_rpo_and_allowed_operations(protected: Lab) -> None:
    (item,) = protected.cli("status", "--json").json()
    assert item["name"] == "vm1"
    assert item["state"] == "Protected"
    assert item["health"] == "Normal", item["health_reasons"]
    assert 0 <= item["rpo_seconds"] < item["rpo_threshold_seconds"] == 30
    assert item["disks"] == list(DISKS)
    assert {"test-failover", "disable"} <= set(item["allowed_operations"])
    assert "test-failover-cleanup" not in item["allowed_operations"]


def test_point_list_json_has_type_time_and_size(protected: Lab) -> None:
    points = protected.cli("point", "list", "vm1", "--json").json()
    assert points, "the initial replication makes a point"
    initial = points[-1]  # newest first
    assert initial["method"] == "initial"
    assert initial["type"] == "crash-consistent"
    assert time.time() - 600 < initial["time"] <= time.time()
    assert initial["logical_bytes"] == len(DISKS) * DISK_SIZE
    # All data was new, zero chunks are not stored, and zstd shrinks real files.
    assert 0 < initial["stored_bytes"] <= len(DISKS) * DATA_BYTES
    times = [p["time"] for p in points]
    assert times == sorted(times, reverse=True)


def test_test_failover_start_and_cleanup_with_notes(protected: Lab) -> None:
    test_dir = protected.recovery / "machines" / "vm1-test"
    start = protected.cli("test-failover", "start", "vm1", "--json").json()
    try:
        assert start["state"] == "Succeeded"
        assert (test_dir / "machine.json").is_file()
        for disk in DISKS:
            assert (test_dir / f"{disk}.qcow2").is_file()
        (item,) = protected.cli("status", "vm1", "--json").json()
        assert item["state"] == "TestFailover"
        assert item["allowed_operations"][0] == "test-failover-cleanup"
    finally:
        cleanup = protected.cli("test-failover", "cleanup", "vm1", "--notes", "drill ok", "--json").json()
    assert not test_dir.exists()
    assert cleanup["result"]["notes"] == "drill ok"
    assert protected.cli("status", "vm1", "--json").json()[0]["state"] == "Protected"


def test_job_list_and_show_json_have_steps_with_states(protected: Lab) -> None:
    listed = protected.cli("job", "list", "--json").json()
    enable = next(j for j in listed if j["kind"] == "enable-replication")
    assert enable["target"] == "vm1"
    assert enable["state"] == "Succeeded"
    shown = protected.cli("job", "show", enable["id"], "--json").json()
    assert [s["name"] for s in shown["steps"]] == [
        "Enable protection",
        "Initial replication",
        "Finalize protection",
    ]
    assert {s["state"] for s in shown["steps"]} == {"Succeeded"}
    assert shown["progress"] == 1.0


def test_datastore_verify_json_ok(protected: Lab) -> None:
    report = protected.cli("datastore", "verify", "--json").json()
    assert report["ok"] is True, report["problems"]
    assert report["problems"] == []
    assert report["points_checked"] >= 1
    assert report["chunks_checked"] > 0


# ---------------------------------------------------------------------------------------------
# Bad input: a message that says what is wrong and what is allowed, and the documented exit code


def test_no_vault_at_path_says_how_to_create_one(tmp_path: Path) -> None:
    run = run_cli(tmp_path / "nothing-here", "status", expect=VAULT_ERROR)
    assert "no vault at" in run.error
    assert "siterecovery vault create" in run.error


def test_vault_create_twice_is_refused(lab: Lab) -> None:
    run = lab.cli("vault", "create", "again", expect=ALREADY_EXISTS)
    assert "already exists" in run.error
    assert "choose another --vault path" in run.error


def test_enable_unknown_machine_names_known_machines(lab: Lab) -> None:
    run = lab.run("replication enable nosuch --policy fast --recovery-site recovery", expect=NOT_FOUND)
    assert "machine 'nosuch' not found" in run.error
    assert "Known machines: spare, vm1." in run.error


def test_enable_unknown_policy_names_known_policies(lab: Lab) -> None:
    run = lab.run("replication enable spare --policy gold --recovery-site recovery", expect=NOT_FOUND)
    assert "policy 'gold' not found" in run.error
    assert "Known policies: fast, fast-failback." in run.error


def test_enable_unknown_recovery_site_names_known_sites(lab: Lab) -> None:
    run = lab.run("replication enable spare --policy fast --recovery-site dr", expect=NOT_FOUND)
    assert "site 'dr' not found" in run.error
    assert "Known sites: primary, recovery." in run.error


def test_enable_to_primary_site_is_refused(lab: Lab) -> None:
    run = lab.run("replication enable spare --policy fast --recovery-site primary", expect=INVALID_INPUT)
    assert "is a primary site; replicate to a recovery site" in run.error


def test_enable_machine_removed_from_inventory_is_refused(lab: Lab) -> None:
    run = lab.run("replication enable vm2 --policy fast --recovery-site recovery", expect=INVALID_INPUT)
    assert "no longer in the inventory of site 'primary'" in run.error


def test_enable_already_protected_machine_is_refused(protected: Lab) -> None:
    run = protected.run(
        "replication enable vm1 --policy fast --recovery-site recovery", expect=ALREADY_EXISTS
    )
    assert "'vm1' already exists" in run.error
    assert "already protected" in run.error


def test_site_discover_unknown_site_names_known_sites(lab: Lab) -> None:
    run = lab.cli("site", "discover", "dc9", expect=NOT_FOUND)
    assert "site 'dc9' not found. Known sites: primary, recovery." in run.error


@pytest.mark.parametrize("command", [["status"], ["test-failover", "start"]], ids=" ".join)
def test_unknown_item_names_protected_items(protected: Lab, command: list[str]) -> None:
    run = protected.cli(*command, "web01", expect=NOT_FOUND)
    assert "protected item 'web01' not found. Protected items: vm1." in run.error


def test_job_show_unknown_job_is_not_found(lab: Lab) -> None:
    run = lab.cli("job", "show", "20000101-000000-000000", expect=NOT_FOUND)
    assert "job '20000101-000000-000000' not found" in run.error


def test_test_failover_unknown_point_changes_nothing(protected: Lab) -> None:
    run = protected.cli("test-failover", "start", "vm1", "--point", "rp-nope", expect=NOT_FOUND)
    assert "recovery point 'rp-nope' does not exist" in run.error
    assert "siterecovery point list vm1" in run.error
    assert protected.cli("status", "vm1", "--json").json()[0]["state"] == "Protected"


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("--retention", "20d", "allowed is 1h to 15d"),
        ("--crash-frequency", "2s", "allowed is 5s to 1h"),
        ("--rpo-threshold", "2d", "allowed is 5s to 1d"),
        ("--app-frequency", "30m", "allowed is 1h to 12h, or 0 (off)"),
    ],
)
def test_policy_create_out_of_range_says_allowed_range(
    lab: Lab, option: str, value: str, allowed: str
) -> None:
    run = lab.cli("policy", "create", "bad", option, value, expect=INVALID_INPUT)
    assert f"{value} is out of range" in run.error
    assert allowed in run.error


def test_policy_create_unparsable_duration_shows_the_forms(lab: Lab) -> None:
    run = lab.cli("policy", "create", "bad", "--retention", "banana", expect=INVALID_INPUT)
    assert "'banana' is not valid" in run.error
    assert '"15m"' in run.error


def test_policy_create_twice_is_refused(lab: Lab) -> None:
    run = lab.cli("policy", "create", "fast", expect=ALREADY_EXISTS)
    assert "policy 'fast' already exists" in run.error


def test_test_failover_cleanup_on_protected_item_names_state_and_allowed(protected: Lab) -> None:
    run = protected.cli("test-failover", "cleanup", "vm1", expect=NOT_ALLOWED)
    assert "test-failover-cleanup is not allowed for 'vm1' in state Protected" in run.error
    assert "allowed operations: test-failover," in run.error
    assert "disable" in run.error


def test_site_add_inventory_with_bad_toml_is_refused(lab: Lab) -> None:
    bad = lab.root / "bad.toml"
    bad.write_text('[[machine]]\nname = "web01\n')
    run = lab.run("site add dc2 --kind qemu --role primary --inventory", str(bad), expect=INVALID_INPUT)
    assert f"inventory {bad} is not valid TOML" in run.error
    assert "line 2" in run.error


def test_site_add_qemu_inventory_without_qmp_is_refused(lab: Lab) -> None:
    inv = lab.root / "noqmp.toml"
    write_inventory(inv, [{"name": "web01", "disk": [{"name": "disk0", "path": "/dev/null"}]}])
    run = lab.run("site add dc2 --kind qemu --role primary --inventory", str(inv), expect=INVALID_INPUT)
    assert "machine 'web01'" in run.error
    assert "qemu sites need 'qmp'" in run.error


def test_site_add_inventory_with_duplicate_machine_names_is_refused(lab: Lab) -> None:
    inv = lab.root / "dup.toml"
    # write_inventory refuses duplicates itself, so this file is written by hand.
    machine = '[[machine]]\nname = "web01"\nqmp = "/run/web01.sock"\n[[machine.disk]]\nname = "disk0"\n'
    inv.write_text(machine + machine)
    run = lab.run("site add dc2 --kind qemu --role primary --inventory", str(inv), expect=INVALID_INPUT)
    assert "machine 'web01': the name is used twice" in run.error


def test_site_add_inventory_without_disks_quotes_the_toml_table(lab: Lab) -> None:
    inv = lab.root / "nodisk.toml"
    inv.write_text('[[machine]]\nname = "web01"\nqmp = "/run/web01.sock"\n')
    run = lab.run("site add dc2 --kind qemu --role primary --inventory", str(inv), expect=INVALID_INPUT)
    # The message holds "[[machine.disk]]", which the terminal renderer must not eat as markup.
    assert "a machine needs at least one [[machine.disk]]." in run.error


def test_site_add_missing_inventory_file_is_refused(lab: Lab) -> None:
    missing = lab.root / "absent.toml"
    run = lab.run("site add dc2 --kind qemu --role primary --inventory", str(missing), expect=INVALID_INPUT)
    assert f"inventory {missing} does not exist" in run.error


def test_site_add_unknown_kind_says_allowed_kinds(lab: Lab) -> None:
    run = lab.run(
        "site add dc2 --kind vmware --role recovery --path", str(lab.root / "x"), expect=INVALID_INPUT
    )
    assert "site kind 'vmware' is not supported: allowed are qemu, raw." in run.error


def test_site_add_twice_is_refused(lab: Lab) -> None:
    run = lab.run(
        "site add recovery --kind qemu --role recovery --path", str(lab.recovery), expect=ALREADY_EXISTS
    )
    assert "site 'recovery' already exists" in run.error


def test_usage_error_exits_2(lab: Lab) -> None:
    run = lab.cli("policy", "create", "x", "--retention", expect=INVALID_INPUT)
    assert "--retention" in run.error


# ---------------------------------------------------------------------------------------------
# A damaged datastore: verify names the point, the disk and the byte offset


@contextlib.contextmanager
def damaged_chunk(lab: Lab, how: str) -> Iterator[tuple[str, str, int]]:
    """Delete one data chunk of the newest point, or flip a bit of it inside its pack; put it
    back after.

    Yields ``(point_id, disk, offset)`` of a place that uses the chunk. The chunk is found by
    reading the point's index (the CLI has no command that maps offsets to chunk ids). "Missing"
    is what a faulty sweep would leave: the chunk store's own delete (a tombstone)."""
    vault = open_vault(lab.vault)
    ds = vault.datastore
    point_id = ds.list_manifests()[-1]
    disk, ref = sorted(ds.read_manifest(point_id).disks.items())[-1]
    chunk_no, chunk_id = list(ds.index_reader(ref).nonzero_entries())[3]
    store = ds.chunks
    pack, at, length = store.locate(chunk_id)
    original = store.get(chunk_id)
    byte = original[length // 2]
    try:
        if how == "missing":
            store.delete(chunk_id)
            store.flush()
        else:
            with open(pack, "r+b") as f:
                f.seek(at + length // 2)
                f.write(bytes([byte ^ 0x01]))
        yield point_id, disk, chunk_no * ref.chunk_size
    finally:
        if how == "missing":
            store.insert(chunk_id, original)
            store.flush()
        else:
            with open(pack, "r+b") as f:
                f.seek(at + length // 2)
                f.write(bytes([byte]))
        vault.close()


@pytest.mark.parametrize(("how", "reason"), [("missing", "missing"), ("corrupt", "corrupt: ")])
def test_datastore_verify_damaged_chunk_names_point_disk_and_offset(
    protected: Lab, how: str, reason: str
) -> None:
    with damaged_chunk(protected, how) as (point_id, disk, offset):
        run = protected.cli("datastore", "verify", "--json", expect=DATASTORE_ERROR)
    report = run.json()
    assert report["ok"] is False
    assert {"point_id": point_id, "disk": disk, "offset": offset} in [
        {k: p[k] for k in ("point_id", "disk", "offset")} for p in report["problems"]
    ]
    assert all(p["reason"].startswith(reason) for p in report["problems"])
    # Every point shares the unchanged chunk, so every point is reported.
    assert len(report["problems"]) == report["points_checked"]
    # The message names the first bad place (the oldest point) the same way.
    first = rf"the first: point rp-[0-9a-f-]+ disk {disk} offset {offset}: chunk [0-9a-f]{{64}} {reason}"
    assert re.search(first, run.error), run.error
    # Restored: the datastore is whole again.
    assert protected.cli("datastore", "verify", "--json").json()["ok"] is True


# ---------------------------------------------------------------------------------------------
# --json on every list command


LIST_COMMANDS = [
    ["site", "list"],
    ["machine", "list"],
    ["machine", "list", "--site", "primary"],
    ["policy", "list"],
    ["status"],
    ["point", "list", "vm1"],
    ["job", "list"],
]


def test_every_list_command_prints_json(protected: Lab) -> None:
    # Independent read-only runs: in parallel, since each CLI start costs about a second.
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(lambda command: protected.cli(*command, "--json"), LIST_COMMANDS))
    for command, run in zip(LIST_COMMANDS, runs, strict=True):
        data = run.json()
        assert isinstance(data, list), command
        assert data, f"{' '.join(command)} listed nothing"
        assert all(isinstance(row, dict) for row in data), command


# ---------------------------------------------------------------------------------------------
# Failover and back (it moves vm1 around and leaves it protected forward again)


def test_failover_commit_reprotect_failback_and_back_through_the_cli(protected: Lab) -> None:
    run = protected.cli("failover", "commit", "vm1", expect=NOT_ALLOWED)
    assert "commit is not allowed for 'vm1' in state Protected" in run.error
    assert "planned-failover" in run.error
    run = protected.cli("failback", "vm1", expect=NOT_ALLOWED)
    assert "nothing to fail back" in run.error

    job = protected.cli("failover", "planned", "vm1", "--json").json()
    assert job["state"] == "Succeeded" and job["kind"] == "failover"
    assert [s["state"] for s in job["steps"]] == ["Succeeded"] * 5
    assert job["result"]["rto_seconds"] > 0
    (item,) = protected.cli("status", "vm1", "--json").json()
    assert item["state"] == "FailedOver"
    assert item["allowed_operations"] == ["change-recovery-point", "commit", "cancel-failover", "disable"]
    assert item["recovered_machine"]["nics"][0]["network"] == "prod-asr"

    assert protected.cli("failover", "commit", "vm1", "--json").json()["state"] == "Succeeded"
    job = protected.cli("reprotect", "vm1", "--json").json()
    assert job["state"] == "Succeeded"
    assert job["result"]["bytes_compared"] == job["result"]["disk_bytes"] == len(DISKS) * DISK_SIZE
    assert job["result"]["bytes_sent"] == 0  # nothing was written at the recovery site
    (item,) = protected.cli("status", "vm1", "--json").json()
    assert (item["state"], item["direction"], item["policy"]) == ("Protected", "reverse", "fast-failback")

    assert protected.cli("failback", "vm1", "--json").json()["state"] == "Succeeded"
    assert protected.cli("failover", "commit", "vm1", "--json").json()["state"] == "Succeeded"
    assert protected.cli("reprotect", "vm1", "--json").json()["state"] == "Succeeded"
    (item,) = protected.cli("status", "vm1", "--json").json()
    assert (item["state"], item["direction"], item["policy"]) == ("Protected", "forward", "fast")
    kinds = [j["kind"] for j in protected.cli("job", "list", "--json").json()[:6]]
    assert kinds == ["reprotect", "commit-failover", "failover", "reprotect", "commit-failover", "failover"]


# ---------------------------------------------------------------------------------------------
# The end of the flow: disable replication, then stop the worker (must stay last in this file)


def test_replication_disable_removes_item_and_worker_keeps_running(protected: Lab) -> None:
    worker_before = protected.cli("worker", "status", "--json").json()
    log = protected.vault / "run" / "worker.log"
    log_start = log.stat().st_size
    protected.cli("replication", "disable", "vm1")
    assert protected.cli("status", "--json").json() == []
    protected.cli("point", "list", "vm1", expect=NOT_FOUND)
    # The worker's schedule forgets the item and carries on.
    time.sleep(1.0)
    assert protected.cli("worker", "status", "--json").json() == worker_before
    with log.open() as f:
        f.seek(log_start)
        log_lines = f.read().splitlines()
    assert not [line for line in log_lines if "failed" in line or "Traceback" in line]


def test_worker_stop_stops_it(protected: Lab) -> None:
    assert "worker stopped" in protected.cli("worker", "stop").stdout
    assert protected.cli("worker", "status", "--json").json() == {"running": False, "pid": None}
    assert "worker was not running" in protected.cli("worker", "stop").stdout
