"""Manifests: round trip, authentication, format versions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.dataplane.index import IndexRef
from siterecovery.dataplane.keys import VaultKey
from siterecovery.dataplane.manifest import Manifest, manifest_name
from siterecovery.errors import DatastoreError, InvalidInput

KEY = VaultKey.generate()


def sample(point_id: str = "p1") -> Manifest:
    return Manifest(
        point_id=point_id,
        item="web-01",
        machine="vm-web-01",
        created_at=1712345678.123456,
        consistency="crash-consistent",
        method="dirty-bitmap",
        disks={"vda": IndexRef(10 * 2**30, bytes(range(32))), "vdb": IndexRef(0, bytes(32))},
        stats={"chunks_sent": 12, "bytes_sent": 786432},
    )


names = st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=30).filter(
    lambda s: not s.startswith(".")
)


@settings(max_examples=50, deadline=None)
@given(
    point_id=names,
    item=st.text(max_size=20),
    created_at=st.floats(0, 4e9, allow_nan=False),
    consistency=st.sampled_from(["app-consistent", "crash-consistent", "fuzzy"]),
    disks=st.dictionaries(
        st.text(max_size=10), st.builds(IndexRef, st.integers(0, 2**50), st.binary(min_size=32, max_size=32))
    ),
    stats=st.dictionaries(st.text(max_size=10), st.integers(-(2**62), 2**62)),
)
def test_round_trip(
    point_id: str,
    item: str,
    created_at: float,
    consistency: str,
    disks: dict[str, IndexRef],
    stats: dict[str, int],
) -> None:
    m = Manifest(point_id, item, "m", created_at, consistency, "resync", disks, stats)
    assert Manifest.from_bytes(m.to_bytes(KEY), KEY) == m
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_tampering_is_detected() -> None:
    data = sample().to_bytes(KEY)
    doc = json.loads(data)
    doc["manifest"]["disks"]["vda"]["root"] = "00" * 32
    with pytest.raises(DatastoreError, match="fails authentication"):
        Manifest.from_bytes(json.dumps(doc).encode(), KEY)
    with pytest.raises(DatastoreError, match="fails authentication"):
        Manifest.from_bytes(data, VaultKey.generate())
    unsigned = sample().to_bytes()
    with pytest.raises(DatastoreError, match="fails authentication"):
        Manifest.from_bytes(unsigned, KEY)


def test_unknown_format_is_refused_with_clear_message() -> None:
    doc = json.loads(sample().to_bytes(KEY))
    doc["format"] = 2
    with pytest.raises(DatastoreError, match="format 2 is unknown"):
        Manifest.from_bytes(json.dumps(doc).encode(), KEY)
    with pytest.raises(DatastoreError, match="not valid JSON"):
        Manifest.from_bytes(b"{oops", KEY)


def test_invalid_fields_are_refused() -> None:
    with pytest.raises(InvalidInput, match="consistency"):
        Manifest("p", "i", "m", 0.0, "consistent-ish", "x")
    with pytest.raises(InvalidInput, match="recovery point id"):
        Manifest("a/b", "i", "m", 0.0, "fuzzy", "x")


def test_manifest_name() -> None:
    assert manifest_name("p1") == "manifests/p1.json"
