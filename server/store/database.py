"""Opening the database: the URL to an engine and its runner (SQLite by default, on
threads of our own; PostgreSQL by configuration, on asyncio), the SQLite connection
settings, and the migrations to head at start-up."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from . import fts
from .errors import StoreOpenError
from .migrate import at_head, check_known, upgrade_to_head
from .runners import BEGIN_KEY, AsyncPostgres, Database, ThreadedSQLite

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000  # another process (a backup, a second Rill) holding the write lock
CHECK_AT_START_BYTES = 128 * 1024 * 1024


def engine_url(url: str) -> URL:
    """`sqlite:///path` and `postgresql://…` as an operator writes them, with the drivers
    this code uses (the standard library's sqlite3, asyncpg). `sqlite+aiosqlite://`, the
    driver earlier versions used, still works and means the same file."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        raise StoreOpenError(f"storage url is not a database URL: {error}") from None
    if parsed.drivername in ("postgres", "postgres+asyncpg"):
        parsed = parsed.set(drivername="postgresql")  # Heroku-style URLs; SQLAlchemy wants the long name
    backend = parsed.get_backend_name()
    drivers = {"sqlite": ("pysqlite", "aiosqlite"), "postgresql": ("asyncpg",)}
    if backend not in drivers:
        raise StoreOpenError(f"storage url: unsupported database {backend!r} (use sqlite:/// or postgresql://)")
    driver = parsed.get_driver_name()
    if parsed.drivername != backend and driver not in drivers[backend]:
        raise StoreOpenError(f"storage url: use {backend}:// (driver {drivers[backend][0]}), not {parsed.drivername}")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StoreOpenError("storage url: SQLite needs a file path (sqlite:////var/lib/rill/rill.db)")
    return parsed.set(drivername=f"{backend}+{drivers[backend][0]}")


def connect(url: URL) -> Database:
    """A runner on the database at `url` (from engine_url), nothing read or migrated yet."""
    # hide_parameters: a database error's text must never carry message content into the logs.
    if url.get_backend_name() == "sqlite":
        # check_same_thread off: each connection stays on its own thread, but is closed by
        # whichever thread shuts the runner down.
        engine = create_engine(url, hide_parameters=True, connect_args={"check_same_thread": False})
        _configure_sqlite(engine)
        return ThreadedSQLite(engine)
    from sqlalchemy.ext.asyncio import create_async_engine  # only here: see runners.py

    # pre_ping: after PostgreSQL restarts, the pool drops dead connections before use
    # rather than failing one request per stale connection.
    return AsyncPostgres(
        create_async_engine(
            url,
            hide_parameters=True,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=5,
            pool_timeout=10,
            connect_args={"timeout": 5, "command_timeout": 30},
        )
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Transactions are ours (BEGIN below), not the sqlite3 module's implicit ones, so a
        # read followed by a write sees one snapshot and DDL in migrations is transactional.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            # Not set up (the file locked past busy_timeout): closed now, not left to the
            # garbage collector.
            cursor.close()
            dbapi_connection.close()
            raise
        cursor.close()
        fts.register(dbapi_connection)  # the search index's triggers call it (migration 0002_search)

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.info.get(BEGIN_KEY, "DEFERRED")  # set by the runner per unit of work
        if mode is not None:
            connection.exec_driver_sql(f"BEGIN {mode}")


async def open_database(url: str) -> Database:
    """A runner on a database migrated to this code's head; StoreOpenError when Rill must
    not start on it (unreadable, newer than this code, unreachable)."""
    parsed = engine_url(url)
    shown = parsed.render_as_string(hide_password=True)
    check = False
    if parsed.get_backend_name() == "sqlite":
        shown = str(parsed.database)
        check = _prepare_sqlite_file(Path(str(parsed.database))) <= CHECK_AT_START_BYTES

    def to_head(connection: Connection) -> None:
        if check:
            check_sqlite(connection, shown)
        if not at_head(connection):
            check_known(connection)
            upgrade_to_head(connection)

    database = connect(parsed)
    try:
        await database.write(to_head)
    except StoreOpenError:
        await database.close()
        raise
    except (exc.DBAPIError, OSError, TimeoutError) as error:
        await database.close()
        raise StoreOpenError(f"cannot open the conversation store {shown}: {_reason(error)}") from None
    except BaseException:
        await database.close()
        raise
    return database


def _prepare_sqlite_file(path: Path) -> int:
    """Its size; the folder made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size if path.exists() else 0
    if size > 0:
        # A file that is not a database: say so before SQLite is asked to write to it.
        with path.open("rb") as handle:
            header = handle.read(16)
        if header != b"SQLite format 3\x00":
            raise StoreOpenError(f"{path} is not a SQLite database (or is corrupt); refusing to touch it")
    return size


def check_sqlite(connection: Connection, shown: str) -> None:
    """A damaged file found now rather than by the first conversation that touches the
    damaged page. quick_check reads every page, about a second per few hundred MB: at
    start-up only up to CHECK_AT_START_BYTES (a restart's downtime), always in
    `python -m server.store check` and after each backup."""
    problems = [str(row[0]) for row in connection.exec_driver_sql("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        found = " ".join("; ".join(problems).split())[:200]
        raise StoreOpenError(f"{shown} is corrupt ({found}); restore a backup")


def _reason(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error) or type(error).__name__
    if isinstance(orig, sqlite3.DatabaseError) or "malformed" in text or "not a database" in text:
        text += " (corrupt database file?)"
    return " ".join(text.split())[:300]
