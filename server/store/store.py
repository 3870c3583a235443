"""The Store: the one object the rest of Rill talks to about stored conversations. Each
method is one unit of work on the database's runner (runners.py); database outages
surface as StoreUnavailable (503)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine

from . import batch, conversations, exchange, messages, quotas, shapes, transfer
from .batch import AnswerWrite, Saved
from .database import open_database
from .errors import translated
from .runners import Database
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
    def __init__(self, database: Database, limits: StoreLimits) -> None:
        self.database = database
        self.limits = limits
        self.backend: str = database.backend  # "sqlite" | "postgresql"

    @property
    def sync_engine(self) -> Engine:
        return self.database.sync_engine

    async def close(self) -> None:
        await self.database.close()

    async def _read(self, work: Callable[[Connection], T], *, snapshot: bool = True) -> T:
        """snapshot=False: the statements need not see one state of the database (SQLite
        then runs each on its own, no BEGIN and rollback)."""
        async with translated():
            return await self.database.read(work, snapshot=snapshot)

    async def _written(self, work: Callable[[Connection], T]) -> T:
        """One write transaction, run again when PostgreSQL refuses it for a conflict with
        another one: the same id inserted at once (the loser then finds the winner's row:
        idempotent), or a deadlock / serialization failure (nothing was written)."""
        for attempt in range(RETRIES + 1):
            try:
                async with translated():
                    return await self.database.write(work)
            except exc.DBAPIError as error:
                if attempt == RETRIES or not _conflict(error):
                    raise
                log.info("conversation store: write conflicted with another (%s), again", type(error.orig).__name__)
        raise AssertionError("unreachable")

    async def list_conversations(
        self, owner: str, *, limit: int = 200, before: int | None = None
    ) -> list[dict[str, Any]]:
        count = max(1, min(limit, MAX_LIST))
        return await self._read(lambda c: conversations.list_summaries(c, owner, count, before))

    async def get_conversation(self, owner: str, cid: str) -> dict[str, Any] | None:
        def work(connection: Connection) -> dict[str, Any] | None:
            pk = conversations.find_pk(connection, owner, cid) if valid_id(cid) else None
            if pk is None:
                return None
            conversation = conversations.summary(connection, pk)
            del conversation["streaming"]
            conversation["messages"] = messages.of_conversation(connection, pk)
            return conversation

        return await self._read(work)

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

        def work(connection: Connection) -> dict[str, Any] | None:
            pk = conversations.find_pk(connection, owner, cid) if valid_id(cid) else None
            return None if pk is None else conversations.summary(connection, pk)

        return await self._read(work)

    async def context(self, owner: str, cid: str, leaf: str | None, ids: set[str]) -> dict[str, Any] | None:
        """What answering needs (exchange.context): {"system", "model", "path": root .. leaf,
        "messages": the leaf and `ids` found, by id}; None: no such conversation."""
        # No snapshot needed: a conversation deleted between its two statements reads as
        # one without those messages, and the write that follows finds it gone anyway.
        return await self._read(lambda c: exchange.context(c, owner, cid, leaf, ids), snapshot=False)

    async def add_exchange(
        self,
        owner: str,
        cid: str,
        question: dict[str, Any] | None,
        answer: dict[str, Any],
        *,
        create: dict[str, Any] | None = None,
        only_new: bool = False,
    ) -> dict[str, Any]:
        """A question (None: regenerate) and its answer (with its generation's id) in one
        transaction, the conversation made first when it does not exist and `create` (its
        fields) is given (only_new: it must not exist, else ConversationExists, nothing
        written). Returns {"question", "answer", "summary", "keys"} (exchange.add_exchange)."""
        return await self._written(
            lambda c: exchange.add_exchange(
                c, owner, cid, question, answer, self.limits, now_ms(), create, only_new=only_new
            )
        )

    async def path(self, owner: str, cid: str, leaf_id: str) -> list[dict[str, Any]]:
        return await self._read(lambda c: messages.path(c, owner, cid, leaf_id))

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
        return await self._written(lambda c: batch.save_answers(c, writes, now_ms()))

    async def mark_interrupted(self) -> int:
        count = await self._written(lambda c: messages.mark_interrupted(c, now_ms()))
        if count:
            log.info("conversation store: %d answers cut short by the last shutdown marked interrupted", count)
        return count

    async def search(self, owner: str, query: str, *, limit: int = 30) -> list[dict[str, Any]]:
        needle = shapes.storable(query)
        return await self._read(lambda c: search_messages(c, self.backend, owner, needle, limit))

    async def export(self, owner: str, ids: list[str] | None = None) -> dict[str, Any]:
        return await self._read(lambda c: transfer.export(c, owner, ids, now_ms()))

    async def import_document(self, owner: str, document: dict[str, Any]) -> dict[str, int]:
        return await self._written(lambda c: transfer.import_document(c, owner, document, self.limits))

    async def delete_owner(self, owner: str) -> dict[str, int]:
        return await self._written(lambda c: conversations.remove_owner(c, owner))

    async def usage(self, owner: str) -> dict[str, int]:
        return quotas.usage(await self._read(lambda c: quotas.totals(c, owner)), self.limits)


async def open_store(url: str, limits: StoreLimits) -> Store:
    """Migrated to this code's head; StoreOpenError when Rill must not start on it."""
    return Store(await open_database(url), limits)


def _conflict(error: exc.DBAPIError) -> bool:
    return isinstance(error, exc.IntegrityError) or getattr(error.orig, "sqlstate", None) in CONFLICTS


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID.fullmatch(value) is not None
