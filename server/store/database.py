"""Opening the database: the URL to an async engine (SQLite by default, PostgreSQL by
configuration), the SQLite connection settings, and the migrations to head at start-up."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import fts, onehop
from .errors import StoreOpenError
from .migrate import at_head, check_known, upgrade_to_head

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000  # another process (a backup, a second Rill) holding the write lock
CHECK_AT_START_BYTES = 128 * 1024 * 1024


def engine_url(url: str) -> URL:
    """`sqlite:///path` and `postgresql://…` as an operator writes them, with the async
    drivers this code uses (aiosqlite, asyncpg); a driver given explicitly must be one of them."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        raise StoreOpenError(f"storage url is not a database URL: {error}") from None
    if parsed.drivername in ("postgres", "postgres+asyncpg"):
        parsed = parsed.set(drivername="postgresql")  # Heroku-style URLs; SQLAlchemy wants the long name
    backend = parsed.get_backend_name()
    drivers = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
    if backend not in drivers:
        raise StoreOpenError(f"storage url: unsupported database {backend!r} (use sqlite:/// or postgresql://)")
    driver = parsed.get_driver_name()
    if parsed.drivername != backend and driver != drivers[backend]:
        raise StoreOpenError(f"storage url: use {backend}:// (driver {drivers[backend]}), not {parsed.drivername}")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StoreOpenError("storage url: SQLite needs a file path (sqlite:////var/lib/rill/rill.db)")
    return parsed.set(drivername=f"{backend}+{drivers[backend]}")


def create_engine(url: URL) -> AsyncEngine:
    # hide_parameters: a database error's text must never carry message content into the logs.
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, hide_parameters=True)
        _configure_sqlite(engine)
        return engine
    # pre_ping: after PostgreSQL restarts, the pool drops dead connections before use
    # rather than failing one request per stale connection.
    return create_async_engine(
        url,
        hide_parameters=True,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=10,
        connect_args={"timeout": 5, "command_timeout": 30},
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Transactions are ours (BEGIN below), not the sqlite3 module's implicit ones, so a
        # read followed by a write sees one snapshot and DDL in migrations is transactional.
        onehop.adapt(dbapi_connection)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            # Not set up (the file locked past busy_timeout): closed now, not left to the
            # garbage collector (aiosqlite warns of a connection deleted unclosed).
            cursor.close()
            dbapi_connection.close()
            raise
        cursor.close()
        fts.register(dbapi_connection)  # the search index's triggers call it (migration 0002_search)

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        # Writers take the write lock up front (busy_timeout applies) instead of failing
        # on upgrading a read lock.
        options = connection.get_execution_options()
        if options.get("rill_autocommit"):
            return  # a read that needs no snapshot: each statement on its own (no BEGIN, no rollback)
        mode = "IMMEDIATE" if options.get("rill_write") else "DEFERRED"
        connection.exec_driver_sql(f"BEGIN {mode}")


async def open_engine(url: str) -> AsyncEngine:
    """An engine on a database migrated to this code's head; StoreOpenError when Rill must
    not start on it (unreadable, newer than this code, unreachable)."""
    parsed = engine_url(url)
    shown = parsed.render_as_string(hide_password=True)
    check = False
    if parsed.get_backend_name() == "sqlite":
        shown = str(parsed.database)
        check = _prepare_sqlite_file(Path(str(parsed.database))) <= CHECK_AT_START_BYTES
    engine = create_engine(parsed)
    try:
        async with engine.connect() as connection:
            if check:
                await connection.run_sync(check_sqlite, shown)
            if not await connection.run_sync(at_head):
                await connection.run_sync(check_known)
                await connection.run_sync(upgrade_to_head)
            await connection.commit()
    except StoreOpenError:
        await engine.dispose()
        raise
    except (exc.DBAPIError, OSError, TimeoutError) as error:
        await engine.dispose()
        raise StoreOpenError(f"cannot open the conversation store {shown}: {_reason(error)}") from None
    except BaseException:
        await engine.dispose()
        raise
    return engine


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
