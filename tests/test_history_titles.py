"""Automatic titles (server/history/titles.py): one small request to the same model after
the first answer of an untitled conversation, cleaned, stored as "auto" unless the user
named it meanwhile, counted in the daily budget; off with [storage] auto_titles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.access.budget import DailyBudget
from server.history.titles import TITLE_MAX_CHARS, TITLE_MAX_TOKENS, clean_title
from server.store import Store, open_store

from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, answer
from .history_helpers import LIMITS, Feed, make_keeper, start_answer, stored_message

STORAGE = {"save_interval": 0.2, "auto_titles": True}


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = await open_store(store_url, LIMITS)
    yield store
    await store.close()


@pytest.fixture
async def rill(start_rill: StartRill) -> Rill:
    return await start_rill(storage=STORAGE)


async def conversation_of(store: Store, cid: str) -> dict[str, Any]:
    found = await store.get_conversation("local", cid)
    assert found is not None
    return found


async def test_the_first_answer_names_the_conversation_once_within_the_budget(rill: Rill, store: Store) -> None:
    rill.fake.script(
        Reply(chunks=answer(["Paris is", " the capital."])),
        Reply(chunks=answer(['"Title: The capital', ' of France."\n', "Another line"])),  # usage: 10 tokens
    )
    feed = Feed()
    budget = DailyBudget(1000, None)
    keeper = make_keeper(rill, feed, budget)
    await keeper.open(store)
    started = await start_answer(rill, store, keeper, principal="alice", content="What is the capital of France?")
    await wait_for(lambda: any(c["title"] for c in feed.named("conversation")), timeout=10)

    assert len(rill.fake.requests) == 2  # the answer, and exactly one title request
    body = rill.fake.requests[1].body
    assert body["model"] == "fake-model"  # the same model
    assert body["max_tokens"] == TITLE_MAX_TOKENS
    shown = "\n".join(m["content"] for m in body["messages"])
    assert "What is the capital of France?" in shown
    assert "Paris is the capital." in shown
    assert "title" in body["messages"][0]["content"].lower()

    conversation = await conversation_of(store, started.conversation)
    assert conversation["title"] == "The capital of France"
    assert conversation["title_source"] == "auto"
    [named] = [c for c in feed.named("conversation") if c["title"]]
    assert named["id"] == started.conversation
    assert named["title_source"] == "auto"
    # The title's tokens count in the daily budget (the answer's are the registry's business).
    assert budget.used("alice") == 10
    assert budget.held("alice") == 0

    # A second answer in the named conversation asks for no title.
    rill.fake.script(Reply(chunks=answer(["More."])))
    second = await start_answer(rill, store, keeper, principal="alice", conversation=started.conversation)
    await wait_for(lambda: len(feed.named("message")) == 2, timeout=10)
    await asyncio.sleep(0.2)
    assert len(rill.fake.requests) == 3
    assert (await stored_message(store, "local", started.conversation, second.answer))["status"] == "done"
    await keeper.close()


async def test_a_chinese_conversation_is_asked_in_chinese(rill: Rill, store: Store) -> None:
    rill.fake.script(Reply(chunks=answer(["你好！"])), Reply(chunks=answer(["「打招呼」"])))
    feed = Feed()
    keeper = make_keeper(rill, feed)
    await keeper.open(store)
    started = await start_answer(rill, store, keeper, content="你好世界")
    await wait_for(lambda: any(c["title"] for c in feed.named("conversation")), timeout=10)
    assert "标题" in rill.fake.requests[1].body["messages"][0]["content"]
    assert (await conversation_of(store, started.conversation))["title"] == "打招呼"
    await keeper.close()


async def test_a_title_the_user_set_meanwhile_is_kept(rill: Rill, store: Store) -> None:
    rill.fake.script(Reply(chunks=answer(["Hi."])), Reply(chunks=[0.5, *answer(["Auto title"])]))
    feed = Feed()
    keeper = make_keeper(rill, feed)
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    await wait_for(lambda: len(rill.fake.requests) == 2, timeout=10)
    await store.update_conversation("local", started.conversation, {"title": "Mine"})
    await wait_for(lambda: rill.fake.open == 0 and rill.fake.requests[1].closed.is_set(), timeout=10)
    await asyncio.sleep(0.3)
    conversation = await conversation_of(store, started.conversation)
    assert conversation["title"] == "Mine"
    assert conversation["title_source"] == "user"
    assert not [c for c in feed.named("conversation") if c["title"]]
    await keeper.close()


async def test_auto_titles_off_asks_nothing_more(start_rill: StartRill, store: Store) -> None:
    rill = await start_rill(storage={**STORAGE, "auto_titles": False})
    feed = Feed()
    keeper = make_keeper(rill, feed)
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    await wait_for(lambda: bool(feed.named("conversation")), timeout=10)
    await asyncio.sleep(0.3)
    assert len(rill.fake.requests) == 1
    assert (await conversation_of(store, started.conversation))["title"] == ""
    await keeper.close()


@pytest.mark.parametrize("why", ["upstream_error", "no_budget", "not_done"])
async def test_no_title_when_it_cannot_or_should_not_be_made(rill: Rill, store: Store, why: str) -> None:
    budget = DailyBudget(1000, None)
    if why == "upstream_error":
        rill.fake.script(Reply(chunks=answer(["Hi."])), Reply(status=400, body=b'{"error": {"message": "no"}}'))
    elif why == "no_budget":
        budget.charge("alice", 1000)  # the answer itself is the registry's; the title finds nothing left
        rill.fake.script(Reply(chunks=answer(["Hi."])))
    else:
        rill.fake.script(Reply(chunks=answer(["Hi", " and"], finish="length")))
    feed = Feed()
    keeper = make_keeper(rill, feed, budget)
    await keeper.open(store)
    started = await start_answer(rill, store, keeper, principal="alice")
    await wait_for(lambda: bool(feed.named("conversation")), timeout=10)
    await asyncio.sleep(0.3)
    expected_requests = 2 if why == "upstream_error" else 1
    assert len(rill.fake.requests) == expected_requests
    conversation = await conversation_of(store, started.conversation)
    assert conversation["title"] == ""
    assert conversation["title_source"] is None
    assert budget.held("alice") == 0
    await keeper.close()


@pytest.mark.parametrize(
    ("reply", "title"),
    [
        ('"A fine title."', "A fine title"),
        ("\n\n  Title: **Bold move**  \nsecond line", "Bold move"),
        ("标题：《你好世界》。", "你好世界"),
        ("''\nReal one", "Real one"),
        ("tab\there\x07", "tab here"),
        ("", ""),
        ('""', ""),
    ],
)
def test_clean_title(reply: str, title: str) -> None:
    assert clean_title(reply) == title


def test_a_long_title_is_cut_at_a_word() -> None:
    cleaned = clean_title("word " * 30)
    assert len(cleaned) <= TITLE_MAX_CHARS
    assert cleaned.endswith("word")
    assert len(clean_title("长" * 100)) == TITLE_MAX_CHARS
