"""The schema head constant that lets the store skip Alembic must name the newest revision."""

from __future__ import annotations

from siterecovery.adapters.db.store import MIGRATIONS, SCHEMA_HEAD


def test_schema_head_is_the_newest_migration():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD
