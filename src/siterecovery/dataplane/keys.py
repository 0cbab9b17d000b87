"""The vault key: the secret that names and encrypts every chunk of a datastore.

A :class:`VaultKey` is 64 bytes of secret:

* ``id_key`` (32 bytes): the key of the keyed BLAKE3 hash that gives a chunk its id. Keying the
  hash means that whoever reads the datastore cannot confirm a guess of a chunk's content by
  hashing it themselves.
* ``enc_key`` (32 bytes): the master key of AES-256-GCM (``dataplane.chunk_codec`` derives one
  subkey per chunk id from it).

Further keys are derived with BLAKE3's key derivation mode and a context string per purpose, so
one secret never serves two purposes: :meth:`VaultKey.mac_key` authenticates manifests and
:meth:`VaultKey.fingerprint` is a public name of the key that reveals nothing about it.

Key file format (text, UTF-8, one JSON object, written once and never overwritten)::

    {"format": 1, "kind": "siterecovery-vault-key", "key": "<128 hex>", "fingerprint": "<32 hex>"}

The fingerprint in the file is a check value: a file whose key does not match its fingerprint
is reported as corrupt instead of silently giving a wrong key. The file is written to a temp
file, fsynced, then hard-linked into place (which fails if the name exists, so an existing key
is never replaced, even by a racing writer), with mode 0600. The key lives with the vault (its
configuration directory), never in the datastore in plaintext.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path

import blake3

from siterecovery.errors import AlreadyExists, VaultError

KEY_FILE_FORMAT = 1
KEY_FILE_KIND = "siterecovery-vault-key"
KEY_SIZE = 64
_FINGERPRINT_CONTEXT = "siterecovery 2024 vault key fingerprint v1"
_MAC_CONTEXT = "siterecovery 2024 manifest mac key v1"


class VaultKey:
    """The secret of one vault: ``id_key`` for chunk ids and ``enc_key`` for encryption."""

    __slots__ = ("id_key", "enc_key")

    def __init__(self, id_key: bytes, enc_key: bytes) -> None:
        if len(id_key) != 32 or len(enc_key) != 32:
            raise VaultError(
                f"a vault key is two 32-byte keys; got {len(id_key)} and {len(enc_key)} bytes. "
                "Use VaultKey.generate() or load the vault's key file."
            )
        self.id_key = bytes(id_key)
        self.enc_key = bytes(enc_key)

    @classmethod
    def generate(cls) -> VaultKey:
        """A new random key from the operating system's CSPRNG."""
        raw = secrets.token_bytes(KEY_SIZE)
        return cls(raw[:32], raw[32:])

    def to_bytes(self) -> bytes:
        """The 64 secret bytes: ``id_key`` then ``enc_key``."""
        return self.id_key + self.enc_key

    @classmethod
    def from_bytes(cls, raw: bytes) -> VaultKey:
        if len(raw) != KEY_SIZE:
            raise VaultError(
                f"a vault key is {KEY_SIZE} bytes, got {len(raw)}. "
                "Pass the bytes returned by VaultKey.to_bytes()."
            )
        return cls(raw[:32], raw[32:])

    def fingerprint(self) -> str:
        """A public, stable name of this key (32 hex digits); it does not reveal the key."""
        return blake3.blake3(self.to_bytes(), derive_key_context=_FINGERPRINT_CONTEXT).hexdigest(16)

    def mac_key(self) -> bytes:
        """The 32-byte key that authenticates manifests (derived, never used for anything else)."""
        return blake3.blake3(self.to_bytes(), derive_key_context=_MAC_CONTEXT).digest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VaultKey):
            return NotImplemented
        return secrets.compare_digest(self.to_bytes(), other.to_bytes())

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        # Never print the secret, not even in a traceback.
        return f"VaultKey(fingerprint={self.fingerprint()!r})"

    def save(self, path: Path) -> None:
        """Write the key file at ``path`` (mode 0600); refuse if ``path`` exists."""
        path = Path(path)
        if path.exists():
            raise AlreadyExists(
                kind="key file",
                name=str(path),
                hint=" A key file is never overwritten: losing the old key loses the data. "
                "Choose another path or move the old file away yourself.",
            )
        body = {
            "format": KEY_FILE_FORMAT,
            "kind": KEY_FILE_KIND,
            "key": self.to_bytes().hex(),
            "fingerprint": self.fingerprint(),
        }
        data = (json.dumps(body) + "\n").encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError as err:
                raise AlreadyExists(
                    kind="key file",
                    name=str(path),
                    hint=" Another process wrote it just now; load that key instead.",
                ) from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @classmethod
    def load(cls, path: Path) -> VaultKey:
        """Read a key file written by :meth:`save`."""
        path = Path(path)
        try:
            st = path.stat()
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise VaultError(
                f"vault key file {path} does not exist. Restore it from your key backup; "
                "without it the datastore cannot be read."
            ) from err
        except OSError as err:
            raise VaultError(f"cannot read vault key file {path}: {err.strerror}.") from err
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VaultError(
                f"vault key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); allowed is 600. Run: chmod 600 {path}"
            )
        try:
            body = json.loads(raw)
            fmt = body["format"]
            kind = body["kind"]
            key_hex = body["key"]
            fingerprint = body["fingerprint"]
        except (ValueError, KeyError, TypeError) as err:
            raise VaultError(
                f"vault key file {path} is not a siterecovery key file (bad JSON or missing fields). "
                "Restore it from your key backup."
            ) from err
        if kind != KEY_FILE_KIND:
            raise VaultError(f"{path} is a {kind!r} file, not a {KEY_FILE_KIND!r} file.")
        if fmt != KEY_FILE_FORMAT:
            raise VaultError(
                f"vault key file {path} has format {fmt}; this version reads format "
                f"{KEY_FILE_FORMAT}. Upgrade siterecovery to read it."
            )
        try:
            key = cls.from_bytes(bytes.fromhex(key_hex))
        except (ValueError, TypeError) as err:
            raise VaultError(f"vault key file {path} is corrupt: the key is not 128 hex digits.") from err
        if not secrets.compare_digest(key.fingerprint(), str(fingerprint)):
            raise VaultError(
                f"vault key file {path} is corrupt: the key does not match its fingerprint. "
                "Restore it from your key backup."
            )
        return key
