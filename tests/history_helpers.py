"""Helpers for the history tests: a store on a real database, answers of stored
conversations started on the real registry, and what the keeper published."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event

from server.access.budget import DailyBudget
from server.history.answers import AnswerKeeper
from server.keys import CONFIG, SESSION
from server.relay.generation import Generation
from server.relay.upstream import ChatRequest
from server.store import Store, StoreLimits

from .conftest import Rill

LIMITS = StoreLimits(max_conversations=100, max_messages=1000, max_bytes=10_000_000, max_message_chars=100_000)


@dataclass
class Feed:
    """Records what is published, as the change feed would carry it."""

    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def publish(self, owner: str, name: str, data: dict[str, Any]) -> None:
        self.events.append((owner, name, data))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [data for _, event_name, data in self.events if event_name == name]


def count_answer_writes(store: Store) -> Callable[[], int]:
    """How many UPDATEs of messages the store has sent since now (the writer's flushes)."""
    writes = 0

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal writes
        if statement.lstrip().upper().startswith("UPDATE MESSAGES"):
            writes += 1

    event.listen(store.sync_engine, "before_cursor_execute", seen)
    return lambda: writes


def make_keeper(rill: Rill, feed: Feed, budget: DailyBudget | None = None, **options: Any) -> AnswerKeeper:
    app = rill.app
    return AnswerKeeper(app[CONFIG], feed, budget or DailyBudget(0, None), lambda: app[SESSION], **options)


@dataclass
class Started:
    generation: Generation
    conversation: str
    user: str
    answer: str


async def start_answer(
    rill: Rill,
    store: Store,
    keeper: AnswerKeeper,
    *,
    owner: str = "local",
    principal: str | None = None,
    content: str = "Hi",
    conversation: str | None = None,
    content_before: str = "",
) -> Started:
    """A user message and its streaming answer in a stored conversation, the answer's
    generation started on the app's registry and tracked by `keeper`."""
    if conversation is None:
        summary, _ = await store.create_conversation(owner, {})
        conversation = str(summary["id"])
    user = await store.add_message(owner, conversation, {"role": "user", "content": content, "parent": None})
    answer = await store.add_message(
        owner,
        conversation,
        {"role": "assistant", "parent": user["id"], "status": "streaming", "content": content_before},
    )
    config = rill.app[CONFIG]
    provider = config.providers[0]
    chat = ChatRequest(provider=provider, model=provider.models[0], messages=({"role": "user", "content": content},))
    generation = rill.registry.start(
        rill.app[SESSION], chat, client_key="test", client_id=None, fingerprint="-", owner=principal
    )
    keeper.track(generation, owner=owner, conversation=conversation, message=answer)
    return Started(generation, conversation, user["id"], answer["id"])


async def stored_message(store: Store, owner: str, conversation: str, message: str) -> dict[str, Any]:
    found = await store.get_conversation(owner, conversation)
    assert found is not None
    return next(m for m in found["messages"] if m["id"] == message)


@dataclass
class Asked:
    conversation: str
    answer: str
    generation: str


async def ask(rill: Rill, content: str = "Hi", conversation: str | None = None) -> Asked:
    """A question in a stored conversation over the HTTP API, as the page asks it."""
    session, url = rill.session, rill.url
    if conversation is None:
        async with session.post(url / "api/conversations", json={}) as response:
            assert response.status == 201, await response.text()
            conversation = str((await response.json())["id"])
    async with session.post(
        url / f"api/conversations/{conversation}/messages", json={"parent": None, "content": content}
    ) as response:
        assert response.status == 201, await response.text()
        body = await response.json()
    return Asked(conversation, body["answer"]["id"], body["generation"]["id"])
