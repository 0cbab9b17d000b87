"""Replication policies. Creating one also creates its "<name>-failback" twin, as ASR does;
changing one applies to every item that uses it (items read their policy at each cycle)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from siterecovery.adapters.db.models import ItemRow, PolicyRow
from siterecovery.domain.durations import format_duration
from siterecovery.domain.policy import PolicySpec
from siterecovery.errors import AlreadyExists, InvalidInput, NotFound


def spec_of(row: PolicyRow) -> PolicySpec:
    return PolicySpec(
        name=row.name,
        rpo_threshold_s=row.rpo_threshold_s,
        retention_s=row.retention_s,
        crash_interval_s=row.crash_interval_s,
        app_interval_s=row.app_interval_s,
    )


def policy_dict(row: PolicyRow, items: int = 0) -> dict[str, Any]:
    return {
        "name": row.name,
        "rpo_threshold": format_duration(row.rpo_threshold_s),
        "retention": format_duration(row.retention_s),
        "crash_consistent_frequency": format_duration(row.crash_interval_s),
        "app_consistent_frequency": format_duration(row.app_interval_s) if row.app_interval_s else "off",
        "rpo_threshold_s": row.rpo_threshold_s,
        "retention_s": row.retention_s,
        "crash_interval_s": row.crash_interval_s,
        "app_interval_s": row.app_interval_s,
        "failback_twin_of": None,
        "items": items,
    }


def get_policy(session: Any, name: str) -> PolicyRow:
    row = session.scalar(select(PolicyRow).where(PolicyRow.name == name))
    if row is None:
        names = ", ".join(session.scalars(select(PolicyRow.name).order_by(PolicyRow.name))) or "none yet"
        raise NotFound(kind="policy", name=name, hint=f" Known policies: {names}.")
    return row


def _apply(row: PolicyRow, spec: PolicySpec) -> None:
    row.rpo_threshold_s = spec.rpo_threshold_s
    row.retention_s = spec.retention_s
    row.crash_interval_s = spec.crash_interval_s
    row.app_interval_s = spec.app_interval_s


def create_policy(vault: Any, name: str, **settings: Any) -> list[dict[str, Any]]:
    spec = PolicySpec.create(name, **{k: v for k, v in settings.items() if v is not None})
    twin = spec.failback_twin()
    now = time.time()
    with vault.store.uow() as s:
        for n in (spec.name, twin.name):
            if s.scalar(select(PolicyRow).where(PolicyRow.name == n)) is not None:
                raise AlreadyExists(kind="policy", name=n)
        main = PolicyRow(name=spec.name, created_at=now)
        _apply(main, spec)
        s.add(main)
        s.flush()
        back = PolicyRow(name=twin.name, created_at=now, failback_of_id=main.id)
        _apply(back, twin)
        s.add(back)
        s.flush()
        return [policy_dict(main), {**policy_dict(back), "failback_twin_of": main.name}]


def update_policy(vault: Any, name: str, **settings: Any) -> dict[str, Any]:
    changes = {k: v for k, v in settings.items() if v is not None}
    if not changes:
        raise InvalidInput(
            "nothing to change: give at least one of --rpo-threshold, --retention, "
            "--crash-frequency, --app-frequency."
        )
    with vault.store.uow() as s:
        row = get_policy(s, name)
        spec = spec_of(row).with_changes(**changes)
        _apply(row, spec)
        items = len(list(s.scalars(select(ItemRow.id).where(ItemRow.policy_id == row.id))))
        return policy_dict(row, items)


def list_policies(vault: Any) -> list[dict[str, Any]]:
    with vault.store.uow() as s:
        rows = list(s.scalars(select(PolicyRow).order_by(PolicyRow.name)))
        by_id = {r.id: r for r in rows}
        out = []
        for r in rows:
            items = len(list(s.scalars(select(ItemRow.id).where(ItemRow.policy_id == r.id))))
            d = policy_dict(r, items)
            if r.failback_of_id:
                d["failback_twin_of"] = by_id[r.failback_of_id].name
            out.append(d)
        return out


def delete_policy(vault: Any, name: str) -> None:
    with vault.store.uow() as s:
        row = get_policy(s, name)
        users = list(s.scalars(select(ItemRow.name).where(ItemRow.policy_id == row.id)))
        if users:
            raise InvalidInput(
                f"policy {name!r} is used by {', '.join(users)}; disable their replication or move "
                "them to another policy first."
            )
        for twin in s.scalars(select(PolicyRow).where(PolicyRow.failback_of_id == row.id)):
            if list(s.scalars(select(ItemRow.name).where(ItemRow.policy_id == twin.id))):
                raise InvalidInput(f"its failback twin {twin.name!r} is in use; it cannot be deleted.")
            s.delete(twin)
        s.delete(row)
