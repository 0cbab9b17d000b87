"""Demo machines: disk images with real data, a minimal NBD server for them, the site inventory.

Disk image layout made by :func:`fill_image` (``size`` bytes, both ``size`` and ``data_bytes``
multiples of 64 KiB)::

    [0, data_bytes)      data region: real bytes (files under /usr/lib, /usr/share, /usr/bin)
    [data_bytes, size)   workload region: unallocated, reads as zeros until the demo
                         workload (:mod:`siterecovery.demo.workload`) writes into it

The data region is never written by the workload, so a verifier can prove it intact from
hashes alone. Those hashes live in a sidecar next to the image, ``<image>.base.json``::

    {"format": "siterecovery-demo-base", "version": 1, "image": "web01-disk0.qcow2",
     "fmt": "qcow2", "size": ..., "data_bytes": ..., "chunk_size": 65536, "seed": 3,
     "hash": "blake3-128", "chunks": ["<32 hex digits>", ...]}

``chunks[i]`` is the BLAKE3 hash (first 16 bytes) of ``[i * chunk_size, (i + 1) * chunk_size)``.

Data source: regular files (symlinks are not followed) under /usr/lib, /usr/share and /usr/bin,
concatenated in a deterministic order: the immediate subdirectories of those roots sorted by
path, then rotated by an amount derived from ``seed`` so that disks with different seeds start
at different places (and so differ), each walked depth-first in name order. Unreadable files are
skipped. If the host has fewer bytes than asked for, the rest is deterministic pseudo-random but
compressible data (hex text of a BLAKE3 stream keyed by seed and position, about 2:1 under
zstd), so an image never depends on randomness; being host-dependent is fine because the sidecar
records what was written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import blake3
import tomli_w

from siterecovery.durable import write_atomic
from siterecovery.errors import InvalidInput, OutOfRange, SourceError

CHUNK_SIZE = 64 * 1024
HASH_BYTES = 16
SIDECAR_FORMAT = "siterecovery-demo-base"
SIDECAR_VERSION = 1
DATA_ROOTS = (Path("/usr/lib"), Path("/usr/share"), Path("/usr/bin"))
_WRITE_BATCH = 4 * 1024 * 1024  # large sequential writes; 64 chunks per batch
_FILLER_KEY = blake3.blake3(b"siterecovery demo filler v1").digest()


@dataclass(frozen=True)
class BaseInfo:
    """What a demo image's data region holds, without a copy of it (see module docstring)."""

    size: int
    data_bytes: int
    chunks: tuple[str, ...]
    chunk_size: int = CHUNK_SIZE
    seed: int = 0
    fmt: str = "qcow2"
    image: str = ""
    real_bytes: int = field(default=0, compare=False)  # how much came from host files

    @property
    def workload_region(self) -> tuple[int, int]:
        """``(start, end)`` of the zero-initialised region the demo workload writes into."""
        return (self.data_bytes, self.size)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "image": self.image,
            "fmt": self.fmt,
            "size": self.size,
            "data_bytes": self.data_bytes,
            "real_bytes": self.real_bytes,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "hash": f"blake3-{HASH_BYTES * 8}",
            "chunks": list(self.chunks),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BaseInfo:
        if doc.get("format") != SIDECAR_FORMAT or doc.get("version") != SIDECAR_VERSION:
            raise InvalidInput(
                f"not a demo base sidecar of version {SIDECAR_VERSION} "
                f"(format={doc.get('format')!r}, version={doc.get('version')!r}); "
                "recreate the image with fill_image()."
            )
        return cls(
            size=int(doc["size"]),
            data_bytes=int(doc["data_bytes"]),
            chunks=tuple(doc["chunks"]),
            chunk_size=int(doc["chunk_size"]),
            seed=int(doc["seed"]),
            fmt=str(doc["fmt"]),
            image=str(doc["image"]),
            real_bytes=int(doc.get("real_bytes", 0)),
        )

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), separators=(",", ":")).encode(), make_parents=True)

    @classmethod
    def load(cls, path: Path) -> BaseInfo:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise InvalidInput(f"cannot read demo base sidecar {path}: {err}") from err
        return cls.from_json(doc)


def sidecar_path(image: Path) -> Path:
    """``<image>.base.json``: where :func:`fill_image` keeps an image's :class:`BaseInfo`."""
    image = Path(image)
    return image.with_name(image.name + ".base.json")


def load_base(image: Path) -> BaseInfo:
    """The :class:`BaseInfo` stored next to ``image``."""
    return BaseInfo.load(sidecar_path(image))


def chunk_hash(data: bytes | memoryview) -> str:
    """The sidecar's hash of one chunk (BLAKE3, first 16 bytes, hex)."""
    return blake3.blake3(data).digest(length=HASH_BYTES).hex()


def fill_image(
    path: Path,
    size: int,
    data_bytes: int,
    *,
    seed: int,
    fmt: Literal["qcow2", "raw"] = "qcow2",
) -> BaseInfo:
    """Create a disk image whose first ``data_bytes`` hold real data; the rest reads as zeros.

    raw: a sparse file written with large writes. qcow2: ``qemu-img create`` (64 KiB clusters)
    then the data written over NBD through qemu-storage-daemon, so the bytes hit the disk once
    (a raw file plus ``qemu-img convert`` writes them twice) and the workload region stays
    unallocated. Saves the :class:`BaseInfo` sidecar ``<image>.base.json`` and returns it. The
    image is made under a temporary name and renamed into place, so ``path`` is either absent
    or complete; an existing image is replaced.
    """
    path = Path(path)
    if fmt not in ("qcow2", "raw"):
        raise InvalidInput(f"image format {fmt!r} is not supported; use 'qcow2' or 'raw'.")
    if size <= 0 or size % CHUNK_SIZE:
        raise OutOfRange(field="size", value=size, allowed=f"a positive multiple of {CHUNK_SIZE}")
    if data_bytes < 0 or data_bytes > size or data_bytes % CHUNK_SIZE:
        raise OutOfRange(
            field="data_bytes", value=data_bytes, allowed=f"a multiple of {CHUNK_SIZE} in [0, {size}]"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    chunks: list[str] = []
    real_bytes = 0

    def fill(write: Callable[[bytes, int], None]) -> None:
        nonlocal real_bytes
        source = _DataSource(seed)
        for offset in range(0, data_bytes, _WRITE_BATCH):
            want = min(_WRITE_BATCH, data_bytes - offset)
            buf, real = source.take(want)
            real_bytes += real
            write(buf, offset)
            view = memoryview(buf)
            chunks.extend(chunk_hash(view[i : i + CHUNK_SIZE]) for i in range(0, want, CHUNK_SIZE))

    try:
        if fmt == "raw":
            with open(tmp, "wb") as out:
                out.truncate(size)
                fill(lambda buf, offset: _pwrite_all(out.fileno(), buf, offset))
                os.fsync(out.fileno())
        else:
            _run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    f"cluster_size={CHUNK_SIZE}",
                    str(tmp),
                    str(size),
                ],
                what=f"creating {path.name}",
            )
            import nbd  # Debian's python3-libnbd; only the qcow2 path needs it

            with serve_images({"disk": tmp}, writable=True) as srv:
                h = nbd.NBD()
                h.set_export_name("disk")
                h.connect_unix(str(srv.socket))
                try:
                    fill(lambda buf, offset: h.pwrite(buf, offset))
                    h.flush()
                finally:
                    h.shutdown()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    info = BaseInfo(
        size=size,
        data_bytes=data_bytes,
        chunks=tuple(chunks),
        seed=seed,
        fmt=fmt,
        image=path.name,
        real_bytes=real_bytes,
    )
    info.save(sidecar_path(path))
    return info


def _data_units() -> list[tuple[str, bool]]:
    """``(directory, recursive)`` pieces of the data source, in sorted order."""
    units: list[tuple[str, bool]] = []
    for root in DATA_ROOTS:
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            continue
        has_files = False
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                units.append((entry.path, True))
            elif entry.is_file(follow_symlinks=False):
                has_files = True
        if has_files:
            # The root's own files form one unit, e.g. all of /usr/bin.
            units.append((str(root), False))
    return units


def _walk_files(top: str, recursive: bool) -> Iterator[str]:
    """Regular files under ``top``, depth-first in name order, symlinks not followed."""
    stack = [top]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[str] = []
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    yield entry.path
                elif recursive and entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
            except OSError:
                continue
        # Reversed so that popping visits subdirectories in name order.
        stack.extend(reversed(subdirs))


def _data_stream(seed: int) -> Iterator[bytes]:
    """Contents of host files in the seed's deterministic order, in pieces of at most 4 MiB."""
    units = _data_units()
    if not units:
        return
    start = int.from_bytes(blake3.blake3(struct.pack("<q", seed)).digest(length=8), "little") % len(units)
    for top, recursive in units[start:] + units[:start]:
        for name in _walk_files(top, recursive):
            try:
                with open(name, "rb") as f:
                    while piece := f.read(_WRITE_BATCH):
                        yield piece
            except OSError:
                continue


def _filler(seed: int, offset: int, length: int) -> bytes:
    """Deterministic compressible bytes for ``[offset, offset+length)`` (64 KiB-aligned blocks)."""
    out = bytearray()
    first = offset // CHUNK_SIZE
    last = (offset + length + CHUNK_SIZE - 1) // CHUNK_SIZE
    for block in range(first, last):
        stream = blake3.blake3(struct.pack("<qQ", seed, block), key=_FILLER_KEY)
        out += stream.digest(length=CHUNK_SIZE // 2).hex().encode()
    skip = offset - first * CHUNK_SIZE
    return bytes(out[skip : skip + length])


class _DataSource:
    """Hands out the seed's byte stream in exact-size batches, falling back to filler."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._stream = _data_stream(seed)
        self._pending = b""
        self._offset = 0

    def take(self, want: int) -> tuple[bytes, int]:
        """The next ``want`` bytes and how many of them came from host files."""
        parts = [self._pending[:want]]
        have = len(parts[0])
        self._pending = self._pending[want:]
        while have < want:
            piece = next(self._stream, None)
            if piece is None:
                break
            if have + len(piece) > want:
                self._pending = piece[want - have :]
                piece = piece[: want - have]
            parts.append(piece)
            have += len(piece)
        real = have
        if have < want:
            parts.append(_filler(self.seed, self._offset + have, want - have))
        self._offset += want
        return b"".join(parts), real


def write_inventory(path: Path, machines: list[dict[str, Any]]) -> None:
    """Write the site inventory TOML (``[[machine]]`` tables) that the control plane reads.

    Each machine needs ``name`` (unique) and at least one ``disk`` entry with ``name`` and
    ``path``; other keys (``os``, ``cpus``, ``memory_mib``, ``qmp``, ``nbd``, ``hooks``,
    ``nic``) are written as given. :class:`~pathlib.Path` values are written as absolute path
    strings. The file is written to a temporary name and renamed.
    """
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, machine in enumerate(machines):
        name = machine.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inventory machine #{i} has no name; give each machine a 'name' string.")
        if name in seen:
            raise InvalidInput(f"inventory machine name {name!r} is used twice; names must be unique.")
        seen.add(name)
        disks = machine.get("disk")
        if not isinstance(disks, list) or not disks:
            raise InvalidInput(f"machine {name!r} has no disks; give it a 'disk' list of {{name, path}}.")
        disk_names: set[str] = set()
        for disk in disks:
            if not isinstance(disk, dict) or "name" not in disk or "path" not in disk:
                raise InvalidInput(f"machine {name!r}: every disk needs 'name' and 'path' (got {disk!r}).")
            if disk["name"] in disk_names:
                raise InvalidInput(f"machine {name!r}: disk name {disk['name']!r} is used twice.")
            disk_names.add(disk["name"])
        out.append(_plain(machine))
    write_atomic(Path(path), tomli_w.dumps({"machine": out}).encode(), make_parents=True)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class ImageServer:
    """A running qemu-storage-daemon serving images as NBD exports named after the disks."""

    socket: Path
    exports: list[str]
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def serve_images(
    images: dict[str, Path],
    socket_path: Path | None = None,
    *,
    writable: bool = False,
    fmt: Literal["qcow2", "raw"] = "qcow2",
    force_share: bool = False,
    timeout_s: float = 10.0,
) -> Iterator[ImageServer]:
    """Serve ``{disk name: image}`` over NBD on a unix socket until the context exits.

    A minimal stand-in for the machine daemon (no QMP) used by the demo, its tests and the
    verifier's readers. ``force_share`` (read-only only) opens images that another process holds
    open for writing, at the caller's risk of reading a changing image. On exit the daemon gets
    SIGTERM, which makes it flush and close the images cleanly.
    """
    if force_share and writable:
        raise InvalidInput("force_share=True needs writable=False: QEMU only shares images read-only.")
    own_dir: str | None = None
    if socket_path is None:
        # Unix socket paths are limited to ~107 bytes; a short private directory always fits.
        own_dir = tempfile.mkdtemp(prefix="sr-nbd-")
        socket_path = Path(own_dir) / "nbd.sock"
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    ro = "off" if writable else "on"
    args = ["qemu-storage-daemon"]
    for i, (disk, image) in enumerate(images.items()):
        file_opts = f"driver=file,node-name=f{i},filename={_qemu_escape(str(Path(image).absolute()))}"
        file_opts += f",read-only={ro}"
        if force_share:
            file_opts += ",force-share=on"
        args += ["--blockdev", file_opts]
        fmt_opts = f"driver={fmt},node-name={disk},file=f{i},read-only={ro}"
        if force_share:
            fmt_opts += ",force-share=on"
        args += ["--blockdev", fmt_opts]
    args += ["--nbd-server", f"addr.type=unix,addr.path={_qemu_escape(str(socket_path))}"]
    for i, disk in enumerate(images):
        args += [
            "--export",
            f"type=nbd,id=e{i},node-name={disk},name={disk},writable={'on' if writable else 'off'}",
        ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_socket(proc, socket_path, timeout_s)
        yield ImageServer(socket=socket_path, exports=list(images), process=proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _wait_for_socket(proc: subprocess.Popen[bytes], path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise SourceError(
                f"qemu-storage-daemon exited with status {proc.returncode} before serving NBD on "
                f"{path}: {out.strip()}. Check the image paths and that no other process holds "
                "them open for writing."
            )
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SourceError(f"qemu-storage-daemon did not serve NBD on {path} within {timeout_s} s.")
        time.sleep(0.02)


def _qemu_escape(value: str) -> str:
    # QEMU's option syntax splits on commas; a literal comma is written twice.
    return value.replace(",", ",,")


def _run(args: list[str], *, what: str) -> None:
    try:
        subprocess.run(args, check=True, capture_output=True)
    except FileNotFoundError as err:
        raise SourceError(f"{args[0]} is not installed; {what} needs qemu-utils.") from err
    except subprocess.CalledProcessError as err:
        raise SourceError(
            f"{what} failed: {args[0]} exited {err.returncode}: {err.stderr.decode(errors='replace').strip()}"
        ) from err


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
