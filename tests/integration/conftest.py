"""A lab for control-plane integration tests: real machines (qemu-storage-daemon or raw files),
a real vault (SQLite + local datastore), real jobs run in-process or by the real worker."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from siterecovery.adapters.sources.qemu_daemon import MachineDaemon
from siterecovery.control import (
    handlers,  # noqa: F401  (registers job handlers)
    jobs,
    networks,
    policies,
    protection,
    sites,
)
from siterecovery.control.vault import Vault, create_vault
from siterecovery.demo.fabric import fill_image, load_base, write_inventory
from siterecovery.demo.workload import Workload

MIB = 1024 * 1024
DISKS = ("disk0", "disk1")


@dataclass
class LabMachine:
    name: str
    images: dict[str, Path]
    regions: dict[str, tuple[int, int]]
    daemon: MachineDaemon | None = None
    workload: Workload | None = None

    def base(self) -> dict[str, Any]:
        return {d: load_base(p) for d, p in self.images.items()}


@dataclass
class Lab:
    root: Path
    vault: Vault
    kind: str
    machines: dict[str, LabMachine] = field(default_factory=dict)

    def run_job(self, job_id: str) -> dict[str, Any]:
        """Run a queued job to its end in this process, as the worker would."""
        assert jobs.claim(self.vault, job_id)
        jobs.run_job(self.vault, job_id)
        return jobs.show_job(self.vault, job_id)

    def enable(self, name: str, policy: str = "fast", **kw: Any) -> dict[str, Any]:
        info = protection.enable_replication(self.vault, name, policy=policy, recovery_site="recovery", **kw)
        return self.run_job(info["job"])

    def start_workload(self, name: str, rate: float = 2_000_000, seed: int = 7) -> Workload:
        m = self.machines[name]
        assert m.daemon is not None
        wl = Workload(
            m.daemon.nbd_socket,
            m.regions,
            self.root / "logs" / f"{name}.log",
            rate_bytes_s=rate,
            seed=seed,
            machine_tag=name,
        )
        wl.start()
        m.workload = wl
        return wl

    def item(self, name: str) -> dict[str, Any]:
        # These tests play the worker's part in-process (run_job, take_point), or start the real one.
        return protection.status(self.vault, name, worker_running=True)[0]


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """Build a lab: ``lab_factory(machines=1, size=64 MiB, data=8 MiB, kind="qemu")``."""
    labs: list[Lab] = []
    roots: list[Path] = []

    def make(
        machines: int = 1,
        size: int = 64 * MIB,
        data: int = 8 * MIB,
        kind: str = "qemu",
        policy: dict[str, Any] | None = None,
        datastore: Path | str | None = None,
        recovery_path: Path | None = None,
        hooks: dict[str, Any] | None = None,
    ) -> Lab:
        # Short paths: unix socket paths are limited to 107 bytes.
        root = Path(tempfile.mkdtemp(prefix="sr-"))
        roots.append(root)
        lab_machines: dict[str, LabMachine] = {}
        inventory = []
        for i in range(machines):
            name = f"vm{i + 1}"
            images: dict[str, Path] = {}
            regions: dict[str, tuple[int, int]] = {}
            ext = "qcow2" if kind == "qemu" else "img"
            for j, disk in enumerate(DISKS):
                img = root / "disks" / f"{name}-{disk}.{ext}"
                img.parent.mkdir(parents=True, exist_ok=True)
                base = fill_image(img, size, data, seed=i * 10 + j, fmt="qcow2" if kind == "qemu" else "raw")
                images[disk], regions[disk] = img, base.workload_region
            m = LabMachine(name, images, regions)
            entry: dict[str, Any] = {
                "name": name,
                "cpus": 1,
                "memory_mib": 512,
                "disk": [{"name": d, "node": d, "path": str(p)} for d, p in images.items()],
                "nic": [
                    {
                        "name": "nic0",
                        "mac": f"52:54:00:00:01:{i + 1:02x}",
                        "ip": f"10.0.0.{10 + i}",
                        "network": "prod",
                    }
                ],
            }
            if hooks:
                entry["hooks"] = hooks
            if kind == "qemu":
                m.daemon = MachineDaemon.start(root / "run" / name, images)
                entry["qmp"], entry["nbd"] = m.daemon.qmp_socket, m.daemon.nbd_socket
            lab_machines[name] = m
            inventory.append(entry)
        write_inventory(root / "inventory.toml", inventory)
        vault = create_vault(root / "vault", "lab", datastore)
        sites.add_site(vault, "primary", kind, "primary", root / "inventory.toml", None)
        sites.add_site(vault, "recovery", kind, "recovery", None, recovery_path or root / "recovery")
        # The network the machines' NICs are on (enable maps it to a "prod-asr" mirror at recovery).
        networks.add_network(vault, "prod", site="primary", subnets=["default=10.0.0.0/24"])
        sites.discover(vault, "primary")
        policies.create_policy(
            vault,
            "fast",
            **(
                policy
                or {"crash_frequency": "5s", "rpo_threshold": "30s", "retention": "2h", "app_frequency": 0}
            ),
        )
        lab = Lab(root, vault, kind, lab_machines)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        for m in lab.machines.values():
            if m.workload is not None and m.workload.is_alive():
                with contextlib.suppress(Exception):
                    m.workload.stop()
        with contextlib.suppress(Exception):
            from siterecovery.control.worker import stop_worker

            stop_worker(lab.vault, timeout=20)
        for m in lab.machines.values():
            if m.daemon is not None:
                with contextlib.suppress(Exception):
                    m.daemon.stop()
        for d in (lab.root / "recovery" / "machines").glob("*/run"):
            with contextlib.suppress(Exception):
                MachineDaemon.attach(d).stop()
        lab.vault.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
