"""Where the store's queries run. Queries are plain SQLAlchemy Core functions over a sync
`Connection`, written once for both databases; a runner gives them a connection:

- SQLite (`ThreadedSQLite`): the standard library's sqlite3 driver on threads of our
  own, one writer and a few readers, each with its connection kept open. A unit of work
  (a whole transaction: a question and its answer, a batch of saves) is one trip to a
  thread and one wake-up of the event loop, however many statements it runs. aiosqlite,
  through SQLAlchemy's adapter, makes four trips per statement, and a trip costs 100-170 µs
  of CPU on a small VM: those trips were most of a stored answer's CPU.
- PostgreSQL (`AsyncPostgres`): SQLAlchemy's asyncio engine over asyncpg, the same
  functions run through `AsyncConnection.run_sync` (SQLAlchemy's documented bridge)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    # Imported when PostgreSQL is configured only (database.py): SQLAlchemy's asyncio
    # layer brings its ORM, several MB a SQLite install never uses.
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")
Work = Callable[[Connection], T]

READERS = 2  # reads run beside the writer (WAL): a long export never holds up the saves
# How a unit of work opens its SQLite transaction (the engine's "begin" event reads it):
# writers take the write lock up front, so busy_timeout applies instead of a failure on
# upgrading a read lock; a read without a snapshot runs each statement on its own.
BEGIN_KEY = "rill_begin"


class Database(Protocol):
    backend: str  # "sqlite" | "postgresql"
    sync_engine: Engine  # for event listeners (tests count statements, inject faults)

    async def read(self, work: Work[T], *, snapshot: bool = True) -> T:
        """`work(connection)` in a read transaction (snapshot=False: SQLite runs each
        statement on its own; the statements need not see one state of the database)."""

    async def write(self, work: Work[T]) -> T:
        """`work(connection)` in one write transaction: committed when it returns, rolled
        back when it raises. A caller cancelled (shutdown, a request given up) gets its
        CancelledError at once, and the write still runs whole: a retry by id finds it."""

    async def close(self) -> None: ...


class ThreadedSQLite:
    backend = "sqlite"

    def __init__(self, engine: Engine, *, readers: int = READERS) -> None:
        self.sync_engine = engine
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="rill-store-write")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="rill-store-read")
        self._local = threading.local()
        self._opened: list[Connection] = []
        self._opened_lock = threading.Lock()

    async def read(self, work: Work[T], *, snapshot: bool = True) -> T:
        return await self._submit(self._readers, self._run_read, work, snapshot)  # cancelled: taken off the queue

    async def write(self, work: Work[T]) -> T:
        # Shielded: the caller's cancellation must not take the write off the queue.
        written = self._submit(self._writer, self._run_write, work)
        written.add_done_callback(_retrieved)
        return await asyncio.shield(written)

    async def close(self) -> None:
        # Queued and running units of work finish first; then each thread's connection.
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            connection.close()
        self.sync_engine.dispose()

    def _submit(self, threads: ThreadPoolExecutor, run: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        # The caller's context (the request's log fields) goes along to the thread.
        context = contextvars.copy_context()
        return asyncio.wrap_future(threads.submit(context.run, run, *args))

    def _connection(self) -> Connection:
        """This thread's connection, opened on first use and kept for the runner's life."""
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None or connection.closed:
            connection = self.sync_engine.connect()
            self._local.connection = connection
            with self._opened_lock:
                self._opened.append(connection)
        return connection

    def _run_write(self, work: Work[T]) -> T:
        connection = self._connection()
        connection.info[BEGIN_KEY] = "IMMEDIATE"
        try:
            with connection.begin():
                return work(connection)
        finally:
            self._drop_if_invalid(connection)

    def _run_read(self, work: Work[T], snapshot: bool) -> T:
        connection = self._connection()
        connection.info[BEGIN_KEY] = "DEFERRED" if snapshot else None
        try:
            return work(connection)
        finally:
            try:
                connection.rollback()  # ends the read (and its snapshot): WAL checkpoints can go on
            finally:
                self._drop_if_invalid(connection)

    def _drop_if_invalid(self, connection: Connection) -> None:
        """A connection the driver gave up on (disk I/O error) is replaced by the next unit
        of work rather than failing every one after it."""
        if connection.invalidated:
            connection.close()
            self._local.connection = None


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # the caller may be gone: no "exception never retrieved" noise


class AsyncPostgres:
    backend = "postgresql"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sync_engine = engine.sync_engine
        self._writing: set[asyncio.Task[Any]] = set()

    async def read(self, work: Work[T], *, snapshot: bool = True) -> T:
        async with self.engine.connect() as connection:
            return await connection.run_sync(work)

    async def write(self, work: Work[T]) -> T:
        # Shielded: a caller cancelled (shutdown, a request given up) does not cut the
        # transaction short; it commits or rolls back whole, and its connection goes back.
        task = asyncio.ensure_future(self._write(work))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        task.add_done_callback(_retrieved)
        return await asyncio.shield(task)

    async def _write(self, work: Work[T]) -> T:
        async with self.engine.begin() as connection:
            return await connection.run_sync(work)

    async def close(self) -> None:
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
        await self.engine.dispose()
