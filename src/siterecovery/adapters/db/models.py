"""SQLAlchemy models of the control plane's store.

The schema is owned by Alembic (``migrations/``); these classes are the mapping. JSON columns
hold structures that are read and written whole (machine specs, job steps, checkpoints).
Times are epoch seconds (float) so that SQLite and PostgreSQL agree without time-zone games.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class VaultRow(Base):
    __tablename__ = "vault"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    datastore: Mapped[str] = mapped_column(Text)  # path of the local datastore
    key_fingerprint: Mapped[str] = mapped_column(String(64))


class SiteRow(Base):
    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # qemu | raw
    role: Mapped[str] = mapped_column(String(16))  # primary | recovery
    inventory: Mapped[str | None] = mapped_column(Text, nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)  # where recovered disks go
    created_at: Mapped[float] = mapped_column(Float)
    discovered_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    machines: Mapped[list[MachineRow]] = relationship(back_populates="site")


class MachineRow(Base):
    __tablename__ = "machines"
    __table_args__ = (UniqueConstraint("site_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    discovered_at: Mapped[float] = mapped_column(Float)

    site: Mapped[SiteRow] = relationship(back_populates="machines")


class PolicyRow(Base):
    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    rpo_threshold_s: Mapped[float] = mapped_column(Float)
    retention_s: Mapped[float] = mapped_column(Float)
    crash_interval_s: Mapped[float] = mapped_column(Float)
    app_interval_s: Mapped[float] = mapped_column(Float)
    failback_of_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class ItemRow(Base):
    __tablename__ = "protected_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    source_site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    recovery_site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    state: Mapped[str] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(16), default="forward")
    disks: Mapped[list[Any]] = mapped_column(JSON)  # replicated disk names
    excluded_disks: Mapped[list[Any]] = mapped_column(JSON)
    initial_total_bytes: Mapped[int] = mapped_column(Integer, default=0)
    initial_done_bytes: Mapped[int] = mapped_column(Integer, default=0)
    last_point_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_app_point_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_freeze_failed: Mapped[bool] = mapped_column(Boolean, default=False)
    tracking_lost: Mapped[bool] = mapped_column(Boolean, default=False)
    test_failover: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

    machine: Mapped[MachineRow] = relationship(foreign_keys=[machine_id])
    policy: Mapped[PolicyRow] = relationship()
    source_site: Mapped[SiteRow] = relationship(foreign_keys=[source_site_id])
    recovery_site: Mapped[SiteRow] = relationship(foreign_keys=[recovery_site_id])


class PointRow(Base):
    __tablename__ = "recovery_points"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("protected_items.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    consistency: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(32))
    logical_bytes: Mapped[int] = mapped_column(Integer)
    read_bytes: Mapped[int] = mapped_column(Integer)
    sent_bytes: Mapped[int] = mapped_column(Integer)
    stored_bytes: Mapped[int] = mapped_column(Integer)
    changed_chunks: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float] = mapped_column(Float)
    disks: Mapped[dict[str, Any]] = mapped_column(JSON)  # disk name -> IndexRef json


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("protected_items.id"), nullable=True)
    target: Mapped[str] = mapped_column(String(128))  # what the job acts on, for display
    state: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    steps: Mapped[list[Any]] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
