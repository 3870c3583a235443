"""The store when its database fails: PostgreSQL stopped mid-use and started again, a
full disk under SQLite, a write lock held too long. Each is a 503 storage_unavailable
(retryable) while it lasts, nothing half-written, and the same Store works again after,
without being reopened."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection

from server.store import Store, StoreUnavailable, open_store
from server.store import database as store_database
from server.store.errors import translated

from .conftest import PostgresServer
from .store_helpers import LIMITS, dump, user


async def unavailable(call: Any) -> StoreUnavailable:
    with pytest.raises(StoreUnavailable) as caught:
        await call
    assert (caught.value.status, caught.value.code, caught.value.retryable) == (503, "storage_unavailable", True)
    return caught.value


@pytest.fixture
async def pg_store(postgres_server: PostgresServer, postgres_url: str) -> AsyncIterator[Store]:
    store = await open_store(postgres_url, LIMITS)
    try:
        yield store
    finally:
        await store.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            postgres_server.start()  # the next test needs it, whatever happened here


async def test_postgresql_stopped_and_started_again(postgres_server: PostgresServer, pg_store: Store) -> None:
    await pg_store.create_conversation("ann", {"id": "c"})
    await pg_store.add_message("ann", "c", user("before", id="q"))
    await pg_store.add_message("ann", "c", {"role": "assistant", "parent": "q", "id": "a", "status": "streaming"})
    # Every pooled connection is alive and in use before the crash.
    assert len(await pg_store.list_conversations("ann")) == 1

    postgres_server.stop("immediate")  # a crash: no goodbye to the clients
    await unavailable(pg_store.save_answer("ann", "c", "a", content="half", reasoning="", last_event_id=3))
    await unavailable(pg_store.add_message("ann", "c", user("during", "a")))
    await unavailable(pg_store.get_conversation("ann", "c"))
    await unavailable(pg_store.list_conversations("ann"))

    postgres_server.start()  # the same port: the pool reconnects by itself
    await pg_store.save_answer("ann", "c", "a", content="half, then all", reasoning="", last_event_id=9, status="done")
    await pg_store.add_message("ann", "c", user("after", "a", id="q2"))
    conversation = await pg_store.get_conversation("ann", "c")
    assert conversation is not None
    assert [m["content"] for m in conversation["messages"]] == ["before", "half, then all", "after"]
    assert conversation["messages"][1]["last_event_id"] == 9


async def test_postgresql_restart_between_calls(postgres_server: PostgresServer, pg_store: Store) -> None:
    """A clean restart while the store is idle: stale pooled connections are replaced
    (pre-ping) and the first call after it already works."""
    await pg_store.create_conversation("ann", {"id": "c"})
    postgres_server.stop("fast")
    postgres_server.start()
    await pg_store.add_message("ann", "c", user("after a restart"))
    assert (await pg_store.usage("ann"))["messages"] == 1


@contextlib.contextmanager
def small_tmpfs(directory: Path) -> Iterator[Any]:
    """A 1 MiB tmpfs when this runs as root and may mount; else None."""
    directory.mkdir()
    if os.geteuid() != 0:
        yield None
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


async def test_sqlite_disk_full_then_space_returns(tmp_path: Path) -> None:
    """Where it can (root, a container allowing mounts), the disk really fills: the
    database lives on a 1 MiB tmpfs, and "space returns" is a remount at 8 MiB. Elsewhere
    the same SQLITE_FULL comes from PRAGMA max_page_count, set on every connection the
    store begins a transaction on (the database may not grow past the pages it has)."""
    with small_tmpfs(tmp_path / "disk") as resize:
        store = await open_store(f"sqlite:///{tmp_path}/disk/rill.db", LIMITS)
        try:
            limit: dict[str, int] = {}
            if resize is None:

                @event.listens_for(store.sync_engine, "begin")
                def _limit(connection: Connection) -> None:
                    if limit:
                        connection.exec_driver_sql(f"PRAGMA max_page_count = {limit['pages']}")

            await store.create_conversation("ann", {"id": "c"})
            await store.add_message("ann", "c", user("hi", id="q"))
            await store.add_message("ann", "c", {"role": "assistant", "parent": "q", "id": "a", "status": "streaming"})
            if resize is None:
                limit["pages"] = await store.database.read(
                    lambda c: c.exec_driver_sql("PRAGMA page_count").scalar_one()
                )
                added = 0
            else:
                added = await _fill(store)
            before = await dump(store)
            await unavailable(store.add_message("ann", "c", user("x" * 9000, "a")))
            big = "answer text " * 40_000  # more than a full disk has room for, in the WAL too
            await unavailable(store.save_answer("ann", "c", "a", content=big, reasoning="", last_event_id=5))
            assert await dump(store) == before  # nothing half-written
            assert (await store.get_conversation("ann", "c")) is not None  # reads still work
            # Space returns: the same store writes again.
            if resize is None:
                limit["pages"] = 1_000_000
            else:
                resize("8m")
            await store.save_answer("ann", "c", "a", content=big, reasoning="", last_event_id=5, status="done")
            await store.add_message("ann", "c", user("x" * 9000, "a"))
            conversation = await store.get_conversation("ann", "c")
            assert conversation is not None
            assert conversation["messages"][1]["content"] == big
            assert len(conversation["messages"]) == 3 + added
        finally:
            await store.close()


async def _fill(store: Store) -> int:
    """Messages until the disk is full; how many went in."""
    added = 0
    while True:
        try:
            await store.add_message("ann", "c", user("f" * 9000, "q"))
        except StoreUnavailable:
            return added
        added += 1
        assert added < 1000, "the disk never filled"


async def test_sqlite_locked_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the write lock past busy_timeout: 503, then works again."""
    monkeypatch.setattr(store_database, "BUSY_TIMEOUT_MS", 200)
    path = tmp_path / "rill.db"
    store = await open_store(f"sqlite:///{path}", LIMITS)
    try:
        await store.create_conversation("ann", {"id": "c"})
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            await unavailable(store.add_message("ann", "c", user("blocked")))
            assert len(await store.list_conversations("ann")) == 1  # WAL: readers are not blocked
        finally:
            other.execute("ROLLBACK")
            other.close()
        await store.add_message("ann", "c", user("unblocked"))
        assert (await store.usage("ann"))["messages"] == 1
    finally:
        await store.close()


class _DriverError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "unavailable_now"),
    [
        ("57P03", True),  # the database system is starting up
        ("57P01", True),  # terminating connection due to administrator command
        ("08006", True),  # connection failure
        ("53100", True),  # disk full
        ("53300", True),  # too many connections
        ("58030", True),  # I/O error
        ("42P01", False),  # undefined table: a bug, not an outage
        ("22021", False),  # bad UTF-8: a bug
    ],
)
async def test_postgresql_outage_states_are_503(sqlstate: str, unavailable_now: bool) -> None:
    """asyncpg reports these as plain errors (not OperationalError): the SQLSTATE tells."""
    error = exc.DBAPIError("SELECT 1", None, _DriverError(sqlstate))
    if unavailable_now:
        with pytest.raises(StoreUnavailable):
            async with translated():
                raise error
    else:
        with pytest.raises(exc.DBAPIError):
            async with translated():
                raise error
