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
    # Recovery sites: how much compute they can run (None: unlimited).
    capacity_cpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    capacity_memory_mib: Mapped[int | None] = mapped_column(Integer, nullable=True)

    machines: Mapped[list[MachineRow]] = relationship(back_populates="site")
    networks: Mapped[list[NetworkRow]] = relationship(back_populates="site")


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
    # Target compute and network settings: size name (None: the default size) and per-NIC
    # settings [{"nic", "role", "network", "subnet", "ip", "test_ip"}] (see control/networks.py).
    target_size: Mapped[str | None] = mapped_column(String(64), nullable=True)
    nic_settings: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # The current (or last) failover: point, planned or not, where the machine runs, timings.
    failover: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The machine running at the recovery site after a failover (spec as for a site machine,
    # plus its directory and run directory); the source of reverse replication.
    recovered_machine: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
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
    # forward: read at the primary site; reverse: read from the machine at the recovery site.
    direction: Mapped[str] = mapped_column(String(16), default="forward")


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


class NetworkRow(Base):
    """A network of a site; ``mirror_of`` is set on the "<name>-asr" networks made at enable."""

    __tablename__ = "networks"
    __table_args__ = (UniqueConstraint("site_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    name: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(16), default="production")  # production | test
    mirror_of_id: Mapped[int | None] = mapped_column(ForeignKey("networks.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)

    site: Mapped[SiteRow] = relationship(back_populates="networks")
    subnets: Mapped[list[SubnetRow]] = relationship(
        back_populates="network", cascade="all, delete-orphan", order_by="SubnetRow.name"
    )


class SubnetRow(Base):
    __tablename__ = "subnets"
    __table_args__ = (UniqueConstraint("network_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id"))
    name: Mapped[str] = mapped_column(String(64))
    cidr: Mapped[str] = mapped_column(String(64))
    gateway: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dns: Mapped[list[Any]] = mapped_column(JSON, default=list)

    network: Mapped[NetworkRow] = relationship(back_populates="subnets")


class NetworkMappingRow(Base):
    """Source network -> recovery network (and, optionally, the test network for drills)."""

    __tablename__ = "network_mappings"
    __table_args__ = (UniqueConstraint("source_network_id", "target_network_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_network_id: Mapped[int] = mapped_column(ForeignKey("networks.id"))
    target_network_id: Mapped[int] = mapped_column(ForeignKey("networks.id"))
    test_network_id: Mapped[int | None] = mapped_column(ForeignKey("networks.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)

    source_network: Mapped[NetworkRow] = relationship(foreign_keys=[source_network_id])
    target_network: Mapped[NetworkRow] = relationship(foreign_keys=[target_network_id])
    test_network: Mapped[NetworkRow | None] = relationship(foreign_keys=[test_network_id])


class IpAllocationRow(Base):
    """An address given to a machine's NIC in a subnet (one owner per address)."""

    __tablename__ = "ip_allocations"
    __table_args__ = (UniqueConstraint("subnet_id", "address"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subnet_id: Mapped[int] = mapped_column(ForeignKey("subnets.id"), index=True)
    address: Mapped[str] = mapped_column(String(64))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("protected_items.id"), nullable=True)
    owner: Mapped[str] = mapped_column(String(128))  # the machine (or "reserved by NAME")
    nic: Mapped[str | None] = mapped_column(String(64), nullable=True)
    purpose: Mapped[str] = mapped_column(String(16))  # failover | test | reserved
    created_at: Mapped[float] = mapped_column(Float)

    subnet: Mapped[SubnetRow] = relationship()


class SizeRow(Base):
    """A machine size a recovery site offers (the catalogue failover picks target sizes from)."""

    __tablename__ = "sizes"
    __table_args__ = (UniqueConstraint("site_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    name: Mapped[str] = mapped_column(String(64))
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(Integer)
    max_nics: Mapped[int] = mapped_column(Integer)
