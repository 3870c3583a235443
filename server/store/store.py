"""The Store: the one object the rest of Rill talks to about stored conversations. Each
method is one transaction; database outages surface as StoreUnavailable (503)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import batch, conversations, messages, quotas, shapes, transfer
from .batch import AnswerWrite, Saved
from .database import open_engine
from .errors import translated
from .search import search as search_messages
from .validation import ID, StoreLimits

log = logging.getLogger(__name__)

MAX_LIST = 1000


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

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with translated(), self.engine.connect() as connection:
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

    async def _retrying_race(self, attempt: Any) -> Any:
        """Idempotent writes: two callers inserting the same id at once (PostgreSQL; SQLite
        writes are serialized) -- the loser runs again and finds the winner's row."""
        try:
            return await attempt()
        except exc.IntegrityError:
            log.info("conversation store: concurrent insert of the same id, reading it back")
            return await attempt()

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
        async def attempt() -> tuple[dict[str, Any], bool]:
            async with self._write() as connection:
                return await conversations.create(connection, owner, data, self.limits, now_ms())

        return await self._retrying_race(attempt)  # type: ignore[no-any-return]

    async def update_conversation(self, owner: str, cid: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        async with self._write() as connection:
            return await conversations.change(connection, owner, cid, changes, self.limits, now_ms())

    async def delete_conversation(self, owner: str, cid: str) -> bool:
        async with self._write() as connection:
            return await conversations.remove(connection, owner, cid)

    async def add_message(self, owner: str, cid: str, message: dict[str, Any]) -> dict[str, Any]:
        async def attempt() -> dict[str, Any]:
            async with self._write() as connection:
                return await messages.add(connection, owner, cid, message, self.limits, now_ms())

        return await self._retrying_race(attempt)  # type: ignore[no-any-return]

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
        async with self._write() as connection:
            await messages.save_answer(connection, owner, cid, mid, values, now_ms())

    async def save_answers(self, writes: list[AnswerWrite]) -> Saved:
        """The answer writer's batched flush (batch.py): one transaction for every answer
        streaming at once. StoreUnavailable when it should try again later."""
        async with self._write() as connection:
            return await batch.save_answers(connection, writes, now_ms())

    async def mark_interrupted(self) -> int:
        async with self._write() as connection:
            count = await messages.mark_interrupted(connection, now_ms())
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
        async def attempt() -> dict[str, int]:
            async with self._write() as connection:
                return await transfer.import_document(connection, owner, document, self.limits)

        return await self._retrying_race(attempt)  # type: ignore[no-any-return]

    async def delete_owner(self, owner: str) -> dict[str, int]:
        async with self._write() as connection:
            return await conversations.remove_owner(connection, owner)

    async def usage(self, owner: str) -> dict[str, int]:
        async with self._read() as connection:
            return quotas.usage(await quotas.totals(connection, owner), self.limits)


async def open_store(url: str, limits: StoreLimits) -> Store:
    """Migrated to this code's head; StoreOpenError when Rill must not start on it."""
    return Store(await open_engine(url), limits)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID.fullmatch(value) is not None
