"""Alembic, driven from code: the script directory shipped in migrations/, upgrades on
an open connection, and the check that a database is not newer than this code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection

from .errors import StoreOpenError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def revisions() -> list[str]:
    """Every revision, oldest first."""
    return [script.revision for script in reversed(list(script_directory().walk_revisions()))]


def current(connection: Connection) -> tuple[str, ...]:
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
    try:
        command.upgrade(alembic_config(connection), target)
    except CommandError as error:
        raise StoreOpenError(f"cannot migrate the conversation store: {error}") from None


def downgrade(connection: Connection, target: str) -> None:
    """Only for tests and by hand: Rill itself never downgrades (restore a backup)."""
    command.downgrade(alembic_config(connection), target)
