"""server/store/onehop.py leans on private parts of SQLAlchemy's aiosqlite adapter and of
aiosqlite (its worker-thread call, the sqlite3 connection, the adapter's cursor slots):
these tests fail on the upgrade that changes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite
import pytest
import sqlalchemy
from sqlalchemy import text

from server.store.database import create_engine, engine_url
from server.store.onehop import OneHopConnection


def test_the_versions_onehop_was_written_against() -> None:
    # Checked by hand against these; an upgrade must read onehop.py again first.
    assert (sqlalchemy.__version__, aiosqlite.__version__) == ("2.1.9", "0.22.1")


async def test_each_statement_is_one_trip_to_the_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trips: list[Any] = []
    original = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(fn)
        return await original(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    engine = create_engine(engine_url(f"sqlite:///{tmp_path / 'one.db'}"))
    try:
        async with engine.begin() as connection:
            raw = await connection.get_raw_connection()
            adapted: Any = raw.dbapi_connection
            assert type(adapted) is OneHopConnection
            await connection.execute(text("CREATE TABLE t (pk INTEGER PRIMARY KEY, v TEXT)"))
            monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
            inserted = await connection.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": "a"})
            assert (inserted.lastrowid, inserted.rowcount) == (1, 1)
            many = await connection.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": "b"}, {"v": "c"}])
            assert many.rowcount == 2
            rows = (await connection.execute(text("SELECT pk, v FROM t ORDER BY pk"))).all()
            assert [tuple(row) for row in rows] == [(1, "a"), (2, "b"), (3, "c")]
            assert len(trips) == 3  # stock adapter: cursor, execute, fetch, close = 4 each
            with pytest.raises(sqlalchemy.exc.OperationalError, match="no such table"):
                await connection.execute(text("SELECT * FROM missing"))
    finally:
        await engine.dispose()
