"""Machine control, in-place writers and image writers against a real qemu-storage-daemon and
real files: stopping and resuming a machine's writes, crash safety of the stop record, in-place
resync through the machine's own block layer, materialization back through QEMU."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from siterecovery.adapters.compute.image import open_image_writer, serve_image
from siterecovery.adapters.compute.qemu import STOPPED_RECORD, QemuMachineControl, _nbd_catalog
from siterecovery.adapters.compute.raw import RawFileWriter
from siterecovery.adapters.sources import nbd as nbdio
from siterecovery.adapters.sources.qemu import QemuSource
from siterecovery.adapters.sources.qemu_daemon import MachineDaemon, create_qcow2
from siterecovery.adapters.sources.qmp import QmpClient
from siterecovery.dataplane.chunk_codec import CHUNK_SIZE
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.materialize import materialize_disk
from siterecovery.dataplane.resync import sync_disk_to_point
from siterecovery.errors import InvalidInput, NotFound, SourceError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon"),
]

MiB = 1024 * 1024
K64 = 65536
DISK_SIZE = 32 * MiB
NODES = {"disk0": "disk0", "disk1": "disk1"}


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="sr-m-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(base_dir: Path) -> Iterator[MachineDaemon]:
    disks = {name: create_qcow2(base_dir / f"{name}.qcow2", DISK_SIZE) for name in NODES}
    d = MachineDaemon.start(base_dir / "run", disks)
    yield d
    try:
        d.stop(timeout=5)
    finally:
        d.kill()


@pytest.fixture
def control(daemon: MachineDaemon, base_dir: Path) -> QemuMachineControl:
    return QemuMachineControl(daemon.qmp_socket, NODES, base_dir / "ctl")


def _write(socket: str, export: str, offset: int, data: bytes) -> None:
    h = nbdio.connect(socket, export)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        nbdio.close_handle(h)


def _read(socket: str, export: str, offset: int, length: int) -> bytes:
    h = nbdio.connect(socket, export)
    try:
        return bytes(h.pread(length, offset))
    finally:
        nbdio.close_handle(h)


def _exports(daemon: MachineDaemon) -> dict[str, str]:
    with QmpClient(daemon.qmp_socket) as qmp:
        return {e["id"]: e["node-name"] for e in qmp.execute("query-block-exports")}


def _record(base_dir: Path) -> dict:
    return json.loads((base_dir / "ctl" / STOPPED_RECORD).read_text())


def _store_image(ds: Datastore, image: bytes) -> IndexRef:
    w = ds.index_writer(len(image))
    for no in range(-(-len(image) // CHUNK_SIZE)):
        chunk_id, _ = ds.store_chunk(image[no * CHUNK_SIZE : (no + 1) * CHUNK_SIZE])
        w.set(no, chunk_id)
    return w.commit()


def _point_image(size: int, seed: int) -> bytes:
    """Every third chunk random, the others zero."""
    rnd = random.Random(seed)
    img = bytearray(size)
    for no in range(0, size // CHUNK_SIZE, 3):
        img[no * CHUNK_SIZE : (no + 1) * CHUNK_SIZE] = rnd.randbytes(CHUNK_SIZE)
    return bytes(img)


# -- stopping and resuming ----------------------------------------------------------------------


def test_stop_writes_cuts_clients_and_resume_brings_the_same_exports_back(
    control: QemuMachineControl, daemon: MachineDaemon, base_dir: Path
) -> None:
    assert control.kind() == "storage-daemon"
    assert control.is_reachable()
    assert not control.writes_stopped()
    _write(daemon.nbd_socket, "disk0", 0, b"before" * 100)
    connected = nbdio.connect(daemon.nbd_socket, "disk1")  # a client that stays connected

    control.stop_writes()

    assert control.writes_stopped()
    with pytest.raises(nbd.Error):
        connected.pwrite(b"x" * 512, 0)
    nbdio.close_handle(connected)
    with pytest.raises(SourceError):
        _write(daemon.nbd_socket, "disk0", 0, b"after")
    record = _record(base_dir)
    assert record["kind"] == "storage-daemon"
    assert {e["settings"]["name"] for e in record["exports"]} == {"disk0", "disk1"}
    assert {e["recovered_by"] for e in record["exports"]} == {"nbd-listing"}

    control.resume_writes()

    assert not control.writes_stopped()
    assert not (base_dir / "ctl" / STOPPED_RECORD).exists()
    assert _exports(daemon) == {"export-disk0": "disk0", "export-disk1": "disk1"}
    assert _read(daemon.nbd_socket, "disk0", 0, 600) == b"before" * 100
    _write(daemon.nbd_socket, "disk1", K64, b"works again")
    assert _read(daemon.nbd_socket, "disk1", K64, 11) == b"works again"


def test_stop_and_resume_twice_are_no_ops(control: QemuMachineControl, daemon: MachineDaemon) -> None:
    control.stop_writes()
    control.stop_writes()
    assert control.writes_stopped()
    control.resume_writes()
    control.resume_writes()
    assert _exports(daemon) == {"export-disk0": "disk0", "export-disk1": "disk1"}
    _write(daemon.nbd_socket, "disk0", 0, b"ok")


def test_crash_between_delete_and_record_is_recovered(
    control: QemuMachineControl, daemon: MachineDaemon, base_dir: Path
) -> None:
    # As if the process died after deleting export-disk1 but before recording its name: the
    # record holds the listing from before, the export is gone.
    catalog = _nbd_catalog(daemon.nbd_socket)
    assert catalog is not None
    record = {
        "version": 1,
        "kind": "storage-daemon",
        "stopped_at": 0.0,
        "exports": [
            {
                "id": "export-disk1",
                "type": "nbd",
                "disk": "disk1",
                "disk_node": "disk1",
                "node": "disk1",
                "candidates": catalog,
                "settings": None,
                "recovered_by": None,
            }
        ],
    }
    (base_dir / "ctl").mkdir()
    (base_dir / "ctl" / STOPPED_RECORD).write_text(json.dumps(record))
    with QmpClient(daemon.qmp_socket) as qmp:
        qmp.execute("block-export-del", id="export-disk1", mode="hard")

    control.stop_writes()  # called again after the crash

    entries = {e["id"]: e for e in _record(base_dir)["exports"]}
    assert set(entries) == {"export-disk0", "export-disk1"}
    assert entries["export-disk1"]["settings"]["name"] == "disk1"
    assert entries["export-disk1"]["recovered_by"] == "nbd-listing"
    control.resume_writes()
    assert _exports(daemon) == {"export-disk0": "disk0", "export-disk1": "disk1"}


def test_export_settings_are_recovered_from_the_nbd_server(
    control: QemuMachineControl, daemon: MachineDaemon
) -> None:
    with QmpClient(daemon.qmp_socket) as qmp:
        qmp.execute("block-dirty-bitmap-add", node="disk1", name="guest-bm", disabled=True)
        qmp.execute(
            "block-export-add",
            type="nbd",
            id="extra",
            node_name="disk1",
            name="reporting",
            description="read-only view",
            writable=False,
            bitmaps=["guest-bm"],
            **{"allocation-depth": True},
        )
    before = _nbd_catalog(daemon.nbd_socket)
    control.stop_writes()
    assert _nbd_catalog(daemon.nbd_socket) == {}
    control.resume_writes()
    assert _nbd_catalog(daemon.nbd_socket) == before
    assert before is not None and before["reporting"] == {
        "name": "reporting",
        "description": "read-only view",
        "writable": False,
        "bitmaps": ["guest-bm"],
        "allocation_depth": True,
    }
    assert _exports(daemon)["extra"] == "disk1"


def test_without_a_known_nbd_server_the_inventory_name_is_used(daemon: MachineDaemon, base_dir: Path) -> None:
    # A QMP socket outside the daemon's run directory: daemon.json is not found.
    link = base_dir / "q.sock"
    link.symlink_to(daemon.qmp_socket)
    ctl = QemuMachineControl(str(link), NODES, base_dir / "ctl")
    assert ctl.nbd_socket is None
    ctl.stop_writes()
    assert {e["recovered_by"] for e in _record(base_dir)["exports"]} == {"inventory-name"}
    ctl.resume_writes()
    _write(daemon.nbd_socket, "disk0", 0, b"named by the inventory")


def test_exports_on_a_snapshot_filter_are_stopped_and_come_back_on_it(
    control: QemuMachineControl, daemon: MachineDaemon, base_dir: Path
) -> None:
    _write(daemon.nbd_socket, "disk0", 0, b"A" * K64)
    source = QemuSource(daemon.qmp_socket, NODES, base_dir / "work")
    try:
        with source.snapshot(["disk0"]) as snap:
            # The guest's export now sits on the copy-before-write filter, not on disk0.
            assert _exports(daemon)["export-disk0"].startswith("#")
            control.stop_writes()
            assert control.writes_stopped()
            with pytest.raises(SourceError):
                _write(daemon.nbd_socket, "disk0", 0, b"B" * K64)
            control.resume_writes()
            assert _exports(daemon)["export-disk0"].startswith("#")
            # Guest writes pass the filter again: the view keeps the old data.
            _write(daemon.nbd_socket, "disk0", 0, b"C" * K64)
            assert snap.disks["disk0"].read(0, K64) == b"A" * K64
            snap.commit()
    finally:
        source.close()
    assert _exports(daemon)["export-disk0"] == "disk0"
    assert _read(daemon.nbd_socket, "disk0", 0, 4) == b"CCCC"


# -- in-place writers ---------------------------------------------------------------------------


def test_open_writer_is_refused_while_writes_are_not_stopped(
    control: QemuMachineControl, daemon: MachineDaemon
) -> None:
    with pytest.raises(SourceError, match="stop_writes"), control.open_writer("disk0"):
        pass
    control.stop_writes()
    with pytest.raises(NotFound), control.open_writer("nope"):
        pass
    control.resume_writes()
    assert [i for i in _exports(daemon) if i.startswith("srw-")] == []


def test_resync_through_the_machine_makes_its_disk_equal_to_the_point(
    control: QemuMachineControl, daemon: MachineDaemon, base_dir: Path
) -> None:
    ds = Datastore.open_local(base_dir / "ds", VaultKey.generate(), create=True)
    point = _point_image(DISK_SIZE, 1)
    ref = _store_image(ds, point)
    # The machine's disk: mostly the point, with some chunks changed and extra data written
    # where the point has zeros.
    current = bytearray(point)
    for no in (0, 7, 100, 101, 300):
        current[no * K64 : no * K64 + 100] = os.urandom(100)
    current[2 * K64 : 3 * K64] = b"\x01" * K64
    _write(daemon.nbd_socket, "disk0", 0, bytes(current))
    differing = {
        no
        for no in range(DISK_SIZE // K64)
        if current[no * K64 : (no + 1) * K64] != point[no * K64 : (no + 1) * K64]
    }

    control.stop_writes()
    with control.open_writer("disk0") as writer:
        assert writer.size == DISK_SIZE
        stats = sync_disk_to_point(ds, ref, writer, threads=2)
    control.resume_writes()

    assert stats.chunks_sent + stats.chunks_zeroed == len(differing)
    assert stats.bytes_compared == DISK_SIZE
    assert _read(daemon.nbd_socket, "disk0", 0, DISK_SIZE) == point
    assert [i for i in _exports(daemon) if i.startswith("srw-")] == []
    # A second pass finds nothing to do.
    control.stop_writes()
    with control.open_writer("disk0") as writer:
        again = sync_disk_to_point(ds, ref, writer)
    control.resume_writes()
    assert (again.bytes_sent, again.bytes_zeroed) == (0, 0)


def test_writer_uses_its_own_nbd_server_when_none_is_known(daemon: MachineDaemon, base_dir: Path) -> None:
    link = base_dir / "q.sock"
    link.symlink_to(daemon.qmp_socket)
    ctl = QemuMachineControl(str(link), NODES, base_dir / "ctl", nbd_socket=None)
    ctl.stop_writes()  # the daemon's exports go (its server keeps running)
    with QmpClient(daemon.qmp_socket) as qmp:
        qmp.execute("nbd-server-stop")  # now the machine has no NBD server at all
    with ctl.open_writer("disk1") as writer:
        writer.write(b"own server", 0)
        writer.flush()
        assert writer.read(0, 10) == b"own server"
    # The server it started is stopped with its last writer.
    assert not _server_running(daemon)


def _server_running(daemon: MachineDaemon) -> bool:
    # nbd-server-stop fails when no server runs (and stops one that does).
    with QmpClient(daemon.qmp_socket) as qmp:
        try:
            qmp.execute("nbd-server-stop")
        except SourceError:
            return False
        return True


def test_power_off(control: QemuMachineControl, daemon: MachineDaemon) -> None:
    assert control.power_off() is True
    assert not control.is_reachable()
    # The monitor closes before the process has finished exiting: give it a moment.
    deadline = time.monotonic() + 10
    while daemon.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon.is_running()


# -- image writers ------------------------------------------------------------------------------


def test_materialize_qcow2_and_raw_read_back_equal(base_dir: Path) -> None:
    ds = Datastore.open_local(base_dir / "ds", VaultKey.generate(), create=True)
    size = 8 * MiB + 4096  # a partial last chunk
    point = bytearray(_point_image(8 * MiB, 2)) + os.urandom(4096)
    ref = _store_image(ds, bytes(point))
    for fmt in ("qcow2", "raw"):
        out = base_dir / "out" / f"disk.{fmt}"
        written = materialize_disk(ds, ref, out, fmt)
        assert written == sum(len(point[o : o + K64]) for o in range(0, size, K64) if any(point[o : o + K64]))
        assert not list(out.parent.glob("*.partial"))
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(out)], capture_output=True, text=True, check=True
            ).stdout
        )
        assert info["format"] == fmt and info["virtual-size"] == size
        with serve_image(out, fmt) as (socket, export):
            assert _read(socket, export, 0, size) == bytes(point)
        # Sparse: roughly the data, not the virtual size.
        assert out.stat().st_blocks * 512 < written + 2 * MiB


def test_serve_image_refuses_an_image_a_machine_holds(daemon: MachineDaemon) -> None:
    with pytest.raises(SourceError, match="could not open"), serve_image(daemon.disks["disk0"], "qcow2"):
        pass


def test_raw_file_writer(base_dir: Path) -> None:
    path = base_dir / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
    with RawFileWriter(path) as w:
        assert w.size == 4 * MiB
        w.write(b"hello", 10)
        assert w.read(8, 9) == path.read_bytes()[8:10] + b"hello" + path.read_bytes()[15:17]
        blocks = path.stat().st_blocks
        w.write_zeroes(MiB, 2 * MiB)
        w.flush()
        assert w.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert path.stat().st_blocks < blocks  # a hole was punched
        with pytest.raises(InvalidInput):
            w.write(b"x", 4 * MiB)
        with pytest.raises(InvalidInput):
            w.read(4 * MiB - 1, 2)
    with pytest.raises(SourceError, match="closed"):
        w.read(0, 1)
    with pytest.raises(NotFound):
        RawFileWriter(base_dir / "missing.img")


def test_open_image_writer_qcow2_round_trip(base_dir: Path) -> None:
    image = create_qcow2(base_dir / "img.qcow2", 4 * MiB)
    with open_image_writer(image, "qcow2") as w:
        w.write(b"\xab" * (3 * K64), K64)
        w.write_zeroes(2 * K64, K64)
        w.flush()
        assert w.read(K64, 3 * K64) == b"\xab" * K64 + bytes(K64) + b"\xab" * K64
    with open_image_writer(image, "qcow2") as w:
        assert w.read(3 * K64, 4) == b"\xab" * 4
