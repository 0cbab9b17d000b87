"""The demo fabric end to end: real images, a real workload over NBD, the verifier's verdicts.

Disks are small (16 MiB data + 16 MiB workload region) so that the whole module runs in well
under a minute; the workload writes at 1-2 MB/s for a second or two, enough for hundreds of
writes spread over both disks (and a few overwrites).
"""

from __future__ import annotations

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
    BlockError,
    LogHeader,
    Workload,
    decode_block,
    encode_log_header,
    make_block,
    read_log,
)
from siterecovery.errors import InvalidInput, OutOfRange

MiB = 1024 * 1024
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
