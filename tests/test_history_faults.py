"""The chat keeps streaming whatever the database does: PostgreSQL stopped mid-answer,
SQLite full, SQLite locked by another connection. The reader gets the whole answer, the
owner's change feed says `saved: false` once and `saved: true` when the writes land
again, and then the whole answer is in the database: nothing accepted is lost."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection

from server.keys import STORE
from server.store import Store

from .conftest import PostgresServer, Rill, StartRill
from .fakes import Reply, StreamReader, answer, text_of
from .history_helpers import Asked, ask

STORAGE = {"save_interval": 0.2, "auto_titles": False}
NO_PAGE_LIMIT = 4294967294  # SQLite's largest max_page_count


async def changes(rill: Rill) -> StreamReader:
    response = await rill.session.get(rill.url / "api/changes")
    assert response.status == 200, await response.text()
    reader = StreamReader(response)
    rill.readers.append(reader)
    return reader


async def next_saved(feed: StreamReader, asked: Asked, timeout: float) -> dict[str, Any]:
    while True:
        event_ = await feed.read_until("saved", timeout=timeout)
        if event_.data["message"] == asked.answer:
            return dict(event_.data)


async def stored(rill: Rill, asked: Asked) -> dict[str, Any]:
    async with rill.session.get(rill.url / f"api/conversations/{asked.conversation}") as response:
        assert response.status == 200, await response.text()
        conversation = await response.json()
    return next(m for m in conversation["messages"] if m["id"] == asked.answer)


async def survive(
    rill: Rill,
    *,
    tokens: int,
    delay: float,
    break_db: Callable[[], Awaitable[None]],
    mend_db: Callable[[], Awaitable[None]],
    outage: float,
    piece_chars: int = 200,
) -> None:
    """Asks, breaks the database after a few tokens, checks the answer streams on and the
    feed says not saved, mends it, and checks everything lands."""
    pieces = [f"piece {i:03d} " + "x" * piece_chars for i in range(tokens)]
    rill.fake.script(Reply(chunks=answer(pieces, delay=delay)))
    feed = await changes(rill)
    asked = await ask(rill, "Tell me everything")
    reader = await rill.open_stream(asked.generation)
    for _ in range(3):
        await reader.read_until("delta")
    await break_db()
    saved = await next_saved(feed, asked, timeout=15)
    assert saved["saved"] is False
    assert saved["conversation"] == asked.conversation
    # Readers are unaffected: the answer streams on while the database is away.
    deltas_before = len([e for e in reader.events if e.event == "delta"])
    await asyncio.sleep(outage)
    assert len([e for e in reader.events if e.event == "delta"]) >= deltas_before
    await mend_db()
    events = await reader.read_all(timeout=30)
    assert text_of(events) == "".join(pieces)
    assert events[-1].event == "done"
    again = await next_saved(feed, asked, timeout=30)
    assert again["saved"] is True
    # The whole answer lands (the final write may follow the `saved` transition).
    async with asyncio.timeout(30):
        while (message := await stored(rill, asked))["status"] != "done":
            await asyncio.sleep(0.1)
    assert message["content"] == "".join(pieces)
    assert message["finish_reason"] == "stop"
    assert message["last_event_id"] == int(events[-1].id)


async def test_postgresql_stopped_mid_answer(
    start_rill: StartRill, postgres_server: PostgresServer, postgres_url: str
) -> None:
    rill = await start_rill(storage={**STORAGE, "url": postgres_url})

    down = False

    async def stop() -> None:
        nonlocal down
        await asyncio.to_thread(postgres_server.stop, "immediate")
        down = True

    async def start() -> None:
        nonlocal down
        await asyncio.to_thread(postgres_server.start)
        down = False

    try:
        await survive(rill, tokens=60, delay=0.05, break_db=stop, mend_db=start, outage=1.0)
    finally:
        if down:
            await start()  # for the session's other tests


class FullDisk:
    """SQLite's "database or disk is full" (SQLITE_FULL), as on a full disk: while full,
    every transaction the store begins sets a max_page_count of the file's size, after a
    VACUUM has emptied its free pages, so any write that needs one more page fails."""

    def __init__(self, store: Store, path: Path) -> None:
        self.path = path
        self.full = False

        @event.listens_for(store.sync_engine, "begin")
        def limit(connection: Connection) -> None:
            if self.full:
                pages = connection.exec_driver_sql("PRAGMA page_count").scalar_one()
                connection.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
            else:
                connection.exec_driver_sql(f"PRAGMA max_page_count = {NO_PAGE_LIMIT}")

    def _vacuum(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            connection.execute("VACUUM")
        finally:
            connection.close()

    async def fill(self) -> None:
        await asyncio.to_thread(self._vacuum)
        self.full = True

    async def free(self) -> None:
        self.full = False


async def test_sqlite_disk_full_mid_answer(start_rill: StartRill, tmp_path: Path) -> None:
    path = tmp_path / "rill.db"
    rill = await start_rill(storage={**STORAGE, "url": f"sqlite:///{path}"})
    disk = FullDisk(rill.app[STORE], path)
    # A page (4 KiB) or more between two writes: each one needs pages the full file has not.
    await survive(rill, tokens=60, delay=0.05, break_db=disk.fill, mend_db=disk.free, outage=1.0, piece_chars=1200)


async def test_sqlite_locked_by_another_connection(start_rill: StartRill, tmp_path: Path) -> None:
    path = tmp_path / "rill.db"
    rill = await start_rill(storage={**STORAGE, "url": f"sqlite:///{path}"})
    # In a thread: taking the lock may wait for a write of Rill's, and the loop runs on.
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)

    async def lock() -> None:
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")  # held: Rill's busy_timeout runs out

    async def unlock() -> None:
        await asyncio.to_thread(other.execute, "ROLLBACK")

    try:
        # The store waits busy_timeout (5 s) before a write fails: a long answer and outage.
        await survive(rill, tokens=200, delay=0.05, break_db=lock, mend_db=unlock, outage=2.0)
    finally:
        other.close()


async def test_shutdown_with_the_database_down_logs_what_is_lost(
    start_rill: StartRill, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rill.db"
    rill = await start_rill(storage={**STORAGE, "url": f"sqlite:///{path}"})
    disk = FullDisk(rill.app[STORE], path)
    rill.fake.script(Reply(chunks=answer(["y" * 2000 for _ in range(200)], delay=0.05)))
    feed = await changes(rill)
    asked = await ask(rill)
    reader = await rill.open_stream(asked.generation)
    await reader.read_until("delta")
    await disk.fill()
    assert (await next_saved(feed, asked, timeout=15))["saved"] is False
    with caplog.at_level(logging.ERROR, logger="server.history.answers"):
        await rill.close()
    lost = [r for r in caplog.records if "not saved at shutdown" in r.getMessage()]
    assert len(lost) == 1
    assert asked.answer in lost[0].getMessage()
