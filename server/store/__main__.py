"""`python -m server.store upgrade|current|check|backup PATH [--url URL]`: the conversation
store's migrations and backups from a shell. The database is the one Rill uses: --url,
else RILL_DATABASE_URL, else the config's [storage] url, else rill.db in the state dir."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from sqlalchemy.engine import Connection

from server.config import ConfigError, load_config

from .backup import backup_sqlite
from .database import check_sqlite, connect, engine_url, open_database
from .errors import StoreOpenError
from .migrate import current, revisions
from .runners import Database


def default_url() -> str:
    if url := os.environ.get("RILL_DATABASE_URL"):
        return url
    config = load_config()
    storage = getattr(config, "storage", None)  # [storage], once the app has that section
    if url := str(getattr(storage, "url", "") or ""):
        return url
    if config.access.state_dir is None:
        raise StoreOpenError("no state directory to find rill.db in: pass --url sqlite:///path/to/rill.db")
    return f"sqlite:///{config.access.state_dir / 'rill.db'}"


async def _revision_of(database: Database) -> tuple[str, ...]:
    """The database's revision; the runner is closed afterwards."""
    try:
        return await database.read(current)
    finally:
        await database.close()


async def upgrade(url: str) -> None:
    revision = await _revision_of(await open_database(url))  # opening migrates to head
    print(f"at {', '.join(revision)} (latest {revisions()[-1]})")


async def show_current(url: str) -> None:
    revision = await _revision_of(connect(engine_url(url)))
    print(f"{', '.join(revision) or 'empty (no migrations applied)'} (latest {revisions()[-1]})")


async def check(url: str) -> None:
    parsed = engine_url(url)
    database = connect(parsed)

    def checked(connection: Connection) -> tuple[str, ...]:
        if parsed.get_backend_name() == "sqlite":
            check_sqlite(connection, str(parsed.database))
        return current(connection)

    try:
        revision = await database.read(checked)
    finally:
        await database.close()
    print(f"ok, at {', '.join(revision) or 'no revision'}")


def backup(url: str, target: Path) -> int:
    parsed = engine_url(url)
    if parsed.get_backend_name() != "sqlite":
        print(
            "rill: PostgreSQL is backed up with its own tool, e.g. "
            "pg_dump --format=custom --file=rill.dump 'postgresql://…' (restore: pg_restore)",
            file=sys.stderr,
        )
        return 2
    backup_sqlite(Path(str(parsed.database)), target)
    print(f"backed up {parsed.database} to {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.store", description=__doc__)
    parser.add_argument("--url", help="database URL (sqlite:///path or postgresql://…)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="apply the migrations this Rill has")
    commands.add_parser("current", help="show the database's schema revision")
    commands.add_parser("check", help="read every page of the SQLite database (PRAGMA quick_check)")
    backup_parser = commands.add_parser("backup", help="a consistent copy of the SQLite database, also while Rill runs")
    backup_parser.add_argument("path", type=Path)
    arguments = parser.parse_args(argv)
    try:
        url = arguments.url or default_url()
        if arguments.command == "upgrade":
            asyncio.run(upgrade(url))
        elif arguments.command in ("current", "check"):
            parsed = engine_url(url)
            if parsed.get_backend_name() == "sqlite" and not Path(str(parsed.database)).is_file():
                raise StoreOpenError(f"{parsed.database}: no such database file")  # not created by looking
            asyncio.run(show_current(url) if arguments.command == "current" else check(url))
        else:
            return backup(url, arguments.path)
    except (StoreOpenError, ConfigError) as error:
        print(f"rill: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
