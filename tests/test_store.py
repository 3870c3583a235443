"""The conversation store on both backends (a SQLite file and a real PostgreSQL):
conversations, messages as a tree, owners kept apart, quotas, export and import."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from server.http.errors import ApiError
from server.store import Store, open_store

from .store_helpers import LIMITS, assistant, dump, user


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url, LIMITS)
    yield opened
    await opened.close()


async def refused(call: Any, status: int, code: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await call
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    return caught.value


async def test_create_list_get(store: Store) -> None:
    summary, created = await store.create_conversation("ann", {"id": "c1", "title": " Trip\n  plans ", "model": "m"})
    assert created
    assert summary["id"] == "c1"
    assert summary["title"] == "Trip plans"  # one line, trimmed
    assert summary["title_source"] == "user"
    assert summary["streaming"] is False
    assert summary["active"] is None
    again, created = await store.create_conversation("ann", {"id": "c1", "title": "other"})
    assert not created
    assert again == summary  # idempotent: the first one stands
    generated, _ = await store.create_conversation("ann", {})
    assert len(generated["id"]) == 16
    assert generated["title"] == ""
    assert generated["title_source"] is None
    listed = await store.list_conversations("ann")
    assert {item["id"] for item in listed} == {"c1", generated["id"]}
    conversation = await store.get_conversation("ann", "c1")
    assert conversation is not None
    assert conversation["messages"] == []
    assert set(conversation) == {*summary} - {"streaming"} | {"messages"}


async def test_list_order_and_paging(store: Store) -> None:
    for index in range(5):
        await store.create_conversation("ann", {"id": f"c{index}"})
        await store.add_message("ann", f"c{index}", user("hi"))
    await store.add_message("ann", "c1", user("again"))  # c1 is now the most recent
    listed = await store.list_conversations("ann")
    assert next(item["id"] for item in listed) == "c1"
    assert [item["updated"] for item in listed] == sorted((item["updated"] for item in listed), reverse=True)
    first = await store.list_conversations("ann", limit=2)
    assert len(first) == 2
    rest = await store.list_conversations("ann", before=first[-1]["updated"])
    assert all(item["updated"] < first[-1]["updated"] for item in rest)


async def test_messages_tree_branches_and_path(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c"})
    q1 = await store.add_message("ann", "c", user("What is 2+2?", id="q1"))
    a1 = await store.add_message("ann", "c", assistant("4", "q1", id="a1", model="m1"))
    q2 = await store.add_message("ann", "c", user("And 3+3?", "a1", id="q2"))
    # Regenerate the first answer: a sibling of a1; edit the second question: a sibling of q2.
    a1b = await store.add_message("ann", "c", assistant("four", "q1", id="a1b", status="streaming"))
    q2b = await store.add_message("ann", "c", user("And 5+5?", "a1", id="q2b"))
    assert q1["parent"] is None
    assert a1["parent"] == "q1"
    assert q2["parent"] == "a1"
    assert a1b["status"] == "streaming"
    assert q2b["parent"] == "a1"
    assert [m["id"] for m in await store.path("ann", "c", "q2")] == ["q1", "a1", "q2"]
    assert [m["id"] for m in await store.path("ann", "c", "q2b")] == ["q1", "a1", "q2b"]
    assert [m["id"] for m in await store.path("ann", "c", "a1b")] == ["q1", "a1b"]
    conversation = await store.get_conversation("ann", "c")
    assert conversation is not None
    assert conversation["active"] == "q2b"  # the last message added
    assert [m["id"] for m in conversation["messages"]] == ["q1", "a1", "q2", "a1b", "q2b"]
    (summary,) = await store.list_conversations("ann")
    assert summary["streaming"] is True
    # Switching branches.
    switched = await store.update_conversation("ann", "c", {"active": "q2"})
    assert switched is not None
    assert switched["active"] == "q2"
    await refused(store.update_conversation("ann", "c", {"active": "nope"}), 404, "message_not_found")
    await refused(store.path("ann", "c", "nope"), 404, "message_not_found")
    await refused(store.path("ann", "zz", "q1"), 404, "conversation_not_found")


async def test_add_message_is_idempotent_by_id(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c"})
    first = await store.add_message("ann", "c", user("hello", id="m1"))
    again = await store.add_message("ann", "c", user("something else", id="m1"))
    assert again == first
    assert (await store.usage("ann"))["messages"] == 1
    assert first["content"] == "hello"
    assert first["status"] == "done"


async def test_update_and_delete(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c", "title": "old"})
    await store.add_message("ann", "c", user("hi", id="m"))
    changed = await store.update_conversation("ann", "c", {"title": "New", "system": "Be brief.", "model": "x"})
    assert changed is not None
    assert (changed["title"], changed["title_source"], changed["model"]) == ("New", "user", "x")
    auto = await store.update_conversation("ann", "c", {"title": "Auto", "title_source": "auto"})
    assert auto is not None
    assert auto["title_source"] == "auto"
    conversation = await store.get_conversation("ann", "c")
    assert conversation is not None
    assert conversation["system"] == "Be brief."
    assert await store.update_conversation("ann", "zz", {"title": "x"}) is None
    assert await store.delete_conversation("ann", "c") is True
    assert await store.delete_conversation("ann", "c") is False
    assert await store.get_conversation("ann", "c") is None
    assert await store.usage("ann") | {} == await store.usage("ann")
    usage = await store.usage("ann")
    assert (usage["conversations"], usage["messages"], usage["bytes"]) == (0, 0, 0)
    assert await dump(store) == [[], []]  # the messages went with it


async def test_owners_are_kept_apart(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c", "title": "Ann's"})
    await store.add_message("ann", "c", user("secret", id="m"))
    # Bob may use the same ids: his own conversation, not Ann's.
    bob, created = await store.create_conversation("bob", {"id": "c", "title": "Bob's"})
    assert created
    assert bob["title"] == "Bob's"
    assert await store.get_conversation("eve", "c") is None
    assert await store.list_conversations("eve") == []
    await refused(store.add_message("eve", "c", user("x")), 404, "conversation_not_found")
    await refused(store.path("eve", "c", "m"), 404, "conversation_not_found")
    # Ann's message is not a parent Bob can point at, in his conversation with the same id.
    await refused(store.add_message("bob", "c", user("x", "m")), 404, "message_not_found")
    await refused(
        store.save_answer("eve", "c", "m", content="x", reasoning="", last_event_id=1), 404, "conversation_not_found"
    )
    assert await store.update_conversation("eve", "c", {"title": "mine"}) is None
    assert await store.delete_conversation("eve", "c") is False
    assert (await store.export("eve"))["conversations"] == []
    await refused(store.export("eve", ["c"]), 404, "conversation_not_found")
    ann = await store.get_conversation("ann", "c")
    assert ann is not None
    assert ann["title"] == "Ann's"
    assert len(ann["messages"]) == 1


# One database per backend for all of these (a fresh PostgreSQL database costs ~1 s).
INVALID: list[tuple[Callable[[Store], Awaitable[Any]], int, str]] = [
    (lambda s: s.create_conversation("ann", {"id": "bad id"}), 400, "bad_id"),
    (lambda s: s.create_conversation("ann", {"id": "x" * 65}), 400, "bad_id"),
    (lambda s: s.create_conversation("ann", {"title": 5}), 400, "bad_message"),
    (lambda s: s.create_conversation("ann", {"surprise": 1}), 400, "bad_message"),
    (lambda s: s.create_conversation("ann", {"system": "x" * 10_001}), 413, "message_too_long"),
    (lambda s: s.add_message("ann", "c", user("hi", id="../x")), 400, "bad_id"),
    (lambda s: s.add_message("ann", "c", {"role": "system", "content": "hi"}), 400, "bad_message"),
    (lambda s: s.add_message("ann", "c", {"role": "user", "content": 5}), 400, "bad_message"),
    (lambda s: s.add_message("ann", "c", user("hi", status="streaming")), 400, "bad_message"),
    (lambda s: s.add_message("ann", "c", assistant("hi", "m", status="later")), 400, "bad_message"),
    (lambda s: s.add_message("ann", "c", assistant("hi", "m", error={"code": 1})), 400, "bad_message"),
    (lambda s: s.add_message("ann", "c", user("hi", created="now")), 400, "bad_message"),
    (lambda s: s.add_message("ann", "c", user("x" * 10_001)), 413, "message_too_long"),
    (lambda s: s.add_message("ann", "c", user("hi", "nope")), 404, "message_not_found"),
    (lambda s: s.add_message("ann", "c", user("hi", "bad parent")), 400, "bad_id"),
    (lambda s: s.add_message("ann", "other", user("hi", "m")), 404, "message_not_found"),
    (lambda s: s.add_message("ann", "none", user("hi")), 404, "conversation_not_found"),
    (lambda s: s.add_message("bob", "c", user("hi")), 404, "conversation_not_found"),
    (lambda s: s.update_conversation("ann", "c", {"title_source": "robot"}), 400, "bad_message"),
    (lambda s: s.update_conversation("ann", "c", {"active": "m", "owner": "bob"}), 400, "bad_message"),
    (lambda s: s.update_conversation("ann", "c", {"model": ""}), 400, "bad_message"),
    (lambda s: s.update_conversation("ann", "c", {"title": "t", "active": "gone"}), 404, "message_not_found"),
    (lambda s: s.save_answer("ann", "c", "gone", content="", reasoning="", last_event_id=1), 404, "message_not_found"),
]


async def test_invalid_input_changes_nothing(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c"})
    await store.add_message("ann", "c", user("hi", id="m"))
    await store.create_conversation("ann", {"id": "other"})
    before = await dump(store)
    for index, (call, status, code) in enumerate(INVALID):
        try:
            await refused(call(store), status, code)
        except BaseException as error:
            raise AssertionError(f"case {index}: {error}") from error
        assert await dump(store) == before, f"case {index} changed the database"


async def test_quotas(store_url: str) -> None:
    limits = replace(LIMITS, max_conversations=2, max_messages=3, max_bytes=20)
    store = await open_store(store_url, limits)
    try:
        await store.create_conversation("ann", {"id": "a"})
        await store.create_conversation("ann", {"id": "b"})
        before = await dump(store)
        await refused(store.create_conversation("ann", {"id": "c"}), 409, "quota_conversations")
        await store.create_conversation("ann", {"id": "b"})  # an existing id is no new conversation
        assert await dump(store) == before
        await store.create_conversation("bob", {"id": "c"})  # quotas are per owner
        await store.add_message("ann", "a", user("0123456789", id="m1"))  # 10 bytes
        await refused(store.add_message("ann", "a", user("0123456789€", "m1")), 413, "quota_bytes")  # 13 more
        await store.add_message("ann", "a", assistant("", "m1", id="a1", status="streaming"))
        await store.add_message("ann", "b", user("x", id="m2"))
        before = await dump(store)
        await refused(store.add_message("ann", "b", user("y", "m2")), 409, "quota_messages")
        assert await dump(store) == before
        # Over quota: the accepted answer is still saved, and reads and deletes work.
        await store.save_answer(
            "ann", "a", "a1", content="a long answer, far past 20 bytes", reasoning="", last_event_id=9
        )
        usage = await store.usage("ann")
        assert usage["bytes"] > usage["max_bytes"]
        assert (usage["conversations"], usage["messages"]) == (2, 3)
        assert (await store.get_conversation("ann", "a")) is not None
        assert (await store.export("ann"))["conversations"]
        assert await store.delete_conversation("ann", "a")
        usage = await store.usage("ann")
        assert (usage["conversations"], usage["messages"], usage["bytes"]) == (1, 1, 1)
        await store.add_message("ann", "b", user("fits again", "m2"))
    finally:
        await store.close()


async def test_save_answer_keeps_bytes_and_fields(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c"})
    await store.add_message("ann", "c", user("hi", id="q"))
    await store.add_message("ann", "c", assistant("", "q", id="a", status="streaming", generation="g1"))
    await store.save_answer("ann", "c", "a", content="Hello", reasoning="hm", last_event_id=4)
    await store.save_answer(
        "ann",
        "c",
        "a",
        content="Hello, 世界\x00",
        reasoning="hmm",
        last_event_id=9,
        status="length",
        finish_reason="length",
        error={"code": "upstream_cut", "message": "cut", "retryable": True},
        usage={"total_tokens": 12},
    )
    conversation = await store.get_conversation("ann", "c")
    assert conversation is not None
    answer = conversation["messages"][1]
    assert answer["content"] == "Hello, 世界\ufffd"  # NUL cannot be stored in PostgreSQL text
    assert (answer["status"], answer["finish_reason"], answer["last_event_id"]) == ("length", "length", 9)
    assert answer["error"] == {"code": "upstream_cut", "message": "cut", "retryable": True}
    assert answer["usage"] == {"total_tokens": 12}
    assert answer["generation"] == "g1"
    assert (await store.usage("ann"))["bytes"] == len(b"hi") + len("Hello, 世界\ufffdhmm".encode())


async def test_mark_interrupted(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c"})
    await store.add_message("ann", "c", user("hi", id="q"))
    await store.add_message("ann", "c", assistant("", "q", id="a", status="streaming"))
    await store.save_answer("ann", "c", "a", content="half an ans", reasoning="", last_event_id=3)
    await store.create_conversation("bob", {"id": "c"})
    await store.add_message("bob", "c", user("hi", id="q"))
    await store.add_message("bob", "c", assistant("", "q", id="a", status="streaming"))
    await store.add_message("bob", "c", assistant("done", "q", id="b", status="done"))
    assert await store.mark_interrupted() == 2
    assert await store.mark_interrupted() == 0
    ann = await store.get_conversation("ann", "c")
    assert ann is not None
    assert ann["messages"][1]["status"] == "interrupted"
    assert ann["messages"][1]["content"] == "half an ans"  # text kept
    assert [item["streaming"] for item in await store.list_conversations("bob")] == [False]


async def _populate(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c1", "title": "First", "system": "Be kind.", "model": "m"})
    await store.add_message("ann", "c1", user("你好世界", id="q1"))
    await store.add_message("ann", "c1", assistant("Hi!", "q1", id="a1", status="done", usage={"total_tokens": 3}))
    await store.add_message("ann", "c1", assistant("Hey", "q1", id="a2", status="error"))
    await store.save_answer(
        "ann",
        "c1",
        "a2",
        content="Hey",
        reasoning="thinking",
        last_event_id=5,
        status="error",
        error={"code": "upstream_cut", "message": "The stream ended early.", "retryable": True},
    )
    await store.update_conversation("ann", "c1", {"active": "a1"})
    await store.create_conversation("ann", {"id": "c2"})
    await store.add_message("ann", "c2", user("second", id="q1"))
    await store.create_conversation("bob", {"id": "c1", "title": "Bob's"})


async def test_export_delete_import_round_trip(store: Store) -> None:
    await _populate(store)
    exported = await store.export("ann")
    assert exported["format"] == "rill.conversations"
    assert exported["version"] == 1
    assert [c["id"] for c in exported["conversations"]] == ["c2", "c1"]
    first = exported["conversations"][1]
    assert first["active"] == "a1"
    assert first["system"] == "Be kind."
    assert [m["id"] for m in first["messages"]] == ["q1", "a1", "a2"]
    usage = await store.usage("ann")
    # Through JSON, as the HTTP API carries it.
    document = json.loads(json.dumps(exported))
    for conversation in document["conversations"]:
        assert await store.delete_conversation("ann", conversation["id"])
    assert await store.import_document("ann", document) == {"conversations": 2, "messages": 4}
    again = await store.export("ann")
    assert again | {"exported": 0} == exported | {"exported": 0}
    assert await store.usage("ann") == usage
    one = await store.export("ann", ["c1"])
    assert [c["id"] for c in one["conversations"]] == ["c1"]
    bob = await store.export("bob")
    assert [c["title"] for c in bob["conversations"]] == ["Bob's"]


async def test_import_is_idempotent_and_merges(store: Store) -> None:
    await _populate(store)
    document = json.loads(json.dumps(await store.export("ann")))
    before = await dump(store)
    assert await store.import_document("ann", document) == {"conversations": 0, "messages": 0}
    assert await dump(store) == before
    # Another device added a branch: importing its export adds only what is missing.
    first = document["conversations"][1]
    first["messages"].append(dict(first["messages"][1], id="a3", content="Hello!", parent="q1"))
    first["messages"][0]["content"] = "changed"  # an existing message is left as it is
    assert await store.import_document("ann", document) == {"conversations": 0, "messages": 1}
    conversation = await store.get_conversation("ann", "c1")
    assert conversation is not None
    assert [m["content"] for m in conversation["messages"]] == ["你好世界", "Hi!", "Hey", "Hello!"]
    # Into another owner's namespace, the same ids are new conversations.
    assert await store.import_document("cat", document) == {"conversations": 2, "messages": 5}


async def test_import_streaming_answer_becomes_interrupted(store: Store) -> None:
    await store.create_conversation("ann", {"id": "c"})
    await store.add_message("ann", "c", user("hi", id="q"))
    await store.add_message("ann", "c", assistant("partial", "q", id="a", status="streaming"))
    document = await store.export("ann")
    await store.delete_conversation("ann", "c")
    await store.import_document("ann", document)
    conversation = await store.get_conversation("ann", "c")
    assert conversation is not None
    assert conversation["messages"][1]["status"] == "interrupted"


def _document(*messages: dict[str, Any], **conversation: Any) -> dict[str, Any]:
    base = {
        "id": "c",
        "title": "",
        "title_source": None,
        "system": "",
        "model": None,
        "active": None,
        "created": 1,
        "updated": 2,
        "messages": [_message(**m) for m in messages],
    }
    return {"format": "rill.conversations", "version": 1, "exported": 3, "conversations": [base | conversation]}


def _message(**fields: Any) -> dict[str, Any]:
    return {
        "id": "m",
        "parent": None,
        "role": "user",
        "content": "hi",
        "reasoning": "",
        "status": "done",
        "model": None,
        "finish_reason": None,
        "error": None,
        "usage": None,
        "generation": None,
        "last_event_id": 0,
        "created": 1,
        "updated": 1,
    } | fields


BAD_DOCUMENTS: list[tuple[Any, str]] = [
    ([], "bad_document"),
    ({"format": "other", "version": 1, "conversations": []}, "bad_document"),
    ({"format": "rill.conversations", "version": 2, "conversations": []}, "bad_document"),
    ({"format": "rill.conversations", "version": 1, "conversations": {}}, "bad_document"),
    (_document(id="bad id"), "bad_document"),
    (_document(created="yesterday"), "bad_document"),
    (_document(title_source="robot"), "bad_document"),
    (_document(active="nope"), "bad_document"),
    (_document({"id": "a", "parent": "b"}, {"id": "b", "parent": "a"}), "bad_document"),  # a cycle
    (_document({"id": "a", "parent": "b"}, {"id": "b"}), "bad_document"),  # a forward reference
    (_document({"id": "a", "parent": "a"}), "bad_document"),  # its own parent
    (_document({"id": "a"}, {"id": "a"}), "bad_document"),  # the same id twice
    (_document({"id": "a", "parent": "elsewhere"}), "bad_document"),
    (_document({"id": "a", "role": "system"}), "bad_document"),
    (_document({"id": "a", "status": "streaming"}), "bad_document"),  # a user message is done
    (_document({"id": "a", "usage": []}), "bad_document"),
    (_document({"id": "a", "surprise": 1}), "bad_document"),
    ({"format": "rill.conversations", "version": 1, "conversations": [{"id": "c"}]}, "bad_document"),
    (_document({"id": "a", "content": "x" * 10_001}), "message_too_long"),
]


async def test_import_refuses_bad_documents_whole(store: Store) -> None:
    await store.create_conversation("ann", {"id": "keep"})
    before = await dump(store)
    good = _document({"id": "ok"}, id="good")["conversations"][0]
    for index, (document, code) in enumerate(BAD_DOCUMENTS):
        if isinstance(document, dict) and isinstance(document.get("conversations"), list):
            # A good conversation before the bad one: not written either.
            document = document | {"conversations": [good, *document["conversations"]]}
        status = 413 if code == "message_too_long" else 400
        try:
            error = await refused(store.import_document("ann", document), status, code)
        except BaseException as failure:
            raise AssertionError(f"document {index}: {failure}") from failure
        assert error.message
        assert await dump(store) == before, f"document {index} changed the database"


async def test_import_respects_quotas(store_url: str) -> None:
    store = await open_store(store_url, replace(LIMITS, max_conversations=1, max_messages=2))
    try:
        before = await dump(store)
        await refused(
            store.import_document(
                "ann", _document({"id": "a"}, {"id": "b", "parent": "a"}, {"id": "c", "parent": "b"})
            ),
            409,
            "quota_messages",
        )
        two = _document()
        two["conversations"].append(dict(two["conversations"][0], id="d"))
        await refused(store.import_document("ann", two), 409, "quota_conversations")
        assert await dump(store) == before
        assert await store.import_document("ann", _document({"id": "a"}, {"id": "b", "parent": "a"})) == {
            "conversations": 1,
            "messages": 2,
        }
    finally:
        await store.close()


async def test_delete_owner(store: Store) -> None:
    await _populate(store)
    assert await store.search("ann", "世界")
    assert await store.delete_owner("ann") == {"conversations": 2, "messages": 4}
    assert await store.search("ann", "世界") == []
    assert await store.search("ann", "First") == []
    assert await store.list_conversations("ann") == []
    usage = await store.usage("ann")
    assert (usage["conversations"], usage["messages"], usage["bytes"]) == (0, 0, 0)
    conversations, messages = await dump(store)
    assert len(conversations) == 1
    assert messages == []
    assert await store.delete_owner("ann") == {"conversations": 0, "messages": 0}


async def test_concurrent_writes_with_the_same_ids(store: Store) -> None:
    """Two devices (or a retry racing the original) sending the same ids at once: one row
    each, both callers get it."""
    results = await asyncio.gather(*(store.create_conversation("ann", {"id": "c"}) for _ in range(8)))
    assert sum(created for _, created in results) == 1
    assert len({json.dumps(summary, sort_keys=True) for summary, _ in results}) == 1
    added = await asyncio.gather(*(store.add_message("ann", "c", user("hi", id="m")) for _ in range(8)))
    assert all(message == added[0] for message in added)
    document = _document({"id": "a"}, {"id": "b", "parent": "a"}, id="d")
    imported = await asyncio.gather(*(store.import_document("ann", document) for _ in range(4)))
    assert sorted(result["messages"] for result in imported) == [0, 0, 0, 2]
    usage = await store.usage("ann")
    assert (usage["conversations"], usage["messages"]) == (2, 3)


async def test_cancelled_writes_still_land_whole(store_url: str) -> None:
    """A caller cancelled mid-write (shutdown, a client gone) gets its CancelledError at
    once; the write itself commits whole (the client's retry by id then finds it), its
    connection goes back to the pool, and close() waits for it."""
    store = await open_store(store_url, LIMITS)
    try:
        await store.create_conversation("ann", {"id": "c"})
        for index, delay in enumerate((0, 0.0005, 0.001, 0.002, 0.005)):
            task = asyncio.create_task(store.add_message("ann", "c", user("x" * 5000, id=f"m{index}")))
            await asyncio.sleep(delay)
            if task.cancel():  # not done yet (a write can take less than the delay)
                with pytest.raises(asyncio.CancelledError):
                    await task
        await store.add_message("ann", "c", user("after", id="after"))
    finally:
        await store.close()
    store = await open_store(store_url, LIMITS)
    try:
        conversation = await store.get_conversation("ann", "c")
        assert conversation is not None
        assert sorted(m["id"] for m in conversation["messages"]) == ["after", "m0", "m1", "m2", "m3", "m4"]
        assert (await store.usage("ann"))["bytes"] == 5 * 5000 + len("after")
    finally:
        await store.close()


async def test_deletes_racing_answer_saves(store: Store) -> None:
    """A conversation deleted while its answers are being saved (another device deletes
    it mid-answer): each save either lands before the delete or finds it gone (404); never
    a deadlock or another error."""
    for round_ in range(15):
        cid = f"c{round_}"
        await store.create_conversation("ann", {"id": cid})
        await store.add_message("ann", cid, user("hi", id="q"))
        for index in range(3):
            await store.add_message("ann", cid, assistant("", "q", id=f"a{index}", status="streaming"))

        async def save(index: int, cid: str = cid) -> None:
            for step in range(4):
                text = "word " * (step + 1) * 50
                await store.save_answer("ann", cid, f"a{index}", content=text, reasoning="", last_event_id=step)

        results = await asyncio.gather(
            *(save(index) for index in range(3)),
            store.delete_conversation("ann", cid),
            store.add_message("ann", cid, user("more", "q")),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                assert isinstance(result, ApiError), repr(result)
                assert result.code in ("conversation_not_found", "message_not_found"), result.code
        assert await store.get_conversation("ann", cid) is None
    usage = await store.usage("ann")
    assert (usage["conversations"], usage["messages"], usage["bytes"]) == (0, 0, 0)
