"""The demo fabric end to end: real images, a real workload over NBD, the verifier's verdicts.

Disks are small (16 MiB data + 16 MiB workload region) so that the whole module runs in well
under a minute; the workload writes at 1-2 MB/s for a second or two, enough for hundreds of
writes spread over both disks (and a few overwrites).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
from pathlib import Path

import nbd
import pytest

from siterecovery.demo.fabric import BaseInfo, fill_image, load_base, serve_images, write_inventory
from siterecovery.demo.verify import (
    disk_specs,
    disk_specs_from_log,
    nbd_reader,
    qcow2_reader,
    raw_reader,
    verify_machine,
)
from siterecovery.demo.workload import (
    BLOCK_SIZE,
    LOG_HEADER_SIZE,
    BlockError,
    LogHeader,
    Workload,
    decode_block,
    encode_log_header,
    make_block,
    make_write,
    read_log,
)
from siterecovery.demo.workload import main as workload_main
from siterecovery.errors import InvalidInput, OutOfRange

MiB = 1024 * 1024
KiB64 = 64 * 1024
SIZE = 32 * MiB
DATA = 16 * MiB

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None,
    reason="needs qemu-utils and qemu-storage-daemon",
)


def make_machine(tmp_path: Path, fmt: str = "qcow2") -> tuple[dict[str, Path], dict[str, BaseInfo]]:
    images: dict[str, Path] = {}
    base: dict[str, BaseInfo] = {}
    for i, name in enumerate(["disk0", "disk1"]):
        path = tmp_path / f"web01-{name}.{fmt}"
        base[name] = fill_image(path, SIZE, DATA, seed=i, fmt=fmt)  # type: ignore[arg-type]
        images[name] = path
    return images, base


def regions(base: dict[str, BaseInfo]) -> dict[str, tuple[int, int]]:
    return {name: b.workload_region for name, b in base.items()}


def overwrite(socket: Path, disk: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.set_export_name(disk)
    h.connect_unix(str(socket))
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


# --- fabric -----------------------------------------------------------------------------------


def test_block_round_trip_and_checksum() -> None:
    block = make_block(7, "web01", 1, 42, 8 * MiB, time.time_ns())
    assert len(block) == BLOCK_SIZE
    head = decode_block(block)
    assert (head.seq, head.disk, head.offset, head.tag) == (42, 1, 8 * MiB, "web01")
    torn = block[:2048] + bytes(2048)
    with pytest.raises(BlockError, match="checksum"):
        decode_block(torn)


def test_fill_image_raw_holds_real_data_and_sidecar(tmp_path: Path) -> None:
    info = fill_image(tmp_path / "a.raw", 8 * MiB, 4 * MiB, seed=1, fmt="raw")
    assert info.real_bytes == 4 * MiB  # the host has far more than 4 MiB under /usr
    assert load_base(tmp_path / "a.raw") == info
    data = (tmp_path / "a.raw").read_bytes()
    assert len(data) == 8 * MiB
    assert data[4 * MiB :] == bytes(4 * MiB)
    assert data[: 4 * MiB].count(0) < 4 * MiB  # real, non-zero content
    again = fill_image(tmp_path / "b.raw", 8 * MiB, 4 * MiB, seed=1, fmt="raw")
    other = fill_image(tmp_path / "c.raw", 8 * MiB, 4 * MiB, seed=2, fmt="raw")
    assert again.chunks == info.chunks  # deterministic per seed
    assert other.chunks[0] != info.chunks[0]  # different seeds start elsewhere


def test_fill_image_rejects_unaligned_sizes(tmp_path: Path) -> None:
    with pytest.raises(OutOfRange, match="data_bytes"):
        fill_image(tmp_path / "x.raw", 8 * MiB, 9 * MiB, seed=0, fmt="raw")
    with pytest.raises(OutOfRange, match="size"):
        fill_image(tmp_path / "x.raw", 8 * MiB + 1, 0, seed=0, fmt="raw")


def test_write_inventory_round_trips(tmp_path: Path) -> None:
    machine = {
        "name": "web01",
        "os": "linux",
        "cpus": 2,
        "memory_mib": 2048,
        "qmp": tmp_path / "run" / "qmp.sock",
        "hooks": {"freeze": "/bin/true", "thaw": "/bin/true", "timeout_s": 30},
        "disk": [{"name": "disk0", "node": "disk0", "path": tmp_path / "d0.qcow2"}],
        "nic": [{"name": "nic0", "mac": "52:54:00:12:34:56", "ip": "10.10.0.11", "network": "prod"}],
    }
    write_inventory(tmp_path / "inv.toml", [machine])
    doc = tomllib.loads((tmp_path / "inv.toml").read_text())
    (m,) = doc["machine"]
    assert m["name"] == "web01" and m["hooks"]["timeout_s"] == 30
    assert m["disk"][0]["path"] == str(tmp_path / "d0.qcow2")
    assert m["qmp"] == str(tmp_path / "run" / "qmp.sock")
    assert m["nic"][0]["network"] == "prod"
    with pytest.raises(InvalidInput, match="twice"):
        write_inventory(tmp_path / "bad.toml", [machine, machine])


@pytest.mark.integration
@needs_qemu
def test_fill_image_qcow2_leaves_workload_region_unallocated(tmp_path: Path) -> None:
    images, base = make_machine(tmp_path)
    with qcow2_reader(images) as r:
        assert r.size("disk0") == SIZE
        assert r.allocated("disk0", DATA, SIZE - DATA) == []
        result = verify_machine(r, disk_specs(regions(base)), _empty_log(tmp_path, base), base)
    assert result.ok, result.problems
    assert result.max_seq == 0


def _empty_log(tmp_path: Path, base: dict[str, BaseInfo]) -> Path:
    """The log of a workload that wrote nothing yet (just its header)."""
    log = tmp_path / "empty.wlog"
    disks = [(name, *b.workload_region) for name, b in base.items()]
    log.write_bytes(encode_log_header(LogHeader(seed=0, machine_tag="demo", disks=disks)))
    return log


# --- workload + verifier ----------------------------------------------------------------------


@pytest.mark.integration
@needs_qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_workload_then_verify_live_and_stopped_disks(tmp_path: Path, fmt: str) -> None:
    images, base = make_machine(tmp_path, fmt)
    log = tmp_path / "web01.wlog"
    with serve_images(images, writable=True, fmt=fmt) as srv:  # type: ignore[arg-type]
        w = Workload(srv.socket, regions(base), log, rate_bytes_s=2_000_000, seed=11, machine_tag="web01")
        stats = w.run_for(1.5)
        assert not w.is_alive()
        assert stats.writes > 300 and stats.last_seq == stats.writes
        header, records = read_log(log)
        assert header.machine_tag == "web01" and len(records) == stats.writes
        assert {r.disk for r in records} == {0, 1}  # both disks were written
        with nbd_reader(srv.socket, list(images)) as r:
            live = verify_machine(r, disk_specs_from_log(log), log, base)
    assert live.ok, live.problems
    assert live.max_seq == stats.last_seq
    assert live.writes_checked == len({(r.disk, r.offset) for r in records})
    reader = qcow2_reader(images) if fmt == "qcow2" else raw_reader(images)
    with reader as r:
        stopped = verify_machine(r, disk_specs(regions(base)), log, base)
    assert stopped.ok, stopped.problems
    assert stopped.max_seq == stats.last_seq
    assert "ok" in stopped.detail


@pytest.mark.integration
@needs_qemu
def test_corrupt_written_block_and_base_chunk_are_reported(tmp_path: Path) -> None:
    images, base = make_machine(tmp_path)
    log = tmp_path / "web01.wlog"
    with serve_images(images, writable=True) as srv:
        Workload(srv.socket, regions(base), log, rate_bytes_s=2_000_000, seed=3).run_for(0.7)
        _, records = read_log(log)
        victim = next(r for r in records if r.disk == 1)
        with nbd_reader(srv.socket, ["disk1"]) as r:
            block = bytearray(r.read("disk1", victim.offset, BLOCK_SIZE))
        block[1000] ^= 0xFF  # one flipped byte in the payload: a corrupt write
        overwrite(srv.socket, "disk1", victim.offset, bytes(block))
        overwrite(srv.socket, "disk0", 5 * 65536 + 100, b"rot")  # bit rot in the base data
    with qcow2_reader(images) as r:
        result = verify_machine(r, disk_specs(regions(base)), log, base)
    assert not result.ok
    text = "\n".join(result.problems)
    assert f"disk1 offset {victim.offset:#x}: corrupt workload block: checksum mismatch" in text
    assert f"disk0 offset {5 * 65536:#x}: data region chunk differs" in text
    assert result.detail.startswith("NOT consistent")


@pytest.mark.integration
@needs_qemu
def test_disk_rolled_back_alone_is_not_crash_consistent(tmp_path: Path) -> None:
    images, base = make_machine(tmp_path)
    log = tmp_path / "web01.wlog"
    copies = {name: tmp_path / f"copy-{name}.qcow2" for name in images}
    with serve_images(images, writable=True) as srv:
        w = Workload(srv.socket, regions(base), log, rate_bytes_s=2_000_000, seed=5)
        w.start()
        time.sleep(0.6)
        paused_at = w.pause()  # disks flushed: the image files are a consistent point
        for name, path in images.items():
            shutil.copyfile(path, copies[name])
        w.resume()
        time.sleep(0.8)
        final = w.stop()
    assert final.last_seq > paused_at

    # Both disks copied at the same moment: a crash-consistent point at the pause.
    with qcow2_reader(copies) as r:
        both = verify_machine(r, disk_specs(regions(base)), log, base)
    assert both.ok, both.problems
    assert both.max_seq == paused_at

    # disk0 from the pause, disk1 from the end: not a prefix of the global write order.
    mixed = {"disk0": copies["disk0"], "disk1": images["disk1"]}
    with qcow2_reader(mixed) as r:
        result = verify_machine(r, disk_specs(regions(base)), log, base)
    assert not result.ok
    assert result.max_seq == final.last_seq or result.max_seq > paused_at
    assert all(p.startswith("disk0 offset ") for p in result.problems)
    assert any("found zeros" in p or "rolled back" in p for p in result.problems)


@pytest.mark.integration
@needs_qemu
def test_killed_workload_unlogged_tail_still_verifies(tmp_path: Path) -> None:
    images, base = make_machine(tmp_path)
    log = tmp_path / "web01.wlog"
    with serve_images(images, writable=True) as srv:
        w = Workload(srv.socket, regions(base), log, rate_bytes_s=4_000_000, seed=9, flush_interval_s=0.5)
        w.start()
        time.sleep(0.8)
        w.kill()  # no final log flush: the disks may hold writes the log does not list
        with nbd_reader(srv.socket, list(images)) as r:
            result = verify_machine(r, disk_specs(regions(base)), log, base)
    assert result.ok, result.problems
    assert result.max_seq >= result.last_logged_seq > 0
    assert result.unlogged <= result.max_seq - result.last_logged_seq


@pytest.mark.integration
@needs_qemu
def test_workload_reports_a_missing_export(tmp_path: Path) -> None:
    images, base = make_machine(tmp_path)
    with serve_images({"disk0": images["disk0"]}, writable=True) as srv:
        w = Workload(srv.socket, regions(base), tmp_path / "x.wlog")
        with pytest.raises(Exception, match="disk1"):
            w.start()
    assert not os.path.exists(tmp_path / "x.wlog") or read_log(tmp_path / "x.wlog")[1] == []


# --- I/O size -------------------------------------------------------------------------------


def test_make_write_is_consecutive_blocks_of_one_seq() -> None:
    data = make_write(7, "web01", 1, 42, 8 * MiB, KiB64, 123)
    assert len(data) == KiB64
    for i in range(0, KiB64, BLOCK_SIZE):
        assert data[i : i + BLOCK_SIZE] == make_block(7, "web01", 1, 42, 8 * MiB + i, 123, i // BLOCK_SIZE)
        head = decode_block(data[i : i + BLOCK_SIZE])
        assert (head.seq, head.offset) == (42, 8 * MiB + i)
    # Every block of a write has its own payload: a large write is as incompressible as real data.
    assert len({data[i + 72 : i + BLOCK_SIZE] for i in range(0, KiB64, BLOCK_SIZE)}) == KiB64 // BLOCK_SIZE


@pytest.mark.parametrize("bad", [0, 1000, 4097, 6144, 2 * MiB, -4096])
def test_invalid_io_size_is_refused(tmp_path: Path, bad: int) -> None:
    with pytest.raises(
        OutOfRange, match=r"io_size .* allowed is a multiple of 4096 bytes from 4096 .* to 1048576"
    ):
        Workload(tmp_path / "nbd.sock", {"disk0": (DATA, SIZE)}, tmp_path / "x.wlog", io_size=bad)


def test_region_without_room_for_one_write_is_refused(tmp_path: Path) -> None:
    # 96 KiB from a 64 KiB boundary + 4 KiB: no whole 64 KiB-aligned slot fits
    region = (DATA + BLOCK_SIZE, DATA + 100 * 1024)
    with pytest.raises(OutOfRange, match="room for at least one 65536-aligned 65536-byte write"):
        Workload(tmp_path / "nbd.sock", {"disk0": region}, tmp_path / "x.wlog", io_size=KiB64)
    Workload(tmp_path / "nbd.sock", {"disk0": region}, tmp_path / "x.wlog", io_size=BLOCK_SIZE)


def test_writer_cli_refuses_invalid_io_size(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--nbd", "/nonexistent", "--disk", f"disk0:{DATA}:{SIZE}", "--log", "/nonexistent/x", "--io-size"]
    with pytest.raises(SystemExit) as exc:
        workload_main([*argv, "5000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "io_size 5000 is out of range: allowed is a multiple of 4096 bytes from 4096" in err


def test_log_without_io_size_reads_as_4096(tmp_path: Path) -> None:
    """A log written before io_size existed has no such key: its writes were 4 KiB."""
    header = encode_log_header(LogHeader(seed=1, machine_tag="web01", disks=[("disk0", DATA, SIZE)]))
    n = int.from_bytes(header[12:16], "little")
    doc = json.loads(header[16 : 16 + n])
    del doc["io_size"]
    body = json.dumps(doc).encode()
    old = (header[:12] + len(body).to_bytes(4, "little") + body).ljust(LOG_HEADER_SIZE, b"\0")
    (tmp_path / "old.wlog").write_bytes(old)
    assert read_log(tmp_path / "old.wlog")[0].io_size == BLOCK_SIZE
    new = encode_log_header(
        LogHeader(seed=1, machine_tag="web01", disks=[("disk0", DATA, SIZE)], io_size=KiB64)
    )
    (tmp_path / "new.wlog").write_bytes(new)
    assert read_log(tmp_path / "new.wlog")[0].io_size == KiB64


def small_regions(base: dict[str, BaseInfo]) -> dict[str, tuple[int, int]]:
    """1 MiB per disk (16 slots of 64 KiB): a second of writing rewrites most slots."""
    return {name: (b.workload_region[0], b.workload_region[0] + MiB) for name, b in base.items()}


@pytest.mark.integration
@needs_qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_64k_workload_then_verify_live_and_stopped_disks(tmp_path: Path, fmt: str) -> None:
    images, base = make_machine(tmp_path, fmt)
    log = tmp_path / "web01.wlog"
    with serve_images(images, writable=True, fmt=fmt) as srv:  # type: ignore[arg-type]
        w = Workload(
            srv.socket,
            regions(base),
            log,
            rate_bytes_s=4_000_000,
            seed=11,
            machine_tag="web01",
            io_size=KiB64,
        )
        stats = w.run_for(1.5)
        assert stats.writes > 40 and stats.last_seq == stats.writes
        assert stats.bytes == stats.writes * KiB64
        header, records = read_log(log)
        assert header.io_size == KiB64 and len(records) == stats.writes
        assert {r.disk for r in records} == {0, 1}
        assert all(r.offset % KiB64 == 0 and DATA <= r.offset <= SIZE - KiB64 for r in records)
        with nbd_reader(srv.socket, list(images)) as r:
            last = records[-1]  # nothing overwrote the last write: all of its blocks are there
            data = r.read(f"disk{last.disk}", last.offset, KiB64)
            heads = [decode_block(data[i : i + BLOCK_SIZE]) for i in range(0, KiB64, BLOCK_SIZE)]
            assert {h.seq for h in heads} == {last.seq}
            assert [h.offset for h in heads] == list(range(last.offset, last.offset + KiB64, BLOCK_SIZE))
            live = verify_machine(r, disk_specs_from_log(log), log, base)
    assert live.ok, live.problems
    assert live.max_seq == stats.last_seq
    assert live.writes_checked == len({(r.disk, r.offset) for r in records})
    assert "of 64 KiB" in live.detail
    reader = qcow2_reader(images) if fmt == "qcow2" else raw_reader(images)
    with reader as r:
        stopped = verify_machine(r, disk_specs(regions(base)), log, base)
    assert stopped.ok, stopped.problems
    assert stopped.max_seq == stats.last_seq


def _run_64k(tmp_path: Path, srv_socket: Path, base: dict[str, BaseInfo], seed: int) -> Path:
    log = tmp_path / "web01.wlog"
    Workload(
        srv_socket,
        small_regions(base),
        log,
        rate_bytes_s=4_000_000,
        seed=seed,
        machine_tag="web01",
        io_size=KiB64,
    ).run_for(1.0)
    return log


@pytest.mark.integration
@needs_qemu
@pytest.mark.parametrize("torn_with", ["zeros", "previous"])
def test_torn_64k_write_is_reported(tmp_path: Path, torn_with: str) -> None:
    images, base = make_machine(tmp_path)
    with serve_images(images, writable=True) as srv:
        log = _run_64k(tmp_path, srv.socket, base, seed=21)
        header, records = read_log(log)
        latest = {(r.disk, r.offset): r for r in records}  # the write each slot holds now
        if torn_with == "zeros":
            victim = latest[(records[-1].disk, records[-1].offset)]
            assert victim.seq == records[-1].seq
            block = bytes(BLOCK_SIZE)  # the 6th block back to zeros: a write that landed only in part
            before = "zeros"
        else:
            # a slot written twice: put back the earlier write's 6th block, as if the later
            # write had landed only partly on top of it
            victim, prev = next(
                (v, p)
                for v in reversed(latest.values())
                for p in reversed(records[: v.seq - 1])
                if (p.disk, p.offset) == (v.disk, v.offset)
            )
            block = make_block(21, "web01", prev.disk, prev.seq, prev.offset + 5 * BLOCK_SIZE, 1, part=5)
            before = f"seq {prev.seq}"
        disk = f"disk{victim.disk}"
        overwrite(srv.socket, disk, victim.offset + 5 * BLOCK_SIZE, block)
        with nbd_reader(srv.socket, list(images)) as r:
            result = verify_machine(r, disk_specs(small_regions(base)), log, base)
    assert not result.ok
    assert result.problem_count == 1, result.problems
    (problem,) = result.problems
    assert problem.startswith(f"{disk} offset {victim.offset:#x}: torn write: the 65536-byte slot holds ")
    assert f"seq {victim.seq} in blocks 0-4, {before} in block 5, seq {victim.seq} in blocks 6-15" in problem


@pytest.mark.integration
@needs_qemu
def test_unlogged_64k_writes_verify_but_one_seq_twice_does_not(tmp_path: Path) -> None:
    images, base = make_machine(tmp_path)
    with serve_images(images, writable=True) as srv:
        full = _run_64k(tmp_path, srv.socket, base, seed=31)
        _, records = read_log(full)
        # What a writer killed before its last log flushes leaves: the disks hold writes the
        # log does not list (the last 5 here, each of 16 blocks).
        cut = tmp_path / "cut.wlog"
        cut.write_bytes(full.read_bytes()[: LOG_HEADER_SIZE + (len(records) - 5) * 32])
        with nbd_reader(srv.socket, list(images)) as r:
            result = verify_machine(r, disk_specs(small_regions(base)), cut, base)
        assert result.ok, result.problems
        assert result.last_logged_seq == len(records) - 5 and result.max_seq == len(records)
        latest = {(r.disk, r.offset): r.seq for r in records}
        assert result.unlogged == sum(1 for s in latest.values() if s > len(records) - 5) >= 1

        # A second, different write claiming the last seq, whole and valid, on top of a slot
        # that holds a logged write: refused.
        last = records[-1]
        slot = next(
            k for k, seq in latest.items() if seq <= len(records) - 5 and k != (last.disk, last.offset)
        )
        write = make_write(31, "web01", slot[0], last.seq, slot[1], KiB64, 1)
        overwrite(srv.socket, f"disk{slot[0]}", slot[1], write)
        with nbd_reader(srv.socket, list(images)) as r:
            result = verify_machine(r, disk_specs(small_regions(base)), cut, base)
    assert not result.ok
    assert result.problem_count == 1, result.problems
    assert f"seq {last.seq} also found at disk" in result.problems[0]
    assert "a write happens once" in result.problems[0]
