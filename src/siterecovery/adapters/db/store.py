"""Opening the control-plane database: engine, migrations, unit of work.

SQLite (WAL, busy timeout) is the embedded default; any SQLAlchemy URL works (PostgreSQL for a
shared deployment). The schema is brought to the newest Alembic revision on open, so a vault
made by an older version is upgraded in place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from siterecovery.errors import VaultError

MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0002"  # the newest Alembic revision in migrations/versions


def schema_version(engine: Engine) -> str | None:
    """The database's Alembic revision, or None when it has none yet."""
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except (OperationalError, ProgrammingError):
        return None


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    # Imported here: alembic is only needed when the schema is not current (saves CLI start-up).
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    for attempt in range(30):
        try:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            return
        except OperationalError as err:
            # Another process may be migrating the same SQLite file right now; wait for it.
            if "locked" not in str(err) or attempt == 29:
                raise VaultError(f"cannot upgrade the vault database: {err}") from err
            time.sleep(0.2)


class Store:
    """The database of one vault: hands out units of work (one transaction each)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        if schema_version(self.engine) != SCHEMA_HEAD:
            migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def uow(self) -> Iterator[Session]:
        """One transaction: commits when the block ends normally, rolls back on an exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def close(self) -> None:
        self.engine.dispose()
