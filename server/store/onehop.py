"""SQLite through aiosqlite with one trip to its thread per statement, not four.

SQLAlchemy's aiosqlite adapter makes a cursor, executes, fetches and closes it, each a
round trip to aiosqlite's worker thread (a queue put, a thread wake-up, a future back on
the event loop): most of a stored answer's CPU went there. This cursor does the four in
one function run on that thread. Queries are unchanged (the same code runs on PostgreSQL);
only the driver's plumbing differs. Written against SQLAlchemy 2.1 / aiosqlite 0.22."""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection, AsyncAdapt_aiosqlite_cursor
from sqlalchemy.util import EMPTY_DICT


def _run(
    connection: sqlite3.Connection, operation: str, parameters: Any, many: bool
) -> tuple[Any, int, Any, list[Any]]:
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """Results are fetched whole at execute (as SQLAlchemy's adapter does already)."""

    __slots__ = ("_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: Any) -> None:  # no cursor made up front: no trip
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: Any = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return 1

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        pass

    async def _async_soft_close(self) -> None:
        pass  # the sqlite3 cursor was closed on its thread already

    def close(self) -> None:
        self._rows.clear()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        await self._run(operation, parameters, False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        await self._run(operation, seq_of_parameters, True)

    async def _run(self, operation: Any, parameters: Any, many: bool) -> None:
        async with self._adapt_connection._execute_mutex:
            aio = self._connection
            result = await aio._execute(_run, aio._conn, operation, parameters, many)
        self._description, self._rowcount, self._lastrowid, rows = result
        self._rows = collections.deque(rows)


class OneHopConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneHopCursor

    def rollback(self) -> None:
        # The pool rolls back every connection it is given back, also after a commit: no
        # trip when no transaction is open (no statement is running on it at that point).
        conn = self._connection._connection
        if conn is not None and not conn.in_transaction:
            return
        super().rollback()


def adapt(dbapi_connection: Any) -> None:
    """Called on each new connection (the engine's connect event)."""
    if type(dbapi_connection) is AsyncAdapt_aiosqlite_connection:
        dbapi_connection.__class__ = OneHopConnection
