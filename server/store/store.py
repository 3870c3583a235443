"""The Store: the one object the rest of Rill talks to about stored conversations. Each
method is one transaction; database outages surface as StoreUnavailable (503)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import batch, conversations, exchange, messages, quotas, shapes, transfer
from .batch import AnswerWrite, Saved
from .database import open_engine
from .errors import translated
from .search import search as search_messages
from .validation import ID, StoreLimits

log = logging.getLogger(__name__)

MAX_LIST = 1000
RETRIES = 3
T = TypeVar("T")
# PostgreSQL: unique_violation (the same id at once), serialization_failure, deadlock_detected.
CONFLICTS = frozenset({"23505", "40001", "40P01"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Store:
    def __init__(self, engine: AsyncEngine, limits: StoreLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.backend: str = engine.dialect.name  # "sqlite" | "postgresql"
        # One writer at a time in this process: SQLite has one write lock anyway, and
        # waiting here is cheaper than waiting in busy_timeout.
        self._write_lock = asyncio.Lock() if self.backend == "sqlite" else None
        self._writing: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        if self._writing:  # writes whose callers were cancelled, finishing on their own
            await asyncio.gather(*self._writing, return_exceptions=True)
        await self.engine.dispose()

    @asynccontextmanager
    async def _read(self, *, snapshot: bool = True) -> AsyncIterator[AsyncConnection]:
        """snapshot=False: the statements need not see one state of the database (SQLite
        then spares the BEGIN and the rollback: two trips to its thread)."""
        async with translated(), self.engine.connect() as connection:
            if not snapshot:
                await connection.execution_options(rill_autocommit=True)
            yield connection

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with translated():
            if self._write_lock is None:
                async with self.engine.connect() as connection, connection.begin():
                    yield connection
                return
            async with self._write_lock, self.engine.connect() as connection:
                await connection.execution_options(rill_write=True)
                async with connection.begin():
                    yield connection

    async def _written(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """A write whose caller is cancelled (shutdown, a request given up) still commits
        or rolls back whole on its own, and its connection goes back to the pool; the
        caller gets its CancelledError at once."""
        task = asyncio.ensure_future(self._retrying(work))
        self._writing.add(task)
        task.add_done_callback(self._written_done)
        return await asyncio.shield(task)

    def _written_done(self, task: asyncio.Task[Any]) -> None:
        self._writing.discard(task)
        if not task.cancelled():
            task.exception()  # the caller may be gone: no "exception never retrieved" noise

    async def _retrying(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """One write transaction, run again when PostgreSQL refuses it for a conflict with
        another one: the same id inserted at once (the loser then finds the winner's row:
        idempotent), or a deadlock / serialization failure (nothing was written)."""
        for attempt in range(RETRIES + 1):
            try:
                async with self._write() as connection:
                    return await work(connection)
            except exc.DBAPIError as error:
                if attempt == RETRIES or not _conflict(error):
                    raise
                log.info("conversation store: write conflicted with another (%s), again", type(error.orig).__name__)
        raise AssertionError("unreachable")

    async def list_conversations(
        self, owner: str, *, limit: int = 200, before: int | None = None
    ) -> list[dict[str, Any]]:
        async with self._read() as connection:
            return await conversations.list_summaries(connection, owner, max(1, min(limit, MAX_LIST)), before)

    async def get_conversation(self, owner: str, cid: str) -> dict[str, Any] | None:
        async with self._read() as connection:
            pk = await conversations.find_pk(connection, owner, cid) if valid_id(cid) else None
            if pk is None:
                return None
            conversation = await conversations.summary(connection, pk)
            del conversation["streaming"]
            conversation["messages"] = await messages.of_conversation(connection, pk)
            return conversation

    async def create_conversation(self, owner: str, data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        return await self._written(lambda c: conversations.create(c, owner, data, self.limits, now_ms()))

    async def update_conversation(self, owner: str, cid: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        return await self._written(lambda c: conversations.change(c, owner, cid, changes, self.limits, now_ms()))

    async def delete_conversation(self, owner: str, cid: str) -> bool:
        return await self._written(lambda c: conversations.remove(c, owner, cid))

    async def add_message(self, owner: str, cid: str, message: dict[str, Any]) -> dict[str, Any]:
        return await self._written(lambda c: messages.add(c, owner, cid, message, self.limits, now_ms()))

    async def summary(self, owner: str, cid: str) -> dict[str, Any] | None:
        """The conversation without its messages (as listed), or None."""
        async with self._read() as connection:
            pk = await conversations.find_pk(connection, owner, cid) if valid_id(cid) else None
            return None if pk is None else await conversations.summary(connection, pk)

    async def context(self, owner: str, cid: str, leaf: str | None, ids: set[str]) -> dict[str, Any] | None:
        """What answering needs (exchange.context): {"system", "model", "path": root .. leaf,
        "messages": the leaf and `ids` found, by id}; None: no such conversation."""
        # No snapshot needed: a conversation deleted between its two statements reads as
        # one without those messages, and the write that follows finds it gone anyway.
        async with self._read(snapshot=False) as connection:
            return await exchange.context(connection, owner, cid, leaf, ids)

    async def add_exchange(
        self,
        owner: str,
        cid: str,
        question: dict[str, Any] | None,
        answer: dict[str, Any],
        *,
        start: Callable[[], str],
    ) -> dict[str, Any]:
        """A question (None: regenerate) and its answer in one transaction; `start()` runs
        once the checks passed and gives the answer's generation id (called again when
        PostgreSQL makes the transaction run again: it must give the same id).
        Returns {"question", "answer", "summary"}."""
        return await self._written(
            lambda c: exchange.add_exchange(c, owner, cid, question, answer, start, self.limits, now_ms())
        )

    async def path(self, owner: str, cid: str, leaf_id: str) -> list[dict[str, Any]]:
        async with self._read() as connection:
            return await messages.path(connection, owner, cid, leaf_id)

    async def save_answer(
        self,
        owner: str,
        cid: str,
        mid: str,
        *,
        content: str,
        reasoning: str,
        last_event_id: int,
        status: str | None = None,
        finish_reason: str | None = None,
        error: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
        generation: str | None = None,
    ) -> None:
        """Raises 404 when the conversation or message was deleted meanwhile (the writer
        stops), StoreUnavailable when it should try again later."""
        values: dict[str, Any] = {"content": content, "reasoning": reasoning, "last_event_id": last_event_id}
        if status is not None:
            values["status"] = status
        if finish_reason is not None:
            values["finish_reason"] = finish_reason[:32]
        if error is not None:
            values["error"] = shapes.dumps(error)
        if usage is not None:
            values["usage"] = shapes.dumps(usage)
        if generation is not None:
            # Continue: the same message streams again, from a new generation.
            values["generation"] = generation
            values.update(finish_reason=None, error=None, usage=None)
        await self._written(lambda c: messages.save_answer(c, owner, cid, mid, dict(values), now_ms()))

    async def save_answers(self, writes: list[AnswerWrite]) -> Saved:
        """The answer writer's batched flush (batch.py): one transaction for every answer
        streaming at once. StoreUnavailable when it should try again later."""
        async with self._write() as connection:
            return await batch.save_answers(connection, writes, now_ms())

    async def mark_interrupted(self) -> int:
        count = await self._written(lambda c: messages.mark_interrupted(c, now_ms()))
        if count:
            log.info("conversation store: %d answers cut short by the last shutdown marked interrupted", count)
        return count

    async def search(self, owner: str, query: str, *, limit: int = 30) -> list[dict[str, Any]]:
        async with self._read() as connection:
            return await search_messages(connection, self.backend, owner, shapes.storable(query), limit)

    async def export(self, owner: str, ids: list[str] | None = None) -> dict[str, Any]:
        async with self._read() as connection:
            return await transfer.export(connection, owner, ids, now_ms())

    async def import_document(self, owner: str, document: dict[str, Any]) -> dict[str, int]:
        return await self._written(lambda c: transfer.import_document(c, owner, document, self.limits))

    async def delete_owner(self, owner: str) -> dict[str, int]:
        return await self._written(lambda c: conversations.remove_owner(c, owner))

    async def usage(self, owner: str) -> dict[str, int]:
        async with self._read() as connection:
            return quotas.usage(await quotas.totals(connection, owner), self.limits)


async def open_store(url: str, limits: StoreLimits) -> Store:
    """Migrated to this code's head; StoreOpenError when Rill must not start on it."""
    return Store(await open_engine(url), limits)


def _conflict(error: exc.DBAPIError) -> bool:
    return isinstance(error, exc.IntegrityError) or getattr(error.orig, "sqlstate", None) in CONFLICTS


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID.fullmatch(value) is not None
