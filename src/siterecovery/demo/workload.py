"""A demo "guest" that writes verifiable data to a machine's disks over NBD.

The workload writes into each disk's *workload region* (the zero-initialised part after the data
region, see :mod:`siterecovery.demo.fabric`), choosing a disk at random for each write. One
write is ``io_size`` bytes (a multiple of 4 KiB from 4 KiB to 1 MiB; 4 KiB by default) sent as
ONE NBD write request to a pseudo-random *slot*: an ``io_size``-aligned disk offset (aligned to
the disk, not to the region) such that ``[offset, offset + io_size)`` lies entirely inside the
region. Slots never overlap, so a later write to a slot replaces all of an earlier one. The
write is ``io_size // 4096`` consecutive 4 KiB blocks (format below) that all carry the write's
``seq`` and time, each with its own offset. Writes happen ONE at a time: write n has completed
(the NBD server replied) before write n+1 is sent, so the writes of all disks form a single
global sequence ``seq = 1, 2, 3, ...``. A recovered copy of the disks is crash-consistent iff it
equals the base plus a prefix of that sequence; that is what :mod:`siterecovery.demo.verify`
checks. The rate is in bytes/s whatever the I/O size: a write is due every ``io_size / rate`` s.

Block format (4096 bytes, little-endian)::

    0   8s   magic b"SRDEMOWB"
    8   u16  format version (1)
    10  u16  disk index (position of the disk in the workload's disk list)
    12  u32  block size (4096)
    16  16s  machine tag (UTF-8, zero padded)
    32  u64  seq (>= 1, global across the machine's disks)
    40  u64  offset of the block on its disk
    48  u64  wall-clock time of the write, ns since the epoch
    56  16s  checksum: BLAKE3 (first 16 bytes) of the whole block with this field zeroed
    72  ...  payload: BLAKE3 XOF of (seed, seq), piece k for the k-th block of a write, so it
             cannot be confused with base data

Log format (the ground truth for verification; append-only)::

    header (4096 bytes): b"SRDEMOWL", u32 version (1), u32 n, n bytes of UTF-8 JSON
        {"seed", "machine_tag", "block_size", "record_size", "io_size",
         "disks": [{"name", "start", "end"}]},
        zero padding
    records (32 bytes each): u64 seq, u16 disk index, 6 bytes zero, u64 offset, u64 monotonic ns

One record per write; its offset is the write's first (lowest) block, so it covers
``[offset, offset + io_size)``. ``io_size`` was added to the header without a version change:
a log without it (written before I/O sizes existed) is read as ``io_size`` 4096, which is what
it was. A record is appended after its write completed. Records are flushed to the file every
``flush_interval_s`` (0.2 s by default), when paused and on stop; a workload killed with
SIGKILL may therefore have written up to that much more than its log says (the verifier accepts
such an unlogged tail). A torn last record is ignored by readers.

The writer runs in its own process (``python -m siterecovery.demo.workload``) so that it does
not compete for the GIL with the replication it is meant to exercise. The parent controls it
with signals: SIGUSR1 pauses (finishes the current write, flushes the disks and the log, prints
``paused``), SIGUSR2 resumes, SIGTERM/SIGINT stop cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, NamedTuple

import blake3

from siterecovery.errors import InvalidInput, OutOfRange, SourceError

BLOCK_SIZE = 4096
BLOCK_MAGIC = b"SRDEMOWB"
BLOCK_VERSION = 1
_BLOCK_HEADER = struct.Struct("<8sHHI16sQQQ16s")
CHECKSUM_OFFSET = 56
CHECKSUM_LEN = 16
PAYLOAD_OFFSET = _BLOCK_HEADER.size  # 72
PAYLOAD_LEN = BLOCK_SIZE - PAYLOAD_OFFSET
_PAYLOAD_KEY = blake3.blake3(b"siterecovery demo workload payload v1").digest()
_ZERO_CHECKSUM = bytes(CHECKSUM_LEN)

LOG_MAGIC = b"SRDEMOWL"
LOG_VERSION = 1
LOG_HEADER_SIZE = 4096
_LOG_PREFIX = struct.Struct("<8sII")
_RECORD = struct.Struct("<QH6xQQ")
RECORD_SIZE = _RECORD.size  # 32
TAG_LEN = 16
DEFAULT_RATE = 1_000_000
DEFAULT_IO_SIZE = BLOCK_SIZE
MAX_IO_SIZE = 1024 * 1024
# If the writer falls this far behind its schedule (slow server, pause), it rebases the
# schedule instead of bursting to catch up: the target rate is an average, not a debt.
_MAX_LAG_S = 0.25


class BlockHeader(NamedTuple):
    version: int
    disk: int
    tag: str
    seq: int
    offset: int
    time_ns: int


class BlockError(ValueError):
    """A 4 KiB block that starts with the workload magic but is not a valid workload block."""


class LogRecord(NamedTuple):
    seq: int
    disk: int
    offset: int
    mono_ns: int


@dataclass(frozen=True)
class LogHeader:
    seed: int
    machine_tag: str
    disks: list[tuple[str, int, int]]  # (name, region start, region end) in disk-index order
    block_size: int = BLOCK_SIZE
    record_size: int = RECORD_SIZE
    io_size: int = DEFAULT_IO_SIZE  # bytes per write (and per log record)


@dataclass(frozen=True)
class WorkloadStats:
    writes: int  # completed writes the log records (lags by at most the flush interval)
    bytes: int  # writes * io_size
    last_seq: int


def payload(seed: int, seq: int, part: int = 0) -> bytes:
    """The payload of block ``part`` (0 for the first) of write ``seq`` of the workload with
    ``seed``: consecutive pieces of one BLAKE3 output stream, so the blocks of a large write
    are all different (and as incompressible as a guest's real data), and a 4 KiB write's
    single block has the same payload it always had."""
    return blake3.blake3(struct.pack("<QQ", seed & (2**64 - 1), seq), key=_PAYLOAD_KEY).digest(
        length=PAYLOAD_LEN, seek=part * PAYLOAD_LEN
    )


def _encode_tag(tag: str) -> bytes:
    raw = tag.encode()
    if not raw or len(raw) > TAG_LEN:
        raise OutOfRange(field="machine_tag", value=repr(tag), allowed=f"1 to {TAG_LEN} UTF-8 bytes")
    return raw.ljust(TAG_LEN, b"\0")


def make_block(seed: int, tag: str, disk: int, seq: int, offset: int, time_ns: int, part: int = 0) -> bytes:
    """One self-describing workload block, the ``part``-th of its write (see the module
    docstring for the layout)."""
    return _block(_encode_tag(tag), disk, seq, offset, time_ns, payload(seed, seq, part))


def make_write(seed: int, tag: str, disk: int, seq: int, offset: int, io_size: int, time_ns: int) -> bytes:
    """The ``io_size`` bytes of write ``seq`` at ``offset``: consecutive blocks, one seq."""
    raw_tag = _encode_tag(tag)
    return b"".join(
        _block(raw_tag, disk, seq, offset + i, time_ns, payload(seed, seq, i // BLOCK_SIZE))
        for i in range(0, io_size, BLOCK_SIZE)
    )


def _block(raw_tag: bytes, disk: int, seq: int, offset: int, time_ns: int, body: bytes) -> bytes:
    head = _BLOCK_HEADER.pack(
        BLOCK_MAGIC, BLOCK_VERSION, disk, BLOCK_SIZE, raw_tag, seq, offset, time_ns, _ZERO_CHECKSUM
    )
    checksum = blake3.blake3(head + body).digest(length=CHECKSUM_LEN)
    return head[:CHECKSUM_OFFSET] + checksum + body


def check_io_size(io_size: int) -> int:
    """``io_size`` if it is a multiple of 4 KiB from 4 KiB to 1 MiB, else :class:`OutOfRange`."""
    if (
        isinstance(io_size, bool)
        or not isinstance(io_size, int)
        or not (BLOCK_SIZE <= io_size <= MAX_IO_SIZE and io_size % BLOCK_SIZE == 0)
    ):
        raise OutOfRange(
            field="io_size",
            value=repr(io_size),
            allowed=f"a multiple of {BLOCK_SIZE} bytes from {BLOCK_SIZE} (4 KiB) to {MAX_IO_SIZE} "
            "(1 MiB), e.g. 4096, 16384, 65536",
        )
    return io_size


def io_slots(start: int, end: int, io_size: int) -> tuple[int, int]:
    """``(first, count)``: the io_size-aligned slots ``first + k * io_size`` inside [start, end)."""
    first = -(-start // io_size) * io_size
    return first, max(0, (end - first) // io_size)


def decode_block(block: bytes | memoryview) -> BlockHeader:
    """Check a block that starts with the magic: version, size and checksum; return its header.

    Raises :class:`BlockError` naming what is wrong (a torn or corrupted write).
    """
    if len(block) != BLOCK_SIZE:
        raise BlockError(f"block is {len(block)} bytes, not {BLOCK_SIZE}")
    magic, version, disk, size, tag, seq, offset, time_ns, checksum = _BLOCK_HEADER.unpack_from(block)
    if magic != BLOCK_MAGIC:
        raise BlockError("no workload magic")
    if version != BLOCK_VERSION or size != BLOCK_SIZE:
        raise BlockError(f"unknown block format version {version} / block size {size}")
    h = blake3.blake3()
    h.update(block[:CHECKSUM_OFFSET])
    h.update(_ZERO_CHECKSUM)
    h.update(block[PAYLOAD_OFFSET:])
    if h.digest(length=CHECKSUM_LEN) != checksum:
        raise BlockError(f"checksum mismatch (torn or corrupt write; header says seq {seq})")
    return BlockHeader(version, disk, tag.rstrip(b"\0").decode(errors="replace"), seq, offset, time_ns)


def encode_log_header(header: LogHeader) -> bytes:
    doc = {
        "seed": header.seed,
        "machine_tag": header.machine_tag,
        "block_size": header.block_size,
        "record_size": header.record_size,
        "io_size": header.io_size,
        "disks": [{"name": n, "start": s, "end": e} for n, s, e in header.disks],
    }
    body = json.dumps(doc, separators=(",", ":")).encode()
    out = _LOG_PREFIX.pack(LOG_MAGIC, LOG_VERSION, len(body)) + body
    if len(out) > LOG_HEADER_SIZE:
        raise InvalidInput(
            f"workload log header is {len(out)} bytes, more than {LOG_HEADER_SIZE}; use fewer disks."
        )
    return out.ljust(LOG_HEADER_SIZE, b"\0")


def read_log(path: Path) -> tuple[LogHeader, list[LogRecord]]:
    """The workload log's header and its complete records (a torn last record is dropped)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read workload log {path}: {err}") from err
    if len(data) < LOG_HEADER_SIZE:
        raise InvalidInput(f"workload log {path} is {len(data)} bytes, shorter than its header.")
    magic, version, n = _LOG_PREFIX.unpack_from(data)
    if magic != LOG_MAGIC or version != LOG_VERSION:
        raise InvalidInput(f"{path} is not a workload log of version {LOG_VERSION}.")
    doc = json.loads(data[_LOG_PREFIX.size : _LOG_PREFIX.size + n])
    header = LogHeader(
        seed=int(doc["seed"]),
        machine_tag=str(doc["machine_tag"]),
        disks=[(str(d["name"]), int(d["start"]), int(d["end"])) for d in doc["disks"]],
        block_size=int(doc["block_size"]),
        record_size=int(doc["record_size"]),
        io_size=int(doc.get("io_size", DEFAULT_IO_SIZE)),  # absent: a log from before io_size
    )
    try:
        check_io_size(header.io_size)
    except OutOfRange as err:
        raise InvalidInput(f"workload log {path} is damaged: its header's {err}") from None
    end = LOG_HEADER_SIZE + (len(data) - LOG_HEADER_SIZE) // RECORD_SIZE * RECORD_SIZE
    records = [LogRecord(*r) for r in _RECORD.iter_unpack(memoryview(data)[LOG_HEADER_SIZE:end])]
    return header, records


def _check_region(name: str, region: tuple[int, int], io_size: int = DEFAULT_IO_SIZE) -> tuple[int, int]:
    start, end = int(region[0]), int(region[1])
    end -= end % BLOCK_SIZE
    if start < 0 or start % BLOCK_SIZE or end <= start or io_slots(start, end, io_size)[1] < 1:
        raise OutOfRange(
            field=f"workload region of disk {name!r}",
            value=f"[{region[0]}, {region[1]})",
            allowed=f"a {BLOCK_SIZE}-aligned start and room for at least one {io_size}-aligned "
            f"{io_size}-byte write",
        )
    return start, end


# ---------------------------------------------------------------------------------------------
# The writer process
# ---------------------------------------------------------------------------------------------


class _Flags:
    stop = False
    pause = False


def _writer(
    nbd_socket: str,
    disks: list[tuple[str, int, int]],
    log_path: str,
    rate: float,
    seed: int,
    tag: str,
    flush_interval_s: float,
    io_size: int,
) -> int:
    import nbd  # Debian's python3-libnbd; imported here so the parent process need not load it

    flags = _Flags()

    def on_stop(_sig: int, _frame: FrameType | None) -> None:
        flags.stop = True

    def on_pause(_sig: int, _frame: FrameType | None) -> None:
        flags.pause = True

    def on_resume(_sig: int, _frame: FrameType | None) -> None:
        flags.pause = False

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_pause)
    signal.signal(signal.SIGUSR2, on_resume)
    parent = os.getppid()

    handles = []
    for name, _start, _end in disks:
        h = nbd.NBD()
        h.set_export_name(name)
        try:
            h.connect_unix(nbd_socket)
        except nbd.Error as err:
            print(f"cannot connect to NBD export {name!r} on {nbd_socket}: {err}", file=sys.stderr)
            return 3
        if h.is_read_only():
            print(f"NBD export {name!r} on {nbd_socket} is read-only; serve it writable.", file=sys.stderr)
            return 3
        handles.append(h)

    header = LogHeader(seed=seed, machine_tag=tag, disks=disks, io_size=io_size)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(log_fd, encode_log_header(header))
    os.fsync(log_fd)
    pending = bytearray()

    def flush_log(sync: bool) -> None:
        if pending:
            os.write(log_fd, pending)
            pending.clear()
        if sync:
            os.fsync(log_fd)

    def say(word: str) -> None:
        sys.stdout.write(word + "\n")
        sys.stdout.flush()

    rng = random.Random(seed)
    slots = [io_slots(start, end, io_size) for _n, start, end in disks]
    interval = io_size / rate
    seq = 0
    say("ready")
    t0 = time.monotonic()
    n = 0
    last_flush = t0
    try:
        while not flags.stop:
            if flags.pause:
                for h in handles:
                    h.flush()
                flush_log(sync=True)
                say(f"paused {seq}")
                while flags.pause and not flags.stop:
                    time.sleep(0.01)
                    if os.getppid() != parent:
                        flags.stop = True
                if flags.stop:
                    break
                say("resumed")
                t0, n = time.monotonic(), 0
                continue
            now = time.monotonic()
            due = t0 + n * interval
            if due > now:
                time.sleep(due - now)
                if flags.stop or flags.pause:
                    continue
            elif now - due > _MAX_LAG_S:
                t0, n = now, 0
            disk = rng.randrange(len(handles))
            first, count = slots[disk]
            offset = first + rng.randrange(count) * io_size
            seq += 1
            # ONE request for the whole write: a point-in-time view holds all of it or none
            handles[disk].pwrite(make_write(seed, tag, disk, seq, offset, io_size, time.time_ns()), offset)
            pending += _RECORD.pack(seq, disk, offset, time.monotonic_ns())
            n += 1
            now = time.monotonic()
            if now - last_flush >= flush_interval_s:
                flush_log(sync=False)
                last_flush = now
                if os.getppid() != parent:
                    flags.stop = True  # orphaned: the parent died without stopping us
        for h in handles:
            h.flush()
        flush_log(sync=True)
        say(f"stopped {seq}")
    finally:
        flush_log(sync=False)
        os.close(log_fd)
        for h in handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m siterecovery.demo.workload", description="demo workload")
    p.add_argument("--nbd", required=True, help="NBD unix socket")
    p.add_argument("--disk", action="append", required=True, help="NAME:START:END, repeated; order = index")
    p.add_argument("--log", required=True)
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="bytes per second")
    p.add_argument(
        "--io-size",
        type=int,
        default=DEFAULT_IO_SIZE,
        help=f"bytes per write: a multiple of {BLOCK_SIZE} from {BLOCK_SIZE} to {MAX_IO_SIZE}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="demo")
    p.add_argument("--flush-interval", type=float, default=0.2)
    a = p.parse_args(argv)
    try:
        io_size = check_io_size(a.io_size)
        disks = []
        for spec in a.disk:
            name, start, end = spec.rsplit(":", 2)
            disks.append((name, *_check_region(name, (int(start), int(end)), io_size)))
    except OutOfRange as err:
        p.error(str(err))
    return _writer(a.nbd, disks, a.log, a.rate, a.seed, a.tag, a.flush_interval, io_size)


# ---------------------------------------------------------------------------------------------
# The parent-side handle
# ---------------------------------------------------------------------------------------------


class Workload:
    """Controls one workload writer process for one machine.

    ``disks`` maps each NBD export name (the disk name) to its workload region ``(start, end)``;
    the dict's order gives the disk indexes. ``io_size`` is the size of one write in bytes (a
    multiple of 4096 from 4096 to 1 MiB). Use as a context manager to stop on exit.
    """

    def __init__(
        self,
        nbd_socket: Path | str,
        disks: dict[str, tuple[int, int]],
        log_path: Path | str,
        rate_bytes_s: float = DEFAULT_RATE,
        seed: int = 0,
        machine_tag: str = "demo",
        *,
        flush_interval_s: float = 0.2,
        io_size: int = DEFAULT_IO_SIZE,
    ) -> None:
        check_io_size(io_size)
        if not disks:
            raise InvalidInput("a workload needs at least one disk; give {export name: (start, end)}.")
        if not rate_bytes_s > 0:
            raise OutOfRange(field="rate_bytes_s", value=rate_bytes_s, allowed="a positive number of bytes/s")
        if not 0 < flush_interval_s <= 0.5:
            raise OutOfRange(field="flush_interval_s", value=flush_interval_s, allowed="(0, 0.5] seconds")
        _encode_tag(machine_tag)
        self.nbd_socket = Path(nbd_socket)
        self.disks = {name: _check_region(name, region, io_size) for name, region in disks.items()}
        self.log_path = Path(log_path)
        self.rate_bytes_s = rate_bytes_s
        self.seed = seed
        self.machine_tag = machine_tag
        self.flush_interval_s = flush_interval_s
        self.io_size = io_size
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._lines = bytearray()
        self._killed = False
        self.paused = False

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "siterecovery.demo.workload",
            "--nbd",
            str(self.nbd_socket),
            "--log",
            str(self.log_path),
            "--rate",
            repr(float(self.rate_bytes_s)),
            "--seed",
            str(self.seed),
            "--tag",
            self.machine_tag,
            "--flush-interval",
            repr(self.flush_interval_s),
            "--io-size",
            str(self.io_size),
        ]
        for name, (start, end) in self.disks.items():
            cmd += ["--disk", f"{name}:{start}:{end}"]
        return cmd

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the writer; returns once it is connected to every disk and has begun writing."""
        if self._proc is not None:
            raise InvalidInput("this workload was started already; make a new Workload to run again.")
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the writer
        self._proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )
        self._expect("ready", timeout_s)

    def pause(self, timeout_s: float = 10.0) -> int:
        """Stop writing after the current write, flush disks and log; returns the last seq."""
        self._signal(signal.SIGUSR1)
        line = self._expect("paused", timeout_s)
        self.paused = True
        return int(line.split()[1])

    def resume(self, timeout_s: float = 10.0) -> None:
        self._signal(signal.SIGUSR2)
        self._expect("resumed", timeout_s)
        self.paused = False

    def stop(self, timeout_s: float = 10.0) -> WorkloadStats:
        """Stop cleanly: the current write completes, disks and log are flushed. Idempotent."""
        proc = self._proc
        if proc is None:
            raise InvalidInput("the workload was never started; call start() first.")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise SourceError(
                    f"the workload writer did not stop within {timeout_s} s and was killed; "
                    "its last writes may be missing from the log."
                ) from None
        self._check_exit()
        return self.stats()

    def kill(self) -> None:
        """Kill the writer without letting it flush (simulates a crashed guest)."""
        if self._proc is not None and self._proc.poll() is None:
            self._killed = True
            self._proc.kill()
            self._proc.wait()

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stats(self) -> WorkloadStats:
        """Writes recorded in the log so far (lags the writer by at most the flush interval)."""
        try:
            size = self.log_path.stat().st_size
        except FileNotFoundError:
            return WorkloadStats(0, 0, 0)
        count = max(0, size - LOG_HEADER_SIZE) // RECORD_SIZE
        last = 0
        if count:
            with open(self.log_path, "rb") as f:
                f.seek(LOG_HEADER_SIZE + (count - 1) * RECORD_SIZE)
                last = _RECORD.unpack(f.read(RECORD_SIZE))[0]
        return WorkloadStats(writes=count, bytes=count * self.io_size, last_seq=last)

    def run_for(self, seconds: float) -> WorkloadStats:
        """Start (unless running), write for ``seconds``, stop cleanly; returns the stats."""
        if self._proc is None:
            self.start()
        time.sleep(seconds)
        return self.stop()

    def __enter__(self) -> Workload:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.is_alive():
            self.stop()
        if self._stderr is not None:
            self._stderr.close()

    def _signal(self, sig: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._check_exit()
            raise SourceError("the workload writer is not running; start() it first.")
        self._proc.send_signal(sig)

    def _expect(self, word: str, timeout_s: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\n" in self._lines:
                line, _, rest = bytes(self._lines).partition(b"\n")
                self._lines[:] = rest
                text = line.decode()
                if text.split()[0] == word:
                    return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceError(f"the workload writer did not report {word!r} within {timeout_s} s.")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 4096)
                if not data:
                    self._proc.wait()
                    self._check_exit()
                    raise SourceError(f"the workload writer exited before reporting {word!r}.")
                self._lines += data

    def _check_exit(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode in (None, 0) or self._killed:
            return
        err = ""
        if self._stderr is not None and not self._stderr.closed:
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace").strip()
        raise SourceError(
            f"the workload writer exited with status {proc.returncode}: {err or 'no message'}. "
            f"Check that {self.nbd_socket} serves the exports {list(self.disks)} writable."
        )


if __name__ == "__main__":
    sys.exit(main())
