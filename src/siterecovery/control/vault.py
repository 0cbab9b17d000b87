"""The vault: the top container, and the one place that knows where its parts live.

An embedded vault is a directory::

    <vault>/vault.db      control-plane database (SQLite, WAL)
    <vault>/vault.key     the vault key (0600); never written into the datastore
    <vault>/datastore/    default datastore location (chunks, manifests, config)
    <vault>/run/          worker pid file and log
    <vault>/work/         scratch space for replication (fleecing overlays)

The datastore may live elsewhere: another directory (``vault create --datastore PATH``) or
S3-compatible object storage (``--datastore s3://BUCKET/PREFIX?endpoint=URL``, credentials from
the standard AWS environment variables); the database records where.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from siterecovery.adapters.db.models import VaultRow
from siterecovery.adapters.db.store import Store
from siterecovery.dataplane.datastore import Datastore
from siterecovery.dataplane.keys import VaultKey
from siterecovery.errors import AlreadyExists, InvalidInput, VaultError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_VAULT = Path(os.environ.get("SITERECOVERY_VAULT", "~/.siterecovery/vault")).expanduser()


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"{kind} name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return name


@dataclass
class Vault:
    root: Path
    store: Store
    key: VaultKey
    name: str
    datastore_location: str  # a directory, or s3://BUCKET/PREFIX?endpoint=URL
    _datastore: Datastore | None = None

    @property
    def datastore_path(self) -> str:
        return self.datastore_location

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def datastore(self) -> Datastore:
        if self._datastore is None:
            self._datastore = _open_datastore(self.datastore_location, self.key)
        return self._datastore

    def close(self) -> None:
        self.store.close()


def is_s3(location: str | Path | None) -> bool:
    return str(location or "").startswith("s3://")


def _open_datastore(location: str, key: VaultKey, create: bool = False) -> Datastore:
    if is_s3(location):
        return Datastore.open_s3(location, key, create=create)
    return Datastore.open_local(Path(location), key, create=create)


def db_url(root: Path) -> str:
    return os.environ.get("SITERECOVERY_DB_URL") or f"sqlite:///{root / 'vault.db'}"


def create_vault(root: Path, name: str, datastore: str | Path | None = None) -> Vault:
    check_name("vault", name)
    root = root.expanduser().resolve()
    if (root / "vault.key").exists() or (root / "vault.db").exists():
        raise AlreadyExists(kind="vault", name=str(root), hint=" Use it, or choose another --vault path.")
    if is_s3(datastore):
        location = str(datastore)
    else:
        ds_path = Path(datastore or root / "datastore").expanduser().resolve()
        ds_path.mkdir(parents=True, exist_ok=True)
        location = str(ds_path)
    key = VaultKey.generate()
    # The datastore first: an unreachable S3 endpoint must not leave half a vault behind.
    _open_datastore(location, key, create=True)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "work"):
        (root / sub).mkdir(exist_ok=True)
    key.save(root / "vault.key")
    store = Store(db_url(root))
    with store.uow() as s:
        s.add(
            VaultRow(
                id=1,
                name=name,
                created_at=time.time(),
                datastore=location,
                key_fingerprint=key.fingerprint(),
            )
        )
    return Vault(root=root, store=store, key=key, name=name, datastore_location=location)


def open_vault(root: Path) -> Vault:
    root = root.expanduser().resolve()
    if not (root / "vault.key").exists():
        raise VaultError(
            f"no vault at {root}: create one with 'siterecovery vault create NAME --vault {root}' "
            "or point --vault / SITERECOVERY_VAULT at an existing one."
        )
    key = VaultKey.load(root / "vault.key")
    store = Store(db_url(root))
    with store.uow() as s:
        row = s.scalar(select(VaultRow))
        if row is None:
            raise VaultError(f"the vault database at {root} is empty; the vault was not fully created.")
        if row.key_fingerprint != key.fingerprint():
            raise VaultError(
                f"the key in {root / 'vault.key'} does not belong to vault {row.name!r}; restore the "
                "vault's own key file."
            )
        return Vault(root=root, store=store, key=key, name=row.name, datastore_location=row.datastore)
