"""Distributed mode under fire.

* The agent (the vault's worker) and the process server run as separate processes talking TLS
  on loopback, a workload writes to the machine, and both are killed with SIGKILL at random
  moments, again and again. Afterwards every recovery point verifies and each one is exactly a
  prefix of the workload's write log: nothing acknowledged was lost and no point refers to data
  that did not arrive.
* The datastore (a real S3 server) goes away behind the process server: the spool absorbs the
  stream, recovery points stop, the item's health says why, and when the datastore returns the
  backlog drains and points resume, with nothing lost."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from s3server import SeaweedS3
from siterecovery.adapters.chunk_stores.s3 import S3Location
from siterecovery.adapters.db.models import PointRow
from siterecovery.adapters.transport import query_status
from siterecovery.control import jobs, protection
from siterecovery.control.certificates import VaultCA, use_process_server, write_bundle
from siterecovery.control.worker import ensure_worker, stop_worker
from siterecovery.dataplane.materialize import materialize_disk
from siterecovery.demo.verify import disk_specs, raw_reader, verify_machine
from siterecovery.entrypoints.process_server import ProcessServerConfig, RunningProcessServer

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
KILLS_EACH = 10  # 20 SIGKILLs in all, at least
SEED = int(os.environ.get("SR_KILL_SEED", str(random.randrange(1 << 30))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(vault: Path, *args: str) -> str:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "siterecovery"), "--vault", str(vault), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


class Proc:
    """A child process that the test kills and restarts."""

    def __init__(self, name: str, argv: list[str], log: Path, ready_port: int | None = None) -> None:
        self.name, self.argv, self.log, self.ready_port = name, argv, log, ready_port
        self.p: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.p = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT)
        if self.ready_port is not None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                assert self.p.poll() is None, f"{self.name} exited: {self.log.read_text()[-2000:]}"
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.ready_port), 0.2),
                ):
                    return
                time.sleep(0.05)
            pytest.fail(f"{self.name} did not listen on {self.ready_port}")

    def kill(self) -> None:
        assert self.p is not None and self.p.poll() is None, f"{self.name} died on its own: {self.tail()}"
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def points(vault) -> list[PointRow]:
    with vault.store.uow() as s:
        rows = list(s.scalars(select(PointRow).order_by(PointRow.created_at)))
        s.expunge_all()
        return rows


def test_agent_and_process_server_survive_random_sigkills(lab_factory, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"kill schedule seed: SR_KILL_SEED={SEED}")
    lab = lab_factory(size=64 * MIB, data=8 * MIB)
    vault_root = lab.vault.root
    data_port, control_port = free_port(), free_port()

    # The operator's steps, through the CLI: a certificate for the appliance, then point the
    # vault's agents at it.
    cli(
        vault_root, "appliance", "register", "ps1", "--out", str(lab.root / "ps-certs"), "--host", "127.0.0.1"
    )
    cli(vault_root, "appliance", "use", f"127.0.0.1:{data_port}", "--control", f"127.0.0.1:{control_port}")

    ps = Proc(
        "process server",
        [
            sys.executable,
            "-m",
            "siterecovery.entrypoints.process_server",
            "--datastore",
            lab.vault.datastore_location,
            "--spool",
            str(lab.root / "spool"),
            "--spool-limit",
            "256M",
            "--certs",
            str(lab.root / "ps-certs"),
            "--data",
            f"127.0.0.1:{data_port}",
            "--control",
            f"127.0.0.1:{control_port}",
        ],
        lab.root / "ps.log",
        ready_port=data_port,
    )
    worker = Proc(
        "worker",
        [sys.executable, "-m", "siterecovery.entrypoints.worker", "--vault", str(vault_root)],
        lab.root / "worker.log",
    )
    procs = [ps, worker]
    try:
        ps.start()
        wl = lab.start_workload("vm1", rate=1_500_000)
        info = protection.enable_replication(lab.vault, "vm1", policy="fast", recovery_site="recovery")
        worker.start()

        # Kill at random moments: each victim lives 0.3..3 s after its (re)start, and stays
        # dead 0..1 s. The process server is restarted on the same ports and spool.
        kills_from = time.time()
        while ps.kills < KILLS_EACH or worker.kills < KILLS_EACH:
            candidates = [p for p in procs if p.kills < KILLS_EACH] or procs
            victim = rng.choice(candidates)
            time.sleep(rng.uniform(0.3, 3.0))
            victim.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            victim.start()
        kill_time = time.time()
        print(f"kills: process server {ps.kills}, worker {worker.kills} in {kill_time - kills_from:.0f}s")

        # Replication carries on: the enable job finishes and a point is made after the last kill.
        final = jobs.wait_for(lab.vault, info["job"], timeout=90)
        assert final["state"] == "Succeeded", final["error"]
        deadline = time.monotonic() + 60
        while not [p for p in points(lab.vault) if p.created_at > kill_time]:
            assert time.monotonic() < deadline, f"no point after the kills; worker log:\n{worker.tail()}"
            time.sleep(0.3)
        status = query_status(f"127.0.0.1:{control_port}", vault_root / "agent")
        assert "vault-lab" in status["agents"]  # the points went through the process server
        wl.stop()
    finally:
        for p in procs:
            p.stop()

    assert ps.kills + worker.kills >= 2 * KILLS_EACH
    rows = points(lab.vault)
    assert len(rows) >= 2
    report = lab.vault.datastore.verify()
    assert report.ok, report.problems[:5]
    assert report.points_checked == len(lab.vault.datastore.list_manifests()) >= len(rows)

    # Every point is the base plus a prefix of the one write sequence, and later points hold
    # longer prefixes.
    seqs = _verify_points(lab, wl.log_path, tmp_path, rows)
    assert seqs == sorted(seqs) and seqs[-1] > 0
    during = sum(kills_from < r.created_at < kill_time for r in rows)
    print(f"{len(rows)} points ({during} made while the kills went on), write prefixes {seqs}")


def _verify_points(lab, wl_log: Path, tmp_path: Path, rows: list[PointRow]) -> list[int]:
    """Materialize every point and check it against the workload log; the write prefixes."""
    m = lab.machines["vm1"]
    seqs = []
    for row in rows:
        manifest = lab.vault.datastore.read_manifest(row.id)
        paths = {}
        for disk, ref in manifest.disks.items():
            paths[disk] = tmp_path / f"{row.id}-{disk}.raw"
            materialize_disk(lab.vault.datastore, ref, paths[disk], "raw")
        with raw_reader(paths) as reader:
            res = verify_machine(reader, disk_specs(m.regions), wl_log, m.base())
        assert res.ok, f"{row.id}: {res.detail}"
        seqs.append(res.max_seq)
        for p in paths.values():
            p.unlink()
    return seqs


def _wait(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_datastore_outage_behind_the_process_server_costs_rpo_not_data(
    lab_factory, tmp_path: Path, aws_credentials: None
) -> None:
    s3_root = Path(tempfile.mkdtemp(prefix="sr-s3-", dir="/tmp"))
    s3 = SeaweedS3(s3_root)
    server = None
    try:
        s3.start()
        s3.create_bucket("outage")
        location = S3Location("outage", "ds", s3.endpoint).url()
        lab = lab_factory(datastore=location)
        ca = VaultCA.load_or_create(lab.vault.root, lab.vault.name)
        certs = write_bundle(tmp_path / "ps-certs", ca.issue("ps1", "process-server", hosts=["127.0.0.1"]))
        server = RunningProcessServer(
            ProcessServerConfig(
                datastore=location,
                spool=tmp_path / "spool",
                spool_limit=256 * MIB,
                certs=certs.cert.parent,
                data="127.0.0.1:0",
                control="127.0.0.1:0",
            )
        )
        use_process_server(
            lab.vault.root,
            lab.vault.name,
            f"127.0.0.1:{server.data_address[1]}",
            control=f"127.0.0.1:{server.control_address[1]}",
            flush_timeout_s=3,
        )
        lab.enable("vm1")
        wl = lab.start_workload("vm1", rate=1_000_000)
        started = time.time()
        ensure_worker(lab.vault)
        first = len(
            _wait(
                "the worker's first point",
                lambda: [p for p in points(lab.vault) if p.created_at > started],
                60,
            )
        )

        s3.stop()
        down_at = time.time()
        # The worker's cycles fail at the flush; the item's health names the datastore.
        st = _wait(
            "the item's health to report the outage",
            lambda: (x := lab.item("vm1"))["health"] != "Normal" and x,
            60,
        )
        reasons = " ".join(st["health_reasons"])
        assert "durable in the datastore" in reasons and "Nothing is lost" in reasons, reasons
        spool = server.status()["spool"]
        assert spool["state"] == "datastore-unavailable" and spool["backlog_chunks"] > 0, spool
        made_during = [p for p in points(lab.vault) if p.created_at > down_at + 1]
        assert not made_during  # no point may refer to chunks that are only in the spool

        s3.start()
        up_at = time.time()
        _wait(
            "a point after the datastore returned",
            lambda: [p for p in points(lab.vault) if p.created_at > up_at],
            90,
        )
        _wait("the item to be healthy again", lambda: lab.item("vm1")["health"] == "Normal", 60)
        _wait("the spool to drain", lambda: server.status()["spool"]["backlog_chunks"] == 0, 60)
        wl.stop()
        stop_worker(lab.vault, timeout=30)

        rows = points(lab.vault)
        assert len(rows) > first
        report = lab.vault.datastore.verify()
        assert report.ok, report.problems[:5]
        seqs = _verify_points(lab, wl.log_path, tmp_path, rows)
        assert seqs == sorted(seqs) and seqs[-1] > 0
    finally:
        if server is not None:
            server.close()
        s3.stop()
        shutil.rmtree(s3_root, ignore_errors=True)
