"""``siterecovery demo``: the whole life of protected machines in one run, checked against ground truth.

A throwaway vault; three machines with two qcow2 disks each, partly filled with real data, each
owned by a qemu-storage-daemon that stands in for the VM; a workload writing verifiable blocks
to every machine (about 1 MB/s each, in the first half of each disk's workload region);
replication enabled with a 15 s crash-consistent frequency; RPO sampled every second while it
runs; then a test failover of each machine, whose recovered disks are verified block by block
against the workload's log (which proves the point byte-exact and crash-consistent across both
disks), and cleanup. Then the life after a disaster (:mod:`siterecovery.demo.lifecycle`): a
planned failover of the first machine, an unplanned failover of the second, writes at the
recovery site (second halves), commit, reprotect, failback and reprotect again, each verified
against the workloads' logs. Every figure in the report is measured in this run.

Report (JSON): machines, rpo_seconds {p50, p95, max, samples}, checks [{name, passed, detail}],
bytes_replicated, bytes_stored, recovery_points, initial_replication_seconds,
test_failover_seconds {machine: s}, rto_seconds {"<m> planned failover" | "<m> unplanned
failover" | "<m> failback": s}, data_loss_bytes {same keys: bytes}, reprotect_bytes_sent {"<m>" |
"<m> (after failback)": {bytes_sent, bytes_compared, disk_bytes}}, lifecycle_seconds,
logical_bytes_protected, duration_seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd as libnbd
from rich.console import Console
from rich.live import Live
from rich.table import Table

from siterecovery.adapters.sources.qemu_daemon import MachineDaemon
from siterecovery.control import jobs, networks, policies, protection, sites, test_failover
from siterecovery.control.maintenance import run_verify
from siterecovery.control.vault import Vault, create_vault
from siterecovery.control.worker import ensure_worker, stop_worker
from siterecovery.demo.fabric import fill_image, load_base, write_inventory
from siterecovery.demo.lifecycle import (
    Lifecycle,
    LifecycleFailed,
    LifecycleMachine,
    LifecycleReport,
    split_regions,
)
from siterecovery.demo.verify import disk_specs, nbd_reader, verify_machine
from siterecovery.demo.workload import Workload
from siterecovery.domain.durations import parse_duration

MIB = 1024 * 1024
GIB = 1024 * MIB
MACHINES = ("web01", "app01", "db01")
DISKS = ("disk0", "disk1")


@dataclass
class DemoConfig:
    machines: int = 3
    disk_size: int = 1 * GIB
    data_bytes: int = 160 * MIB
    rate_bytes_s: float = 1_000_000
    crash_frequency: str = "15s"
    steady_seconds: float = 60.0
    lifecycle: bool = True  # failover, reprotect and failback of the first two machines
    recovery_write_seconds: float = 20.0
    workdir: Path | None = None
    keep: bool = False


@dataclass
class DemoResult:
    report: dict[str, Any]
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


class PointLedger:
    """Every recovery point seen during the run (commit releases points; the report counts them all)."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def observe(self, vault: Vault, names: list[str]) -> None:
        for name in names:
            for p in protection.list_points(vault, name):
                self.sent[p["id"]] = p["sent_bytes"]


class Checks:
    def __init__(self, console: Console) -> None:
        self.items: list[dict[str, Any]] = []
        self.console = console

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.items.append({"name": name, "passed": bool(passed), "detail": detail})
        mark = "[green]PASS[/green]" if passed else "[red]FAIL[/red]"
        self.console.print(f"  {mark} {name}: {detail}")
        return passed


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


@contextlib.contextmanager
def _workdir(cfg: DemoConfig) -> Iterator[Path]:
    if cfg.workdir is not None:
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        yield cfg.workdir
        return
    path = Path(tempfile.mkdtemp(prefix="siterecovery-demo-"))
    try:
        yield path
    finally:
        if not cfg.keep:
            shutil.rmtree(path, ignore_errors=True)


def run_demo(cfg: DemoConfig, console: Console, report: Path | None = None) -> DemoResult:
    with _workdir(cfg) as root:
        result = _run(cfg, root, console)
        if report is not None:
            write_report(report, result)
            console.print(f"report written to {report}")
        if cfg.workdir is None and not cfg.keep:
            console.print("removing the demo's temporary files")
        return result


def _run(cfg: DemoConfig, root: Path, console: Console) -> DemoResult:
    checks = Checks(console)
    names = list(MACHINES[: cfg.machines]) + [f"vm{i:02d}" for i in range(len(MACHINES), cfg.machines)]
    daemons: dict[str, MachineDaemon] = {}
    workloads: dict[str, Workload] = {}
    vault: Vault | None = None
    rto: dict[str, float] = {}
    life = LifecycleReport()
    ledger = PointLedger()
    lifecycle_names: list[str] = []
    t_start = time.monotonic()
    try:
        console.rule("[bold]siterecovery demo")
        console.print(f"working in {root}")
        # 1. Machines with real data, each owned by a storage daemon standing in for its VM.
        console.print(
            f"making {len(names)} machines x {len(DISKS)} disks of {cfg.disk_size // MIB} MiB "
            f"({cfg.data_bytes // MIB} MiB of real data each)"
        )
        inventory = []
        full_regions: dict[str, dict[str, tuple[int, int]]] = {}
        images: dict[str, dict[str, Path]] = {}
        for m_i, name in enumerate(names):
            images[name] = {}
            full_regions[name] = {}
            for d_i, disk in enumerate(DISKS):
                img = root / "primary" / "disks" / f"{name}-{disk}.qcow2"
                img.parent.mkdir(parents=True, exist_ok=True)
                base = fill_image(img, cfg.disk_size, cfg.data_bytes, seed=m_i * 10 + d_i, fmt="qcow2")
                images[name][disk] = img
                full_regions[name][disk] = base.workload_region
            daemons[name] = MachineDaemon.start(root / "primary" / "run" / name, images[name])
            inventory.append(
                {
                    "name": name,
                    "os": "linux",
                    "cpus": 2,
                    "memory_mib": 2048,
                    "qmp": daemons[name].qmp_socket,
                    "nbd": daemons[name].nbd_socket,
                    "disk": [{"name": d, "node": d, "path": str(images[name][d])} for d in DISKS],
                    "nic": [
                        {
                            "name": "nic0",
                            "mac": f"52:54:00:00:00:{m_i + 1:02x}",
                            "ip": f"10.10.0.{11 + m_i}",
                            "network": "prod",
                        }
                    ],
                }
            )
        inv_path = root / "primary" / "inventory.toml"
        write_inventory(inv_path, inventory)
        # The primary-phase workloads write the first half of each workload region; the second
        # half is for the writes made at the recovery site after a failover (own log each).
        halves = {n: split_regions(full_regions[n]) for n in names}
        regions = {n: halves[n][0] for n in names}

        # 2. Vault, sites, policy.
        vault = create_vault(root / "vault", "demo")
        sites.add_site(vault, "primary", "qemu", "primary", inv_path, None)
        sites.add_site(vault, "recovery", "qemu", "recovery", None, root / "recovery")
        # The machines' NICs are on "prod": enabling maps it to the recovery site ("prod-asr").
        networks.add_network(vault, "prod", site="primary", subnets=["default=10.10.0.0/24"])
        found = sites.discover(vault, "primary")
        checks.add(
            "discovery", sorted(found["added"]) == sorted(names), f"discovered {', '.join(found['added'])}"
        )
        policies.create_policy(
            vault,
            "demo",
            crash_frequency=cfg.crash_frequency,
            rpo_threshold="1m",
            retention="4h",
            app_frequency=0,
        )

        # 3. Workloads first: the initial replication runs while the guests write.
        for m_i, name in enumerate(names):
            wl = Workload(
                daemons[name].nbd_socket,
                regions[name],
                root / "logs" / f"{name}.log",
                rate_bytes_s=cfg.rate_bytes_s,
                seed=1000 + m_i,
                machine_tag=name,
            )
            wl.start()
            workloads[name] = wl

        # 4. Enable replication of every machine and follow the initial replication.
        enable_jobs = {}
        for name in names:
            enable_jobs[name] = protection.enable_replication(
                vault, name, policy="demo", recovery_site="recovery"
            )["job"]
        ensure_worker(vault)
        t_enable = time.monotonic()
        _follow(console, vault, "initial replication", lambda: _all_final(vault, enable_jobs), names)
        initial_s = time.monotonic() - t_enable
        for name, job_id in enable_jobs.items():
            info = jobs.show_job(vault, job_id)
            res = info["result"] or {}
            checks.add(
                f"{name}: initial replication",
                info["state"] == "Succeeded",
                f"{info['state']} in {info['duration_s']}s, read {res.get('bytes_read', 0) / MIB:.0f} MiB, "
                f"sent {res.get('bytes_sent', 0) / MIB:.0f} MiB"
                + (f": {info['error']}" if info["error"] else ""),
            )
        if not all(jobs.show_job(vault, j)["state"] == "Succeeded" for j in enable_jobs.values()):
            raise RuntimeError("initial replication failed; see the checks above")

        # 5. Steady state: sample RPO every second.
        rpo_samples: dict[str, list[float]] = {n: [] for n in names}
        _follow(
            console,
            vault,
            f"continuous replication ({cfg.steady_seconds:.0f}s)",
            _timer(cfg.steady_seconds),
            names,
            rpo_samples,
        )

        # 6. Test failover of each machine to its latest point, with replication still running.
        for name in names:
            before = {p["id"] for p in protection.list_points(vault, name)}
            t0 = time.monotonic()
            info = test_failover.start_test_failover(vault, name, "latest")
            final = jobs.wait_for(vault, info["job"])
            rto[name] = time.monotonic() - t0
            if not checks.add(
                f"{name}: test failover",
                final["state"] == "Succeeded",
                f"{name}-test from {info['point_id']} ({info['point_type']}) in {rto[name]:.1f}s"
                + (f": {final['error']}" if final["error"] else ""),
            ):
                continue
            _check_test_machine(
                vault, name, regions[name], images[name], workloads[name], daemons[name], checks
            )
            # Replication goes on during the drill: wait for one more point.
            deadline = time.time() + 3 * _seconds(cfg.crash_frequency) + 30
            newer: set[str] = set()
            while time.time() < deadline and not newer:
                newer = {p["id"] for p in protection.list_points(vault, name)} - before - {info["point_id"]}
                rpo_samples[name].append(protection.status(vault, name)[0]["rpo_seconds"] or 0.0)
                time.sleep(1)
            checks.add(
                f"{name}: replication continues during the drill",
                bool(newer),
                f"{len(newer)} new point(s) while {name}-test ran",
            )
            tdir = Path(protection.status(vault, name)[0]["test_failover"]["dir"])
            cjob = test_failover.cleanup_test_failover(vault, name, notes="demo drill: data verified")["job"]
            cfinal = jobs.wait_for(vault, cjob)
            state = protection.status(vault, name)[0]["state"]
            checks.add(
                f"{name}: cleanup",
                cfinal["state"] == "Succeeded" and not tdir.exists() and state == "Protected",
                f"job {cfinal['state']}, test machine removed: {not tdir.exists()}, item state {state}",
            )

        # 7. The life after a disaster: failover, writes at the recovery site, commit, reprotect,
        # failback and reprotect again of the first two machines.
        if cfg.lifecycle:
            lifecycle_names = names[:2]
            members = [
                LifecycleMachine(
                    name=n,
                    images=images[n],
                    first_half=halves[n][0],
                    second_half=halves[n][1],
                    daemon=daemons[n],
                    workload=workloads[n],
                    seed=1000 + names.index(n),
                )
                for n in lifecycle_names
            ]
            act = Lifecycle(
                vault=vault,
                root=root,
                console=console,
                checks=checks,
                rate_bytes_s=cfg.rate_bytes_s,
                crash_interval_s=_seconds(cfg.crash_frequency),
                recovery_write_seconds=cfg.recovery_write_seconds,
                follow=lambda title, done: _follow(console, vault, title, done, names),
                observe=lambda: ledger.observe(vault, names),
                report=life,
            )
            try:
                act.run(members[0], members[1] if len(members) > 1 else None)
            except LifecycleFailed as err:
                console.print(f"[red]the lifecycle stopped: {err}[/red]")
            finally:
                # Recovery-site workloads are stopped with the others (below, and on any error).
                for m in members:
                    if m.recovery_workload is not None:
                        workloads[f"{m.name}@recovery"] = m.recovery_workload

        # 8. Stop the guests, check the source disks themselves, and verify the datastore.
        for wl in workloads.values():
            if wl.is_alive():
                wl.stop()
        for name in names:
            if name in lifecycle_names:
                continue  # checked after the failback, against both logs
            with nbd_reader(Path(daemons[name].nbd_socket), list(DISKS)) as reader:
                res = verify_machine(
                    reader,
                    disk_specs(regions[name]),
                    workloads[name].log_path,
                    {d: load_base(images[name][d]) for d in DISKS},
                )
            checks.add(f"{name}: source disks intact", res.ok, res.detail)
        report = run_verify(vault)
        checks.add(
            "datastore verify",
            report.ok,
            f"{report.points_checked} points, {report.chunks_checked} chunks, "
            f"{len(report.problems)} problem(s)",
        )

        all_rpo = [v for vals in rpo_samples.values() for v in vals]
        rpo = {
            "p50": round(_percentile(all_rpo, 0.50), 2),
            "p95": round(_percentile(all_rpo, 0.95), 2),
            "max": round(max(all_rpo), 2) if all_rpo else None,
            "samples": len(all_rpo),
        }
        limit = 2 * _seconds(cfg.crash_frequency)
        checks.add(
            "RPO p95",
            bool(all_rpo) and rpo["p95"] <= limit,
            f"p95 {rpo['p95']}s (limit {limit:.0f}s with a {cfg.crash_frequency} crash-consistent "
            f"frequency), p50 {rpo['p50']}s, max {rpo['max']}s over {len(all_rpo)} samples",
        )
        ledger.observe(vault, names)
        stats = vault.datastore.stats()
        result = {
            "machines": len(names),
            "rpo_seconds": rpo,
            "checks": checks.items,
            "bytes_replicated": sum(ledger.sent.values()),
            "bytes_stored": int(stats.get("stored_bytes", 0)),
            "recovery_points": len(ledger.sent),
            "initial_replication_seconds": round(initial_s, 2),
            "test_failover_seconds": {n: round(v, 2) for n, v in rto.items()},
            **life.to_json(),
            "logical_bytes_protected": len(names) * len(DISKS) * cfg.disk_size,
            "duration_seconds": round(time.monotonic() - t_start, 1),
        }
        _summary(console, result, names, vault)
        return DemoResult(report=result, checks=checks.items)
    except Exception as err:
        checks.add("demo ran to the end", False, f"{type(err).__name__}: {err}")
        return DemoResult(
            report={
                "machines": len(names),
                "rpo_seconds": {},
                "checks": checks.items,
                "bytes_replicated": 0,
                "bytes_stored": 0,
                **life.to_json(),
            },
            checks=checks.items,
        )
    finally:
        for wl in workloads.values():
            with contextlib.suppress(Exception):
                if wl.is_alive():
                    wl.stop()
        if vault is not None:
            with contextlib.suppress(Exception):
                stop_worker(vault)
            with contextlib.suppress(Exception):
                for name in names:
                    tf = protection.status(vault, name)[0]["test_failover"]
                    if tf and tf.get("dir"):
                        test_failover._remove_test_machine(Path(tf["dir"]))
            vault.close()
        # Machines a failover started at the recovery site and the run left behind.
        for run_dir in (root / "recovery" / "machines").glob("*/run"):
            with contextlib.suppress(Exception):
                MachineDaemon.attach(run_dir).stop()
        for d in daemons.values():
            with contextlib.suppress(Exception):
                d.stop()


def _seconds(text: str) -> float:
    return parse_duration(text)


def _check_test_machine(
    vault: Vault,
    name: str,
    regions: dict[str, tuple[int, int]],
    images: dict[str, Path],
    workload: Workload,
    source: MachineDaemon,
    checks: Checks,
) -> None:
    """The recovered disks must equal base + a prefix of the workload log, across both disks."""
    tf = protection.status(vault, name)[0]["test_failover"]
    test_nbd = Path(MachineDaemon.attach(Path(tf["run_dir"])).nbd_socket)
    with nbd_reader(test_nbd, list(DISKS)) as reader:
        res = verify_machine(
            reader, disk_specs(regions), workload.log_path, {d: load_base(images[d]) for d in DISKS}
        )
    lag = workload.stats().last_seq - res.max_seq
    checks.add(
        f"{name}: recovered disks byte-exact and crash-consistent",
        res.ok and res.max_seq > 0,
        f"{res.detail}; the point holds writes 1..{res.max_seq} of the log ({lag} written since)",
    )
    # The test machine's disks are independent copies: a write to them must not reach the source.
    disk, offset, marker = DISKS[0], regions[DISKS[0]][1] - 65536, b"\xee" * 65536
    h = libnbd.NBD()
    h.connect_uri(f"nbd+unix:///{disk}?socket={test_nbd}")
    h.pwrite(marker, offset)
    h.flush()
    landed = h.pread(len(marker), offset) == marker
    h.shutdown()
    with nbd_reader(Path(source.nbd_socket), [disk]) as src:
        leaked = src.read(disk, offset, len(marker)) == marker
    checks.add(
        f"{name}: test disks are independent copies",
        landed and not leaked,
        f"a write to {name}-test/{disk} landed there ({landed}) and not on the source ({not leaked})",
    )


def _all_final(vault: Vault, job_ids: dict[str, str]) -> bool:
    return all(jobs.show_job(vault, j)["state"] in jobs.FINAL for j in job_ids.values())


def _timer(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


def _follow(
    console: Console,
    vault: Vault,
    title: str,
    done: Callable[[], bool],
    names: list[str],
    rpo_samples: dict[str, list[float]] | None = None,
) -> None:
    """A live table of the items (state, progress, RPO, points) until ``done()``."""

    def render() -> Table:
        t = Table(title=title)
        for c in ("machine", "state", "health", "initial", "RPO", "points", "last point type"):
            t.add_column(c)
        for st in protection.status(vault):
            pts = protection.list_points(vault, st["name"])
            prog = st["initial_replication_progress"]
            rpo = st["rpo_seconds"]
            t.add_row(
                st["name"],
                st["state"],
                st["health"],
                "-" if prog is None else f"{prog:.0%}",
                "-" if rpo is None else f"{rpo:.1f}s",
                str(len(pts)),
                pts[0]["type"] if pts else "-",
            )
        return t

    with Live(render(), console=console, refresh_per_second=2) as live:
        while not done():
            time.sleep(1.0)
            if rpo_samples is not None:
                for st in protection.status(vault):
                    if st["rpo_seconds"] is not None and st["name"] in rpo_samples:
                        rpo_samples[st["name"]].append(st["rpo_seconds"])
            live.update(render())


def _summary(console: Console, result: dict[str, Any], names: list[str], vault: Vault) -> None:
    t = Table(title="siterecovery demo summary")
    t.add_column("figure")
    t.add_column("value")
    rpo = result["rpo_seconds"]
    t.add_row("machines", str(result["machines"]))
    t.add_row("RPO p50 / p95 / max", f"{rpo['p50']}s / {rpo['p95']}s / {rpo['max']}s")
    t.add_row("initial replication", f"{result['initial_replication_seconds']}s")
    t.add_row("bytes replicated (sent)", f"{result['bytes_replicated'] / MIB:.1f} MiB")
    t.add_row("bytes stored", f"{result['bytes_stored'] / MIB:.1f} MiB")
    t.add_row("recovery points", str(result["recovery_points"]))
    for key, secs in result.get("rto_seconds", {}).items():
        loss = result.get("data_loss_bytes", {}).get(key)
        t.add_row(f"{key}: RTO / data loss", f"{secs}s / {'-' if loss is None else f'{loss / MIB:.2f} MiB'}")
    for key, sent in result.get("reprotect_bytes_sent", {}).items():
        share = sent["bytes_sent"] / max(sent["disk_bytes"], 1)
        t.add_row(f"reprotect {key}: sent", f"{sent['bytes_sent'] / MIB:.1f} MiB ({share:.1%} of the disks)")
    passed = sum(c["passed"] for c in result["checks"])
    t.add_row("checks", f"{passed}/{len(result['checks'])} passed")
    console.print(t)


def write_report(path: Path, result: DemoResult) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.report, indent=2) + "\n")
    tmp.replace(path)


__all__ = ["DemoConfig", "run_demo", "write_report"]
