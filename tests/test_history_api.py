"""The conversations API against a real database (a SQLite file, a real PostgreSQL) with
the real app and the fake upstream: CRUD, owners, answers built from the stored branch,
idempotency, refusals that change nothing, export/import, delete-all, the change feed."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from server.history.context import CONTINUE_PROMPT
from server.keys import BUDGET, OPEN_STREAMS, STORE
from server.store import Store, StoreUnavailable

from .conftest import Rill, StartRill, wait_for
from .fakes import ReadEvent, Reply, StreamReader, answer, chunk

ALICE = "alice-0123456789abcdefghij"
BOB = "bob-0123456789abcdefghijkl"
TOKENS = {"RILL_ACCESS_TOKENS": f"alice:{ALICE}\nbob:{BOB}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def hist(start_rill: StartRill, store_url: str) -> Rill:
    # No automatic titles: they would be one more request to the fake upstream.
    return await start_rill(storage={"url": store_url, "auto_titles": False, "save_interval": 0.1})


async def call(
    rill: Rill, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with rill.session.request(method, rill.url.join(URL(path)), json=body, headers=headers) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text and response.content_type == "application/json" else text)


def store_of(rill: Rill) -> Store:
    return rill.app[STORE]


async def new_conversation(rill: Rill, headers: dict[str, str] | None = None, **fields: Any) -> str:
    status, body = await call(rill, "POST", "/api/conversations", fields, headers)
    assert status == 201, body
    return str(body["id"])


async def ask(rill: Rill, cid: str, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    status, reply = await call(rill, "POST", f"/api/conversations/{cid}/messages", body, headers)
    assert status == 201, reply
    return dict(reply)


async def settled(rill: Rill, cid: str, mid: str, owner: str = "local") -> dict[str, Any]:
    """The answer once the writer has saved its end."""
    async with asyncio.timeout(5):
        while True:
            conversation = await store_of(rill).get_conversation(owner, cid)
            assert conversation is not None
            message = next(m for m in conversation["messages"] if m["id"] == mid)
            if message["status"] != "streaming":
                return dict(message)
            await asyncio.sleep(0.02)


def replies(rill: Rill, *texts: str) -> None:
    rill.fake.script(*(Reply(chunks=answer([text])) for text in texts))


def sent(rill: Rill, index: int = -1) -> list[dict[str, str]]:
    """The messages the model API received in one request."""
    return list(rill.fake.requests[index].body["messages"])


async def wait_requests(rill: Rill, count: int) -> None:
    async with asyncio.timeout(5):
        while len(rill.fake.requests) < count:
            await asyncio.sleep(0.01)


# --- the basics ----------------------------------------------------------------------------


async def test_history_says_whether_conversations_are_stored(start_rill: StartRill, store_url: str) -> None:
    off = await start_rill()  # the tests' configs have no state directory: storage is off
    assert await call(off, "GET", "/api/history") == (
        200,
        {"enabled": False, "owner": "local", "usage": None, "auto_titles": False},
    )
    status, body = await call(off, "GET", "/api/conversations")
    assert (status, body["error"]["code"]) == (404, "history_disabled")
    status, body = await call(off, "GET", "/api/changes")
    assert (status, body["error"]["code"]) == (404, "history_disabled")

    on = await start_rill(storage={"url": store_url, "auto_titles": False})
    status, body = await call(on, "GET", "/api/history")
    assert status == 200
    assert (body["enabled"], body["owner"], body["auto_titles"]) == (True, "local", False)
    assert body["usage"]["conversations"] == 0
    assert body["usage"]["max_conversations"] == 10_000


async def test_conversation_crud(hist: Rill) -> None:
    status, created = await call(
        hist, "POST", "/api/conversations", {"id": "c1", "title": "First", "system": "Be brief."}
    )
    assert status == 201
    assert (created["id"], created["title"], created["title_source"], created["system"]) == (
        "c1",
        "First",
        "user",
        "Be brief.",
    )
    assert created["streaming"] is False
    status, again = await call(hist, "POST", "/api/conversations", {"id": "c1", "title": "First"})
    assert (status, again["id"]) == (200, "c1")

    made = await new_conversation(hist)  # the server makes the id
    assert len(made) == 16

    status, listed = await call(hist, "GET", "/api/conversations")
    assert status == 200
    assert {c["id"] for c in listed["conversations"]} == {"c1", made}
    assert listed["next"] is None
    status, page = await call(hist, "GET", "/api/conversations?limit=1")
    assert len(page["conversations"]) == 1
    assert page["next"] == page["conversations"][0]["updated"]

    status, renamed = await call(hist, "PATCH", "/api/conversations/c1", {"title": "Renamed", "model": "fake-reasoner"})
    assert status == 200
    assert (renamed["title"], renamed["title_source"], renamed["model"]) == ("Renamed", "user", "fake-reasoner")
    status, full = await call(hist, "GET", "/api/conversations/c1")
    assert status == 200
    assert (full["title"], full["system"], full["messages"]) == ("Renamed", "Be brief.", [])

    assert (await call(hist, "DELETE", "/api/conversations/c1"))[0] == 204
    status, body = await call(hist, "GET", "/api/conversations/c1")
    assert (status, body["error"]["code"]) == (404, "conversation_not_found")
    status, body = await call(hist, "DELETE", "/api/conversations/c1")
    assert (status, body["error"]["code"]) == (404, "conversation_not_found")


async def test_owners_never_see_each_other(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(environ=TOKENS, storage={"url": store_url})
    alice, bob = bearer(ALICE), bearer(BOB)
    cid = await new_conversation(rill, alice, id="shared-id", title="Alice's")
    reply = await ask(rill, cid, alice, content="Hi", client_id=str(uuid.uuid4()))
    # Bob may use the same public id for his own conversation: ids are per owner.
    assert await new_conversation(rill, bob, id="shared-id", title="Bob's") == "shared-id"

    status, mine = await call(rill, "GET", "/api/conversations/shared-id", headers=bob)
    assert (status, mine["title"], mine["messages"]) == (200, "Bob's", [])
    assert (await call(rill, "GET", "/api/history", headers=bob))[1]["owner"] == "bob"
    other = "other-conv"
    await new_conversation(rill, alice, id=other)
    for method, path, body in [
        ("GET", f"/api/conversations/{other}", None),
        ("PATCH", f"/api/conversations/{other}", {"title": "Mine now"}),
        ("DELETE", f"/api/conversations/{other}", None),
        ("POST", f"/api/conversations/{other}/messages", {"content": "Hi"}),
        ("GET", f"/api/conversations/{other}/export", None),
    ]:
        status, error = await call(rill, method, path, body, bob)
        assert (status, error["error"]["code"]) == (404, "conversation_not_found"), (method, path)
    # A parent from Alice's conversation is no parent in Bob's.
    status, error = await call(
        rill, "POST", "/api/conversations/shared-id/messages", {"content": "x", "parent": reply["answer"]["id"]}, bob
    )
    assert (status, error["error"]["code"]) == (404, "message_not_found")
    status, listed = await call(rill, "GET", "/api/conversations", headers=bob)
    assert [c["title"] for c in listed["conversations"]] == ["Bob's"]
    status, exported = await call(rill, "GET", "/api/export", headers=bob)
    assert [c["title"] for c in exported["conversations"]] == ["Bob's"]
    # Alice's are untouched.
    status, hers = await call(rill, "GET", f"/api/conversations/{other}", headers=alice)
    assert status == 200
    assert hers["title"] == ""
    status, hers = await call(rill, "GET", "/api/conversations/shared-id", headers=alice)
    assert hers["title"] == "Alice's"
    assert len(hers["messages"]) == 2


# --- answering from the stored branch ------------------------------------------------------


async def test_the_model_gets_the_stored_branch(hist: Rill) -> None:
    replies(hist, "A1", "A2", "A1 again")
    cid = await new_conversation(hist, system="Be brief.")
    first = await ask(hist, cid, content="Q1", client_id=str(uuid.uuid4()))
    q1, a1 = first["message"], first["answer"]
    assert (q1["role"], q1["content"], q1["parent"], q1["status"]) == ("user", "Q1", None, "done")
    assert (a1["role"], a1["parent"], a1["status"], a1["model"]) == ("assistant", q1["id"], "streaming", "fake-chat")
    assert first["generation"] == {"id": a1["generation"], "events": f"/api/chat/{a1['generation']}/events"}
    await wait_requests(hist, 1)
    assert sent(hist) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]
    assert (await settled(hist, cid, a1["id"]))["content"] == "A1"

    second = await ask(hist, cid, parent=a1["id"], content="Q2", model="fake-reasoner")
    await wait_requests(hist, 2)
    assert sent(hist) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert hist.fake.requests[-1].body["model"] == "fake-model-r"
    await settled(hist, cid, second["answer"]["id"])

    # Regenerate A1: a sibling answer to Q1; Q2 and A2 stay on the other branch.
    again = await ask(hist, cid, regenerate=a1["id"])
    assert again["message"] is None
    assert again["answer"]["parent"] == q1["id"]
    assert again["answer"]["id"] != a1["id"]
    await wait_requests(hist, 3)
    assert sent(hist) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]
    await settled(hist, cid, again["answer"]["id"])

    # Edit Q2: a new question under A1; only the active path is sent.
    edited = await ask(hist, cid, parent=a1["id"], content="Q2 edited")
    await wait_requests(hist, 4)
    assert sent(hist)[-2:] == [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2 edited"}]
    assert "Q2" not in [m["content"] for m in sent(hist)]

    status, full = await call(hist, "GET", f"/api/conversations/{cid}")
    assert full["active"] == edited["answer"]["id"]
    ids = [m["id"] for m in full["messages"]]
    assert len(ids) == 7
    assert len(set(ids)) == 7
    # Switching back to the first branch is a PATCH of `active`.
    status, summary = await call(hist, "PATCH", f"/api/conversations/{cid}", {"active": second["answer"]["id"]})
    assert (status, summary["active"]) == (200, second["answer"]["id"])
    status, markdown = await call(hist, "GET", f"/api/conversations/{cid}/export?format=markdown")
    assert status == 200
    assert markdown == (
        "# Q1\n\n> **System prompt:** Be brief.\n\n## You\n\nQ1\n\n## Assistant (Fake chat)\n\nA1\n\n"
        "## You\n\nQ2\n\n## Assistant (Fake reasoner)\n\nA2\n"
    )


async def test_the_first_message_makes_its_conversation(hist: Rill, other_session: aiohttp.ClientSession) -> None:
    """The page's new chat: one POST makes the conversation (with the fields given in
    `conversation`) and its first question and answer; sent again, nothing more is made."""
    replies(hist, "A1")
    feed = await open_changes(hist, other_session)
    await first_id(feed)
    body = {
        "content": "Q1",
        "client_id": str(uuid.uuid4()),
        "conversation": {"title": "Mine", "system": "Be brief.", "model": "fake-reasoner"},
    }
    status, first = await call(hist, "POST", "/api/conversations/c-new/messages", body)
    assert status == 201, first
    # The other device hears of it as of any other: the question, the answer, the conversation.
    added = [await feed.next_event(timeout=1.0) for _ in range(3)]
    assert [(e.event if e else None) for e in added] == ["message", "message", "conversation"]
    assert added[2] is not None
    assert (added[2].data["id"], added[2].data["title"], added[2].data["streaming"]) == ("c-new", "Mine", True)
    await wait_requests(hist, 1)
    assert sent(hist) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]
    assert hist.fake.requests[0].body["model"] == "fake-model-r"  # the conversation's model
    await settled(hist, "c-new", first["answer"]["id"])
    status, again = await call(hist, "POST", "/api/conversations/c-new/messages", body)
    assert status == 200
    assert (again["message"]["id"], again["answer"]["id"]) == (first["message"]["id"], first["answer"]["id"])
    status, full = await call(hist, "GET", "/api/conversations/c-new")
    assert (full["title"], full["title_source"], full["system"], full["model"]) == (
        "Mine",
        "user",
        "Be brief.",
        "fake-reasoner",
    )
    assert [(m["role"], m["content"]) for m in full["messages"]] == [("user", "Q1"), ("assistant", "A1")]
    assert len(hist.fake.requests) == 1
    # Once it exists, `conversation` changes nothing of it.
    status, later = await call(
        hist,
        "POST",
        "/api/conversations/c-new/messages",
        {"content": "Q2", "parent": first["answer"]["id"], "conversation": {"title": "Other"}},
    )
    assert status == 201
    await settled(hist, "c-new", later["answer"]["id"])
    assert (await call(hist, "GET", "/api/conversations/c-new"))[1]["title"] == "Mine"
    # A question at the root again (a new first version), sent as a first message: the
    # stored conversation's settings are what the model gets, not the ones sent.
    replies(hist, "A1 again")
    status, again_first = await call(
        hist, "POST", "/api/conversations/c-new/messages", {"content": "Q1b", "conversation": {"system": "Ignored."}}
    )
    assert status == 201
    await wait_requests(hist, 3)
    assert sent(hist) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1b"}]
    assert again_first["message"]["parent"] is None
    await settled(hist, "c-new", again_first["answer"]["id"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"content": "Q"}, 404, "conversation_not_found"),  # without `conversation`: no such conversation
        ({"content": "Q", "conversation": 5}, 400, "bad_message"),
        ({"content": "Q", "conversation": {"owner": "bob"}}, 400, "unknown_field"),
        ({"content": "Q", "conversation": {"system": ["x"]}}, 400, "invalid_system"),
        ({"content": "Q", "conversation": {"model": "nope"}}, 400, "unknown_model"),
        ({"content": "Q", "parent": "m1", "conversation": {}}, 404, "message_not_found"),
        ({"regenerate": "m1", "conversation": {}}, 404, "conversation_not_found"),
    ],
)
async def test_a_refused_first_message_makes_nothing(hist: Rill, body: Any, status: int, code: str) -> None:
    got = await call(hist, "POST", "/api/conversations/c-none/messages", body)
    assert (got[0], got[1]["error"]["code"]) == (status, code), got
    assert (await store_of(hist).export("local"))["conversations"] == []
    assert hist.fake.requests == []


async def test_the_conversation_quota_refuses_a_first_message(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(storage={"url": store_url, "auto_titles": False, "max_conversations": 1})
    await new_conversation(rill, id="c-only")
    before = await store_of(rill).export("local")
    status, error = await call(rill, "POST", "/api/conversations/c-two/messages", {"content": "Hi", "conversation": {}})
    assert (status, error["error"]["code"]) == (409, "quota_conversations")
    assert (await store_of(rill).export("local"))["conversations"] == before["conversations"]
    assert rill.fake.requests == []


async def test_continue_sends_the_partial_answer_and_keeps_the_message(hist: Rill) -> None:
    cid = await new_conversation(hist)
    # The first answer stops half-way (Stop); the continuation stays open.
    hist.fake.script(
        Reply(chunks=[chunk("", reasoning=""), chunk("Roses are")], end="hang"),
        Reply(chunks=[chunk("", reasoning="")], end="hang"),
    )
    first = await ask(hist, cid, content="Write a poem")
    answer_id = first["answer"]["id"]
    reader = StreamReader(await hist.session.get(hist.url / first["generation"]["events"].lstrip("/")))
    hist.readers.append(reader)
    await reader.read_until("delta")
    assert (await call(hist, "DELETE", f"/api/chat/{first['generation']['id']}"))[0] == 200
    stopped = await settled(hist, cid, answer_id)
    assert (stopped["status"], stopped["content"]) == ("stopped", "Roses are")
    status, error = await call(hist, "POST", f"/api/conversations/{cid}/messages", {"continue": first["message"]["id"]})
    assert (status, error["error"]["code"]) == (400, "bad_target")  # a question cannot be continued

    more = await ask(hist, cid, **{"continue": answer_id})
    assert more["answer"]["finish_reason"] is None
    assert more["message"] is None
    assert (more["answer"]["id"], more["answer"]["content"], more["answer"]["status"]) == (
        answer_id,
        "Roses are",
        "streaming",
    )
    await wait_requests(hist, 2)
    assert sent(hist) == [
        {"role": "user", "content": "Write a poem"},
        {"role": "assistant", "content": "Roses are"},
        {"role": "user", "content": CONTINUE_PROMPT},
    ]
    status, full = await call(hist, "GET", f"/api/conversations/{cid}")
    assert len(full["messages"]) == 2
    stored = full["messages"][1]
    assert (stored["status"], stored["generation"]) == ("streaming", more["generation"]["id"])
    status, error = await call(hist, "POST", f"/api/conversations/{cid}/messages", {"continue": answer_id})
    assert (status, error["error"]["code"]) == (400, "bad_target")  # still streaming
    assert len(hist.fake.requests) == 2


async def test_a_repeated_continue_asks_the_model_once(hist: Rill) -> None:
    hist.fake.script(
        Reply(chunks=answer(["Half"], finish="length")), Reply(chunks=[chunk("", reasoning="")], end="hang")
    )
    cid = await new_conversation(hist)
    first = await ask(hist, cid, content="Long story")
    assert (await settled(hist, cid, first["answer"]["id"]))["status"] == "length"
    body = {"continue": first["answer"]["id"], "client_id": str(uuid.uuid4())}
    status, more = await call(hist, "POST", f"/api/conversations/{cid}/messages", body)
    assert status == 201
    status, again = await call(hist, "POST", f"/api/conversations/{cid}/messages", body)
    assert status == 200
    # The same answer and generation (its saved text and times may have moved on meanwhile).
    assert (again["message"], again["generation"]) == (None, more["generation"])
    assert (again["answer"]["id"], again["answer"]["generation"]) == (first["answer"]["id"], more["generation"]["id"])
    assert len(hist.fake.requests) == 2


async def test_the_same_client_id_asks_the_model_once(hist: Rill) -> None:
    hist.fake.default = Reply(chunks=answer(["slow"], delay=0.3))
    cid = await new_conversation(hist)
    body = {"content": "Hi", "client_id": str(uuid.uuid4())}
    first = await ask(hist, cid, content="Hi", client_id=body["client_id"])
    status, repeated = await call(hist, "POST", f"/api/conversations/{cid}/messages", body)
    assert status == 200
    assert repeated == first
    status, error = await call(hist, "POST", f"/api/conversations/{cid}/messages", {**body, "content": "Other"})
    assert (status, error["error"]["code"]) == (409, "client_id_reused")
    await asyncio.sleep(0.1)
    assert len(hist.fake.requests) == 1
    status, full = await call(hist, "GET", f"/api/conversations/{cid}")
    assert len(full["messages"]) == 2
    # The generation follows like any other.
    response = await hist.session.get(hist.url / first["generation"]["events"].lstrip("/"))
    reader = StreamReader(response)
    events = await reader.read_all()
    assert events[-1].event == "done"
    response.close()


async def test_a_failed_write_asks_no_model_and_a_retry_starts_again(
    hist: Rill, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generation is made (its limits checked) before the write and launched only once
    the rows are in: when the write fails, the model was never asked, and the retry with
    the same client_id starts it."""
    store = store_of(hist)
    cid = await new_conversation(hist)
    real_add = store.add_exchange
    calls = 0

    async def add_failing_once(*args: Any, **options: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.2)  # time enough for an upstream request, had one been sent
            raise StoreUnavailable()
        return await real_add(*args, **options)

    monkeypatch.setattr(store, "add_exchange", add_failing_once)
    body = {"content": "Hi", "client_id": str(uuid.uuid4())}
    status, error = await call(hist, "POST", f"/api/conversations/{cid}/messages", body)
    assert (status, error["error"]["code"]) == (503, "storage_unavailable")
    assert hist.fake.requests == []
    assert hist.registry.find_by_client_id(body["client_id"]) is None  # given back whole
    assert hist.registry.live() == []
    again = await ask(hist, cid, content="Hi", client_id=body["client_id"])
    assert (await settled(hist, cid, again["answer"]["id"]))["content"] == "Hello world"
    status, full = await call(hist, "GET", f"/api/conversations/{cid}")
    assert [m["role"] for m in full["messages"]] == ["user", "assistant"]  # the question once


BAD_BODIES: list[tuple[Any, int, str]] = [
    ({"content": "x", "surprise": 1}, 400, "unknown_field"),
    ({}, 400, "bad_message"),
    ({"content": "x", "regenerate": "a"}, 400, "bad_message"),
    ({"content": "   "}, 400, "invalid_content"),
    ({"content": 5}, 400, "invalid_content"),
    ({"content": "x", "parent": "../etc"}, 400, "bad_id"),
    ({"content": "x", "parent": "nope"}, 404, "message_not_found"),
    ({"content": "x", "id": "a" * 65}, 400, "bad_id"),
    ({"content": "x", "answer_id": ""}, 400, "bad_id"),
    ({"content": "x", "model": "gpt-none"}, 400, "unknown_model"),
    ({"content": "x", "model": 3}, 400, "invalid_model"),
    ({"content": "x", "options": {"temperature": 9}}, 400, "invalid_temperature"),
    ({"content": "x", "options": {"max_tokens": 10**9}}, 400, "max_tokens_too_high"),
    ({"content": "x", "client_id": "not-a-uuid"}, 400, "invalid_client_id"),
    ({"content": "x" * 100_001}, 400, "invalid_content"),
    ({"regenerate": "nope"}, 404, "message_not_found"),
    ({"regenerate": "m-user"}, 400, "bad_target"),
    ({"continue": "m-answer"}, 400, "bad_target"),  # done, not stopped
    ({"regenerate": "m-answer", "parent": None}, 400, "bad_message"),
    ("[1, 2]", 400, "invalid_body"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_BODIES)
async def test_bad_messages_change_nothing(hist: Rill, body: Any, status: int, code: str) -> None:
    store = store_of(hist)
    cid = await new_conversation(hist, id="c-bad")
    await store.add_message("local", cid, {"id": "m-user", "parent": None, "role": "user", "content": "Q"})
    await store.add_message(
        "local", cid, {"id": "m-answer", "parent": "m-user", "role": "assistant", "content": "A", "status": "done"}
    )
    before = await store.export("local")
    if isinstance(body, str):
        async with hist.session.post(
            hist.url / f"api/conversations/{cid}/messages", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            got = (response.status, await response.json())
    else:
        got = await call(hist, "POST", f"/api/conversations/{cid}/messages", body)
    assert (got[0], got[1]["error"]["code"]) == (status, code), got
    after = await store.export("local")
    assert after["conversations"] == before["conversations"]
    assert hist.fake.requests == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/api/conversations", {"id": "bad id"}, 400, "bad_id"),
        ("POST", "/api/conversations", {"title": 5}, 400, "invalid_title"),
        ("POST", "/api/conversations", {"title": "t" * 501}, 400, "invalid_title"),
        ("POST", "/api/conversations", {"system": ["x"]}, 400, "invalid_system"),
        ("POST", "/api/conversations", {"model": "nope"}, 400, "unknown_model"),
        ("POST", "/api/conversations", {"owner": "bob"}, 400, "unknown_field"),
        ("PATCH", "/api/conversations/c-keep", {"active": "nope"}, 404, "message_not_found"),
        ("PATCH", "/api/conversations/c-keep", {"active": "a b"}, 400, "bad_id"),
        ("PATCH", "/api/conversations/c-keep", {"messages": []}, 400, "unknown_field"),
        ("PATCH", "/api/conversations/c-keep", {"title": "\ud800"}, 400, "invalid_title"),
        ("GET", "/api/conversations?limit=0", None, 400, "invalid_query"),
        ("GET", "/api/conversations?before=-1", None, 400, "invalid_query"),
        ("GET", "/api/conversations/c-keep/export?format=pdf", None, 400, "invalid_query"),
        ("GET", "/api/search?q=", None, 400, "invalid_query"),
        (
            "POST",
            "/api/import",
            {"format": "rill.conversations", "version": 99, "conversations": []},
            400,
            "bad_document",
        ),
        ("POST", "/api/import", {"conversations": [{"id": "x"}]}, 400, "bad_document"),
        ("GET", "/api/conversations/a%20b", None, 400, "bad_id"),
    ],
)
async def test_bad_requests_change_nothing(
    hist: Rill, method: str, path: str, body: Any, status: int, code: str
) -> None:
    store = store_of(hist)
    await new_conversation(hist, id="c-keep", title="Keep")
    before = await store.export("local")
    got = await call(hist, method, path, body)
    assert (got[0], got[1]["error"]["code"]) == (status, code), got
    assert (await store.export("local"))["conversations"] == before["conversations"]


# --- export, import, delete-all -------------------------------------------------------------


async def test_export_delete_import_round_trip(hist: Rill) -> None:
    cid = await new_conversation(hist, title="Trip", system="S")
    first = await ask(hist, cid, content="你好世界")
    await settled(hist, cid, first["answer"]["id"])
    again = await ask(hist, cid, regenerate=first["answer"]["id"])
    await settled(hist, cid, again["answer"]["id"])
    await new_conversation(hist, id="empty-one")
    status, exported = await call(hist, "GET", "/api/export")
    assert status == 200
    assert exported["format"] == "rill.conversations"
    assert len(exported["conversations"]) == 2

    status, counts = await call(hist, "DELETE", "/api/data")
    assert (status, counts) == (200, {"conversations": 2, "messages": 3})
    assert (await call(hist, "GET", "/api/conversations"))[1]["conversations"] == []

    status, counts = await call(hist, "POST", "/api/import", exported)
    assert (status, counts) == (200, {"conversations": 2, "messages": 3})
    status, again = await call(hist, "GET", "/api/export")
    del exported["exported"], again["exported"]
    # Imported answers nobody writes any more show as interrupted; everything else is identical.
    for conversation in exported["conversations"]:
        for message in conversation["messages"]:
            if message["status"] == "streaming":
                message["status"] = "interrupted"
    assert again == exported
    status, counts = await call(hist, "POST", "/api/import", exported)  # idempotent by ids
    assert (status, counts) == (200, {"conversations": 0, "messages": 0})
    assert (await call(hist, "GET", "/api/export"))[1]["conversations"] == again["conversations"]

    async with hist.session.get(hist.url / f"api/conversations/{cid}/export", params={"format": "json"}) as response:
        assert response.status == 200
        assert 'filename="Trip.json"' in response.headers["Content-Disposition"]
        one = await response.json()
    assert [c["id"] for c in one["conversations"]] == [cid]


async def test_search_finds_messages(hist: Rill) -> None:
    cid = await new_conversation(hist, title="Greetings")
    await ask(hist, cid, content="你好世界 and hello")
    status, body = await call(hist, "GET", "/api/search?q=世界")
    assert status == 200
    assert [r["conversation"] for r in body["results"]] == [cid]


# --- the change feed -----------------------------------------------------------------------


async def open_changes(
    rill: Rill, session: aiohttp.ClientSession, last_event_id: str | None = None, headers: dict[str, str] | None = None
) -> StreamReader:
    headers = dict(headers or {})
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    response = await session.get(rill.url / "api/changes", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    reader = StreamReader(response)
    rill.readers.append(reader)
    return reader


@pytest.fixture
async def other_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def first_id(reader: StreamReader) -> str:
    """The id the stream starts from (an id-only block: nothing dispatched)."""
    async with asyncio.timeout(5):
        while not reader.parser.last_event_id:
            piece = await reader.response.content.readany()
            reader.raw += piece
            reader.parser.feed(piece)
    return reader.parser.last_event_id


async def test_changes_reach_another_client_within_a_second(hist: Rill, other_session: aiohttp.ClientSession) -> None:
    feed = await open_changes(hist, other_session)
    start_id = await first_id(feed)
    cid = await new_conversation(hist, title="Phone")
    event = await feed.next_event(timeout=1.0)
    assert event is not None
    assert event.event == "conversation"
    assert (event.data["id"], event.data["title"]) == (cid, "Phone")

    await call(hist, "PATCH", f"/api/conversations/{cid}", {"title": "Renamed"})
    renamed = await feed.next_event(timeout=1.0)
    assert renamed is not None
    assert (renamed.event, renamed.data["title"]) == ("conversation", "Renamed")
    reply = await ask(hist, cid, content="Hi")
    added = [await feed.next_event(timeout=1.0) for _ in range(3)]
    assert [(e.event if e else None) for e in added] == ["message", "message", "conversation"]
    assert added[0] is not None
    assert added[0].data == {"conversation": cid, "message": reply["message"]}
    assert added[2] is not None
    assert added[2].data["streaming"] is True
    # The writer's events follow (`saved`, the answer's text, the conversation at its end).
    written = await settled(hist, cid, reply["answer"]["id"])
    later: list[ReadEvent] = []
    while not later or later[-1].event != "conversation":
        next_one = await feed.next_event(timeout=1.0)
        assert next_one is not None
        later.append(next_one)
    assert ("message", {"conversation": cid, "message": written}) in [(e.event, e.data) for e in later]
    await call(hist, "DELETE", f"/api/conversations/{cid}")
    deleted = await feed.next_event(timeout=1.0)
    assert deleted is not None
    assert (deleted.event, deleted.data) == ("deleted", {"id": cid})

    # Resume: from the first id, everything since comes again, in order.
    feed.response.close()
    before = [event, renamed, *added, *later, deleted]
    again = await open_changes(hist, other_session, start_id)
    resent = [await again.next_event(timeout=1.0) for _ in before]
    assert [(e.id, e.event, e.data) for e in resent if e] == [(e.id, e.event, e.data) for e in before if e]


async def test_deleting_a_conversation_while_its_answer_streams(hist: Rill) -> None:
    hist.fake.script(Reply(chunks=answer(["word "] * 200, delay=0.01)))
    cid = await new_conversation(hist)
    reply = await ask(hist, cid, content="A long one, please")
    await asyncio.sleep(0.35)  # a few of the writer's saves (every 0.1 s) have happened
    status, body = await call(hist, "DELETE", f"/api/conversations/{cid}")
    assert status == 204, body
    assert (await call(hist, "GET", f"/api/conversations/{cid}"))[0] == 404
    generation = hist.registry.get(reply["generation"]["id"])
    assert generation is not None
    await asyncio.wait_for(generation.wait_closed(), 1)  # stopped: nobody would ever read the rest
    assert generation.terminal is not None
    assert json.loads(generation.terminal.data) == {"finish_reason": "cancelled"}
    await asyncio.sleep(0.3)  # the writer's last save finds nothing to write into
    assert (await store_of(hist).export("local"))["conversations"] == []
    assert (await store_of(hist).usage("local"))["messages"] == 0  # nothing written back after the delete


@pytest.mark.parametrize("last_id", ["nonsense", "deadbeef.1", "0.0", "999999999.5"])
async def test_unknown_last_event_id_gets_reset(hist: Rill, last_id: str) -> None:
    feed = await open_changes(hist, hist.session, last_id)
    event = await feed.next_event(timeout=1.0)
    assert event is not None
    assert (event.event, event.data) == ("reset", {})
    await new_conversation(hist)
    event = await feed.next_event(timeout=1.0)
    assert event is not None
    assert event.event == "conversation"


async def test_changes_are_owner_scoped(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(environ=TOKENS, storage={"url": store_url})
    bobs = await open_changes(rill, rill.session, headers=bearer(BOB))
    alices = await open_changes(rill, rill.session, headers=bearer(ALICE))
    await first_id(bobs)
    await first_id(alices)
    await new_conversation(rill, bearer(ALICE), title="Secret")
    event = await alices.next_event(timeout=1.0)
    assert event is not None
    assert event.data["title"] == "Secret"
    await new_conversation(rill, bearer(BOB), title="Bob's")
    event = await bobs.next_event(timeout=1.0)
    assert event is not None
    assert event.data["title"] == "Bob's"
    assert b"Secret" not in bobs.raw


async def test_changes_count_toward_the_stream_limit(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(storage={"url": store_url}, limits={"max_streams_per_client": 2})
    await open_changes(rill, rill.session)
    await open_changes(rill, rill.session)
    async with rill.session.get(rill.url / "api/changes") as response:
        assert response.status == 429
        assert (await response.json())["error"]["code"] == "too_many_streams"


async def test_delete_all_and_import_tell_the_feed_to_reset(hist: Rill, other_session: aiohttp.ClientSession) -> None:
    await new_conversation(hist)
    feed = await open_changes(hist, other_session)
    await first_id(feed)
    await call(hist, "DELETE", "/api/data")
    event = await feed.next_event(timeout=1.0)
    assert event is not None
    assert event.event == "reset"


async def test_import_takes_more_than_a_chat_request(hist: Rill) -> None:
    big = "x" * 90_000
    conversations = [
        {
            "id": f"c{i}",
            "title": f"Big {i}",
            "title_source": "user",
            "system": "",
            "model": None,
            "active": f"m{i}",
            "created": 1,
            "updated": 1 + i,
            "messages": [
                {
                    "id": f"m{i}",
                    "parent": None,
                    "role": "user",
                    "content": big,
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
                }
            ],
        }
        for i in range(20)
    ]
    document = {"format": "rill.conversations", "version": 1, "exported": 1, "conversations": conversations}
    assert len(json.dumps(document)) > 1_048_576  # over max_body_bytes
    assert await post_big(hist, "api/import", document) == (200, {"conversations": 20, "messages": 20})
    status, error = await post_big(hist, "api/chat", {"messages": [{"role": "user", "content": big * 12}]})
    assert (status, error["error"]["code"]) == (413, "body_too_large")  # other requests keep their limit


async def post_big(rill: Rill, path: str, body: Any) -> tuple[int, Any]:
    data = io.BytesIO(json.dumps(body).encode())  # aiohttp warns about large bytes bodies
    headers = {"Content-Type": "application/json"}
    async with rill.session.post(rill.url / path, data=data, headers=headers) as response:
        return response.status, await response.json()


async def test_change_streams_get_heartbeats_and_are_let_go(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(storage={"url": store_url}, stream={"heartbeat_interval": 0.2})
    feed = await open_changes(rill, rill.session)
    await first_id(feed)
    streams = rill.app[OPEN_STREAMS]
    assert len(streams) == 1
    async with asyncio.timeout(3):
        while b": hb\r\n" not in feed.raw:
            feed.raw += await feed.response.content.readany()
    feed.response.close()  # the tab goes away: the monitor notices, the stream is let go
    await wait_for(lambda: len(streams) == 0)


async def test_shutdown_ends_change_streams(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(storage={"url": store_url})
    feed = await open_changes(rill, rill.session)
    await first_id(feed)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await rill.runner.cleanup()
    assert loop.time() - started < 2  # not the shutdown_timeout wait for streams that never end
    assert await feed.next_event(timeout=1.0) is None  # the stream ended cleanly


async def test_another_site_may_rename_only_when_allowed(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(
        environ=TOKENS, storage={"url": store_url}, access={"cors_origins": ["https://app.example.com"]}
    )
    cid = await new_conversation(rill, bearer(ALICE), title="Old")
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "PATCH"}
    async with rill.session.options(rill.url / f"api/conversations/{cid}", headers=preflight) as response:
        assert response.status == 204
        assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
    rename = {"title": "New"}
    evil = bearer(ALICE) | {"Origin": "https://evil.example"}
    status, body = await call(rill, "PATCH", f"/api/conversations/{cid}", rename, evil)
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    assert (await call(rill, "GET", f"/api/conversations/{cid}", headers=bearer(ALICE)))[1]["title"] == "Old"
    allowed = bearer(ALICE) | {"Origin": "https://app.example.com"}
    assert (await call(rill, "PATCH", f"/api/conversations/{cid}", rename, allowed))[0] == 200


async def test_quotas_refuse_before_the_model_is_asked(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(
        storage={"url": store_url, "auto_titles": False, "max_conversations": 1, "max_messages": 3, "max_bytes": 100}
    )
    cid = await new_conversation(rill)
    status, error = await call(rill, "POST", "/api/conversations", {})
    assert (status, error["error"]["code"]) == (409, "quota_conversations")
    first = await ask(rill, cid, content="Hi")
    await settled(rill, cid, first["answer"]["id"])
    store = store_of(rill)
    before = await store.export("local")
    status, error = await call(
        rill, "POST", f"/api/conversations/{cid}/messages", {"content": "Again", "parent": first["answer"]["id"]}
    )
    assert (status, error["error"]["code"]) == (409, "quota_messages")  # 2 stored + 2 would pass 3
    assert (await store.export("local"))["conversations"] == before["conversations"]
    assert len(rill.fake.requests) == 1
    # Over quota, reading and deleting still work.
    assert (await call(rill, "GET", f"/api/conversations/{cid}"))[0] == 200
    assert (await call(rill, "DELETE", f"/api/conversations/{cid}"))[0] == 204
    assert await new_conversation(rill)


async def test_a_refused_message_gives_back_its_budget_hold(start_rill: StartRill, store_url: str) -> None:
    """The answer's budget hold is taken before the write; a refusal gives it back."""
    rill = await start_rill(
        environ=TOKENS, access={"daily_token_budget": 100_000}, storage={"url": store_url, "max_bytes": 10}
    )
    cid = await new_conversation(rill, bearer(ALICE))
    status, error = await call(
        rill, "POST", f"/api/conversations/{cid}/messages", {"content": "世界" * 2}, bearer(ALICE)
    )
    assert (status, error["error"]["code"]) == (413, "quota_bytes")
    assert rill.app[BUDGET].held("alice") == 0
    assert rill.registry.live() == []
    assert rill.fake.requests == []


async def test_the_byte_quota_refuses_a_long_question(start_rill: StartRill, store_url: str) -> None:
    rill = await start_rill(storage={"url": store_url, "auto_titles": False, "max_bytes": 10})
    cid = await new_conversation(rill)
    status, error = await call(rill, "POST", f"/api/conversations/{cid}/messages", {"content": "世界" * 2})  # 12 bytes
    assert (status, error["error"]["code"]) == (413, "quota_bytes")
    assert (await call(rill, "GET", f"/api/conversations/{cid}"))[1]["messages"] == []
    assert rill.fake.requests == []
