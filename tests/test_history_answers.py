"""The history's writer (server/history/answers.py) on a real database: answers of stored
conversations are written in batches as they stream, their endings with reason and usage;
they run to the end with no reader; start-up recovery marks cut-off answers interrupted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.relay.generation import SHUTDOWN_ERROR
from server.store import Store, open_store

from .conftest import Rill, StartRill, wait_for
from .fakes import USAGE, Reply, answer, chunk
from .history_helpers import LIMITS, Feed, ask, count_answer_writes, make_keeper, start_answer, stored_message

SAVE_INTERVAL = 0.2
STORAGE = {"save_interval": SAVE_INTERVAL, "auto_titles": False}


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = await open_store(store_url, LIMITS)
    yield store
    await store.close()


@pytest.fixture
async def rill(start_rill: StartRill) -> Rill:
    return await start_rill(storage=STORAGE)


async def wait_status(store: Store, started: Any, status: str, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = await stored_message(store, "local", started.conversation, started.answer)
            if message["status"] == status:
                return message
            await asyncio.sleep(0.05)


async def test_answer_is_written_in_batches_then_its_ending(rill: Rill, store: Store) -> None:
    tokens = [f"t{i} " for i in range(40)]
    rill.fake.script(Reply(chunks=answer(tokens, reasoning=["thinking "], delay=0.025)))  # ~1 s
    feed = Feed()
    keeper = make_keeper(rill, feed)
    await keeper.open(store)
    writes = count_answer_writes(store)
    started = await start_answer(rill, store, keeper)
    generation = started.generation

    # Mid-answer the database holds the text up to its last_event_id, exactly.
    await asyncio.sleep(0.5)
    middle = await stored_message(store, "local", started.conversation, started.answer)
    assert middle["status"] == "streaming"
    assert 0 < middle["last_event_id"] < len(tokens)
    upto = generation.events_after(0)[: middle["last_event_id"]]
    assert middle["content"] == "".join(json.loads(e.data)["text"] for e in upto if e.name == "delta")
    assert middle["reasoning"] == "thinking "

    final = await wait_status(store, started, "done")
    assert generation.terminal is not None
    assert final["content"] == "".join(tokens)
    assert final["reasoning"] == "thinking "
    assert final["finish_reason"] == "stop"
    assert final["usage"] == USAGE
    assert final["error"] is None
    assert final["last_event_id"] == generation.terminal.id
    # A write every save_interval and one at the end, never one per token.
    assert 3 <= writes() <= 1.0 / SAVE_INTERVAL + 4 < len(tokens)

    await wait_for(lambda: bool(feed.named("conversation")))
    [announced] = feed.named("message")
    assert announced["conversation"] == started.conversation
    assert announced["message"]["status"] == "done"
    assert announced["message"]["content"] == "".join(tokens)
    [summary] = feed.named("conversation")
    assert summary["id"] == started.conversation
    assert summary["streaming"] is False
    assert "messages" not in summary
    assert not feed.named("saved")  # every write landed: no transition to announce
    assert len(keeper) == 0
    await keeper.close()


@pytest.mark.parametrize(
    ("finish", "status"), [("length", "length"), ("content_filter", "filtered"), ("tool_calls", "done")]
)
async def test_finish_reasons_are_stored(rill: Rill, store: Store, finish: str, status: str) -> None:
    rill.fake.script(Reply(chunks=answer(["Hello", " there"], finish=finish)))
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    final = await wait_status(store, started, status)
    assert final["finish_reason"] == finish
    assert final["content"] == "Hello there"
    assert final["usage"] == USAGE
    await keeper.close()


async def test_stop_is_stored_as_stopped_with_the_text_so_far(rill: Rill, store: Store) -> None:
    rill.fake.script(Reply(chunks=[chunk("so far")], end="hang"))
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    await wait_for(lambda: started.generation.tokens == 1)
    started.generation.stop()
    final = await wait_status(store, started, "stopped")
    assert final["finish_reason"] == "cancelled"
    assert final["content"] == "so far"
    await keeper.close()


async def test_an_upstream_error_is_stored_with_its_code(rill: Rill, store: Store) -> None:
    rill.fake.script(Reply(status=400, body=b'{"error": {"message": "bad model"}}'))
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    final = await wait_status(store, started, "error")
    terminal = started.generation.terminal
    assert terminal is not None
    assert terminal.name == "error"
    code = json.loads(terminal.data)["code"]
    assert final["error"]["code"] == code
    assert code.startswith("upstream_")
    assert final["error"]["retryable"] is False
    assert final["error"]["message"]
    assert final["finish_reason"] is None
    await keeper.close()


async def test_shutdown_stores_the_answer_interrupted_and_close_writes_it(rill: Rill, store: Store) -> None:
    rill.fake.script(Reply(chunks=[chunk("half an")], end="hang"))
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    await wait_for(lambda: started.generation.tokens == 1)
    # What on_shutdown does to every live answer, then the cleanup's close().
    started.generation.fail(str(SHUTDOWN_ERROR["code"]), str(SHUTDOWN_ERROR["message"]), retryable=True)
    await keeper.close()
    final = await stored_message(store, "local", started.conversation, started.answer)
    assert final["status"] == "interrupted"
    assert final["content"] == "half an"
    assert final["error"]["code"] == "server_shutdown"


async def test_a_continued_answer_keeps_its_earlier_text(rill: Rill, store: Store) -> None:
    rill.fake.script(Reply(chunks=answer([" and", " the rest."])))
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper, content_before="The start")
    final = await wait_status(store, started, "done")
    assert final["content"] == "The start and the rest."
    await keeper.close()


async def test_a_deleted_conversation_ends_the_writing_quietly(rill: Rill, store: Store) -> None:
    rill.fake.script(Reply(chunks=answer([f"w{i}" for i in range(20)], delay=0.03)))
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    await wait_for(lambda: started.generation.tokens > 2)
    assert await store.delete_conversation("local", started.conversation)
    await wait_for(lambda: len(keeper) == 0, timeout=5)
    assert started.generation.terminal is not None or started.generation.live  # streaming goes on regardless
    await keeper.close()


# --- keep_unread --------------------------------------------------------------------------


async def test_a_stored_answer_runs_to_its_end_with_no_reader(start_rill: StartRill, store: Store) -> None:
    rill = await start_rill(storage={**STORAGE, "keep_unread": True}, stream={"resume_grace": 0.2})
    tokens = [f"k{i} " for i in range(30)]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.04)))  # ~1.2 s: six grace periods
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    reader = await rill.open_stream(started.generation.id)
    await reader.read_until("delta")
    reader.response.close()  # every reader gone
    final = await wait_status(store, started, "done")
    assert final["content"] == "".join(tokens)
    assert len(rill.fake.requests) == 1

    # Stop still stops at once.
    rill.fake.script(Reply(chunks=[chunk("x")], end="hang"))
    second = await start_answer(rill, store, keeper)
    await wait_for(lambda: second.generation.tokens == 1)
    second.generation.stop()
    assert (await wait_status(store, second, "stopped"))["content"] == "x"

    # A stateless POST /api/chat answer is abandoned as it always was.
    rill.fake.script(Reply(chunks=[chunk("alone")], end="hang"))
    generation_id = await rill.start_chat()
    stateless = rill.registry.get(generation_id)
    assert stateless is not None
    assert not stateless.keep_unread
    await wait_for(lambda: stateless.terminal is not None, timeout=3)
    assert stateless.terminal is not None
    assert json.loads(stateless.terminal.data)["code"] == "abandoned"
    await keeper.close()


async def test_without_keep_unread_a_stored_answer_is_abandoned(start_rill: StartRill, store: Store) -> None:
    rill = await start_rill(storage={**STORAGE, "keep_unread": False}, stream={"resume_grace": 0.2})
    rill.fake.script(Reply(chunks=[chunk("so far")], end="hang"))
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    started = await start_answer(rill, store, keeper)
    final = await wait_status(store, started, "abandoned")
    assert final["content"] == "so far"
    assert final["error"]["code"] == "abandoned"
    assert final["error"]["retryable"] is True
    await keeper.close()


# --- start-up recovery ------------------------------------------------------------------------


async def test_open_marks_answers_left_streaming_interrupted(rill: Rill, store: Store) -> None:
    summary, _ = await store.create_conversation("local", {})
    cid = summary["id"]
    user = await store.add_message("local", cid, {"role": "user", "content": "Q", "parent": None})
    left = await store.add_message("local", cid, {"role": "assistant", "parent": user["id"], "status": "streaming"})
    await store.save_answer("local", cid, left["id"], content="partial", reasoning="", last_event_id=7)
    keeper = make_keeper(rill, Feed())
    await keeper.open(store)
    message = await stored_message(store, "local", cid, left["id"])
    assert message["status"] == "interrupted"
    assert message["content"] == "partial"
    assert message["last_event_id"] == 7
    await keeper.close()


async def test_an_answer_asked_over_http_runs_to_its_end_with_no_reader(start_rill: StartRill, tmp_path: Path) -> None:
    # keep_unread from the generation's start: nobody ever reads this one.
    rill = await start_rill(
        storage={**STORAGE, "url": f"sqlite:///{tmp_path / 'rill.db'}"}, stream={"resume_grace": 0.2}
    )
    tokens = [f"h{i} " for i in range(25)]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.04)))  # ~1 s: five grace periods
    asked = await ask(rill)
    generation = rill.registry.get(asked.generation)
    assert generation is not None
    assert generation.keep_unread
    async with asyncio.timeout(10):
        while True:
            async with rill.session.get(rill.url / f"api/conversations/{asked.conversation}") as response:
                conversation = await response.json()
            message = next(m for m in conversation["messages"] if m["id"] == asked.answer)
            if message["status"] != "streaming":
                break
            await asyncio.sleep(0.1)
    assert message["status"] == "done"
    assert message["content"] == "".join(tokens)
