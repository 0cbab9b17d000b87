"""Replication of a raw site (plain image files, no change tracking): a later point is found by a
hash scan that sends only the chunks that changed; a live read is labelled ``fuzzy``, never
crash-consistent; a freeze hook that holds the writers for the whole read makes it
``app-consistent``, and the thaw hook runs only after the read."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from siterecovery.control.protection import list_points
from siterecovery.control.replication import take_point
from siterecovery.dataplane.materialize import materialize_disk

MIB = 1024 * 1024
CHUNK = 64 * 1024

pytestmark = pytest.mark.integration


def _change_chunks(image: Path, chunk_numbers: list[int], fill: int) -> None:
    """Overwrite whole chunks of an image file in place, as a writer on the host would."""
    fd = os.open(image, os.O_WRONLY)
    try:
        for n in chunk_numbers:
            os.pwrite(fd, os.urandom(CHUNK - 8) + bytes([fill]) * 8, n * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


def _point_disk(lab, point_id: str, disk: str, out: Path) -> bytes:
    ref = lab.vault.datastore.read_manifest(point_id).disks[disk]
    path = out / f"{point_id}-{disk}.raw"
    materialize_disk(lab.vault.datastore, ref, path, "raw")
    return path.read_bytes()


def test_raw_site_hash_scan_sends_only_changed_chunks_and_labels_points_fuzzy(lab_factory, tmp_path):
    lab = lab_factory(kind="raw", size=16 * MIB, data=4 * MIB)
    job = lab.enable("vm1")
    assert job["state"] == "Succeeded", job["error"]
    first = lab.vault.datastore.read_manifest(job["result"]["initial_point"])
    assert first.consistency == "fuzzy"

    m = lab.machines["vm1"]
    # Three chunks inside the data of disk0, one in the empty (sparse) part of disk1.
    _change_chunks(m.images["disk0"], [1, 5, 30], 1)
    _change_chunks(m.images["disk1"], [10 * MIB // CHUNK], 2)

    r = take_point(lab.vault, "vm1")
    assert r.method == "hash-scan"
    assert r.consistency == "fuzzy"
    assert r.stats.chunks_changed == 4
    assert r.stats.chunks_sent == 4
    assert r.stats.bytes_read >= 8 * MIB  # it read both disks' data to find the change

    # Nothing changed: a scan finds nothing to send.
    r2 = take_point(lab.vault, "vm1")
    assert (r2.method, r2.consistency, r2.stats.chunks_sent) == ("hash-scan", "fuzzy", 0)

    # Asking for an app-consistent point without a freeze hook still gives a fuzzy point; with
    # no hook, app-consistency is unavailable rather than failing (nothing to warn about).
    r3 = take_point(lab.vault, "vm1", app=True)
    assert r3.consistency == "fuzzy"
    assert r3.warning is None
    assert lab.item("vm1")["health"] == "Normal"

    points = {p["id"]: p for p in list_points(lab.vault, "vm1")}
    assert {p["type"] for p in points.values()} == {"fuzzy"}
    assert points[r.point_id]["changed_chunks"] == 4

    # The point holds exactly the image as it was.
    for disk, img in m.images.items():
        assert _point_disk(lab, r.point_id, disk, tmp_path) == img.read_bytes()
    assert lab.vault.datastore.verify().ok


def test_raw_site_freeze_hook_gives_app_consistent_point_thawed_after_the_read(lab_factory, tmp_path):
    log = tmp_path / "hooks.log"
    # The hooks write into the image too: what the freeze hook wrote must be in the point, what
    # the thaw hook wrote must not be (it runs after the read), and the next scan must see it.
    # The image is reached through a link made once the lab has created the image.
    link = tmp_path / "disk0.img"
    freeze_at, thaw_at = 12 * MIB + 100, 13 * MIB + 100

    def hook(word: str, offset: int) -> str:
        return (
            f"echo {word} >> {shlex.quote(str(log))} && printf {word.upper()} | "
            f"dd of={shlex.quote(str(link))} bs=1 seek={offset} conv=notrunc status=none"
        )

    lab = lab_factory(
        kind="raw",
        size=16 * MIB,
        data=2 * MIB,
        hooks={"freeze": hook("freeze", freeze_at), "thaw": hook("thaw", thaw_at), "timeout_s": 10},
    )
    link.symlink_to(lab.machines["vm1"].images["disk0"])

    job = lab.enable("vm1")
    assert job["state"] == "Succeeded", job["error"]
    assert not log.exists()  # a cycle that is not app-consistent does not run the hooks

    r = take_point(lab.vault, "vm1", app=True)
    assert r.consistency == "app-consistent"
    assert r.warning is None
    assert r.method == "hash-scan"
    assert log.read_text().split() == ["freeze", "thaw"]

    data = _point_disk(lab, r.point_id, "disk0", tmp_path)
    assert data[freeze_at : freeze_at + 6] == b"FREEZE"
    assert data[thaw_at : thaw_at + 4] == bytes(4)  # thawed after the read, not before
    item = lab.item("vm1")
    assert item["last_app_consistent_point_at"] == r.created_at
    assert item["health"] == "Normal", item["health_reasons"]

    # The thaw hook's write is the only change the next scan finds.
    r2 = take_point(lab.vault, "vm1")
    assert r2.consistency == "fuzzy"
    assert r2.stats.chunks_changed == 1
    data2 = _point_disk(lab, r2.point_id, "disk0", tmp_path)
    assert data2[thaw_at : thaw_at + 4] == b"THAW"
    assert log.read_text().split() == ["freeze", "thaw"]
