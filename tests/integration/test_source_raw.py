"""RawSource against real (sparse) files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from siterecovery.adapters.sources.raw import RawSource
from siterecovery.errors import InvalidInput, NotFound
from siterecovery.ports.source import Extent

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _sparse(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def _supports_holes(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) > 0
    except OSError:
        return False
    finally:
        os.close(fd)


def test_snapshot_is_a_live_untracked_view(tmp_path: Path) -> None:
    disk = _sparse(tmp_path / "d.raw", 4 * MiB, {0: b"x" * 10})
    source = RawSource({"disk0": disk})
    with source.snapshot(["disk0"]) as snap:
        assert snap.point_in_time is False
        assert snap.tracking == "none"
        view = snap.disks["disk0"]
        assert view.size == 4 * MiB
        assert view.changed_extents() is None
        assert view.read(0, 12) == b"x" * 10 + b"\0\0"
        # Live: a write after the snapshot is visible.
        with open(disk, "r+b") as f:
            f.write(b"y")
        assert view.read(0, 2) == b"yx"
        snap.commit()
    source.reset_tracking()
    source.close()


def test_sparse_holes_are_skipped_and_read_as_zeros(tmp_path: Path) -> None:
    size = 32 * MiB
    disk = _sparse(tmp_path / "d.raw", size, {1 * MiB: b"a" * 4096, 20 * MiB: b"b" * (2 * MiB)})
    if not _supports_holes(disk):
        pytest.skip("filesystem of tmp_path has no SEEK_DATA holes")
    snap = RawSource({"disk0": disk}).snapshot(["disk0"])
    view = snap.disks["disk0"]
    extents = list(view.allocated_extents())
    assert sum(e.length for e in extents) < 4 * MiB
    covered = [(e.offset, e.end) for e in extents]
    assert any(s <= 1 * MiB and 1 * MiB + 4096 <= e for s, e in covered)
    assert any(s <= 20 * MiB and 22 * MiB <= e for s, e in covered)
    assert view.read(0, 4096) == bytes(4096)
    assert view.read(20 * MiB - 1, 2) == b"\0b"
    # A read larger than the internal piece size comes back whole.
    assert view.read(18 * MiB, 6 * MiB) == bytes(2 * MiB) + b"b" * (2 * MiB) + bytes(2 * MiB)
    snap.close()


def test_fully_sparse_and_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.raw"
    empty.touch()
    hole = _sparse(tmp_path / "hole.raw", 8 * MiB, {})
    with RawSource({"e": empty, "h": hole}).snapshot(["e", "h"]) as snap:
        assert list(snap.disks["e"].allocated_extents()) == []
        assert snap.disks["e"].read(0, 0) == b""
        if _supports_holes(_sparse(tmp_path / "probe.raw", MiB, {MiB - 1: b"x"})):
            assert list(snap.disks["h"].allocated_extents()) == []
        snap.commit()


def test_dense_file_is_one_extent(tmp_path: Path) -> None:
    disk = tmp_path / "dense.raw"
    disk.write_bytes(os.urandom(MiB))
    with RawSource({"disk0": disk}).snapshot(["disk0"]) as snap:
        assert list(snap.disks["disk0"].allocated_extents()) == [Extent(0, MiB)]
        snap.commit()


def test_bad_requests(tmp_path: Path) -> None:
    disk = _sparse(tmp_path / "d.raw", MiB, {})
    source = RawSource({"disk0": disk, "gone": tmp_path / "missing.raw"})
    with pytest.raises(NotFound, match="disk 'nope' not found"):
        source.snapshot(["nope"])
    with pytest.raises(NotFound, match="missing.raw"):
        source.snapshot(["disk0", "gone"])
    with source.snapshot(["disk0"]) as snap, pytest.raises(InvalidInput, match="outside disk"):
        snap.disks["disk0"].read(MiB - 1, 2)
    with pytest.raises(InvalidInput):
        RawSource({})


def test_read_into_equals_read_aligned_or_not(tmp_path: Path) -> None:
    """``read_into`` reads aligned requests with O_DIRECT (where the filesystem has it) and the
    rest buffered; both see what a buffered writer just wrote."""
    import mmap

    size = 3 * 65536 + 1000  # an unaligned tail
    data = os.urandom(size)
    disk = tmp_path / "d.raw"
    disk.write_bytes(data)
    view = RawSource({"disk0": disk}).snapshot(["disk0"]).disks["disk0"]
    try:
        with open(disk, "r+b") as f:  # dirty in the page cache, not yet written back
            f.seek(65536)
            f.write(b"\xab" * 4096)
        data = data[:65536] + b"\xab" * 4096 + data[65536 + 4096 :]
        buf = mmap.mmap(-1, 4 * 65536)
        for offset, length in [(0, 2 * 65536), (65536, 65536), (2 * 65536, 65536 + 1000), (100, 4000)]:
            part = memoryview(buf)[:length]
            view.read_into(offset, part)
            assert bytes(part) == data[offset : offset + length] == view.read(offset, length)
            part.release()
        with pytest.raises(InvalidInput):
            view.read_into(size - 10, memoryview(buf)[:20])
    finally:
        view.close()
