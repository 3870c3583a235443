"""Alembic, driven from code: the script directory shipped in migrations/, upgrades on
an open connection, and the check that a database is not newer than this code.

Alembic is imported only when a database is not at HEAD already: a start on an
up-to-date database (nearly every start) then costs neither its import time nor its
memory (about 4 MB and 0.3-0.8 s)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from .errors import StoreOpenError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The newest revision in migrations/versions (tests/test_store_migrations.py checks it
# against the script directory): update it with every new migration.
HEAD = "0004_index_ended_answers"
VERSION_TABLE = "alembic_version"


def at_head(connection: Connection) -> bool:
    """Whether the database is at this code's HEAD, read without Alembic."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return False
    versions = {row[0] for row in connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))}
    return versions == {HEAD}


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def revisions() -> list[str]:
    """Every revision, oldest first."""
    return [script.revision for script in reversed(list(script_directory().walk_revisions()))]


def current(connection: Connection) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_heads()


def check_known(connection: Connection) -> None:
    """A database written by a newer Rill (a revision we do not have) is never touched."""
    known = set(revisions())
    for revision in current(connection):
        if revision not in known:
            raise StoreOpenError(
                f"the database's schema revision {revision!r} is newer than this Rill knows "
                f"(latest {revisions()[-1]!r}): upgrade Rill, or restore a backup made by this version"
            )


def upgrade_to_head(connection: Connection) -> None:
    upgrade(connection, "head")


def upgrade(connection: Connection, target: str) -> None:
    from alembic import command
    from alembic.util.exc import CommandError

    try:
        command.upgrade(alembic_config(connection), target)
    except CommandError as error:
        raise StoreOpenError(f"cannot migrate the conversation store: {error}") from None


def downgrade(connection: Connection, target: str) -> None:
    """Only for tests and by hand: Rill itself never downgrades (restore a backup)."""
    from alembic import command

    command.downgrade(alembic_config(connection), target)
