"""Recovery point manifests: which index each disk of a point has, and how the point was made.

A manifest is stored in the datastore's object store as ``manifests/<point_id>.json``. It is
not encrypted (it holds no disk content, and operators may want to read it), but it is
authenticated: whoever can write to the datastore cannot change a manifest or forge one without
the vault key.

Stored form (UTF-8 JSON, one object)::

    {"format": 1,
     "manifest": {"point_id": ..., "item": ..., "machine": ..., "created_at": <epoch float>,
                  "consistency": "app-consistent" | "crash-consistent" | "fuzzy",
                  "method": ..., "disks": {"<disk>": {"size", "root", "chunk_size"}, ...},
                  "stats": {"<name>": <int>, ...}},
     "mac": "<64 hex>"}

``mac`` is keyed BLAKE3 (key: ``VaultKey.mac_key()``, a key derived for this purpose only) of
the canonical JSON of ``"manifest"`` (sorted keys, no spaces; Python's float repr round-trips
exactly) prefixed with the format number, so a manifest cannot be replayed under another format.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any

import blake3

from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.keys import VaultKey
from siterecovery.errors import DatastoreError, InvalidInput

MANIFEST_FORMAT = 1
CONSISTENCY_LEVELS = ("app-consistent", "crash-consistent", "fuzzy")
MANIFEST_PREFIX = "manifests/"


def manifest_name(point_id: str) -> str:
    """The object name of a point's manifest."""
    return f"{MANIFEST_PREFIX}{point_id}.json"


def check_point_id(point_id: str) -> None:
    if not point_id or "/" in point_id or point_id.startswith(".") or len(point_id) > 200:
        raise InvalidInput(
            f"recovery point id {point_id!r} is not allowed: use 1-200 characters, no '/', "
            "not starting with '.'."
        )


@dataclass
class Manifest:
    """One recovery point of one item (or one machine of a replication group)."""

    point_id: str
    item: str
    machine: str
    created_at: float
    consistency: str
    method: str
    disks: dict[str, IndexRef] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        check_point_id(self.point_id)
        if self.consistency not in CONSISTENCY_LEVELS:
            raise InvalidInput(
                f"consistency {self.consistency!r} is not allowed; allowed: {', '.join(CONSISTENCY_LEVELS)}."
            )

    def body(self) -> dict[str, Any]:
        return {
            "point_id": self.point_id,
            "item": self.item,
            "machine": self.machine,
            "created_at": self.created_at,
            "consistency": self.consistency,
            "method": self.method,
            "disks": {name: ref.to_json() for name, ref in self.disks.items()},
            "stats": dict(self.stats),
        }

    @staticmethod
    def _mac(key: VaultKey, fmt: int, body: dict[str, Any]) -> str:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return blake3.blake3(f"{fmt}\n{canonical}".encode(), key=key.mac_key()).hexdigest()

    def to_bytes(self, key: VaultKey | None = None) -> bytes:
        """The stored form; with ``key`` it carries the MAC (the datastore always passes it)."""
        body = self.body()
        doc: dict[str, Any] = {"format": self.format, "manifest": body}
        if key is not None:
            doc["mac"] = self._mac(key, self.format, body)
        return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, key: VaultKey | None = None) -> Manifest:
        """Parse a stored manifest; with ``key``, refuse it unless its MAC is valid."""
        try:
            doc = json.loads(data)
            fmt = doc["format"]
        except (ValueError, KeyError, TypeError) as err:
            raise DatastoreError(
                "a manifest is not valid JSON with a 'format' field; it is damaged. "
                "Run verify and delete or restore the recovery point."
            ) from err
        if fmt != MANIFEST_FORMAT:
            raise DatastoreError(
                f"manifest format {fmt!r} is unknown; this version reads format {MANIFEST_FORMAT}. "
                "Upgrade siterecovery to read this recovery point."
            )
        try:
            body = doc["manifest"]
            if key is not None and not hmac.compare_digest(str(doc.get("mac", "")), cls._mac(key, fmt, body)):
                raise DatastoreError(
                    f"manifest of point {body.get('point_id')!r} fails authentication: it was changed "
                    "after it was written, or it belongs to a vault with another key. Do not use it; "
                    "delete it or restore it from a copy."
                )
            return cls(
                point_id=str(body["point_id"]),
                item=str(body["item"]),
                machine=str(body["machine"]),
                created_at=float(body["created_at"]),
                consistency=str(body["consistency"]),
                method=str(body["method"]),
                disks={str(k): IndexRef.from_json(v) for k, v in body["disks"].items()},
                stats={str(k): int(v) for k, v in body["stats"].items()},
                format=fmt,
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidInput) as err:
            raise DatastoreError(f"manifest is malformed ({err!r}); it is damaged.") from err
