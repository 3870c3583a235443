"""Conversations kept on the server, seen from the page: two browser contexts signed in
with the same token are two devices of one person; another token is someone else."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Request

from server.keys import STORE
from server.store import StoreUnavailable

from .browser import ANSWER, WatchedPage, answer_text, send, wait_answer_ended, watch
from .conftest import Rill, StartRill
from .fakes import Reply, answer, chunk
from .test_ui_access import EXPECTED_401, models_loaded, open_locked, sign_in

TOKEN = "alice-0123456789abcdefghij"
OTHER_TOKEN = "bob-0123456789abcdefghijkl"
TOKENS = {"RILL_ACCESS_TOKENS": f"alice:{TOKEN},bob:{OTHER_TOKEN}"}

SIDEBAR = "#conversations .conversation-open"


async def start(start_rill: StartRill) -> Rill:
    return await start_rill(environ=TOKENS)


async def device(browser: Browser, rill: Rill, token: str = TOKEN) -> WatchedPage:
    """A browser of its own (its own localStorage and cookies), signed in with token."""
    ui = await open_locked(browser, rill)
    ui.page.set_default_timeout(10_000)
    await sign_in(ui.page, token)
    await models_loaded(ui.page)
    return ui


async def sidebar_titles(page: Page) -> list[str]:
    return [text.strip() for text in await page.locator(SIDEBAR).all_inner_texts()]


async def shown_messages(page: Page) -> list[tuple[str, str]]:
    """(role, text) of every message on screen, as a user reads them."""
    result = await page.evaluate(
        """() => [...document.querySelectorAll("#messages .message")].map((element) => [
             element.classList.contains("user") ? "user" : "assistant",
             element.querySelector(".message-body").innerText.trim(),
           ])"""
    )
    return [(str(role), str(text)) for role, text in result]


async def server_conversations(rill: Rill, token: str = TOKEN) -> list[dict[str, Any]]:
    """Every conversation the server keeps for token's owner, in full."""
    headers = {"Authorization": f"Bearer {token}"}
    async with rill.session.get(rill.url / "api/conversations", headers=headers) as response:
        assert response.status == 200, await response.text()
        summaries = (await response.json())["conversations"]
    conversations = []
    for summary in summaries:
        async with rill.session.get(rill.url / f"api/conversations/{summary['id']}", headers=headers) as response:
            assert response.status == 200
            conversations.append(await response.json())
    return conversations


async def stored_answer_ended(rill: Rill) -> list[dict[str, Any]]:
    """The messages of the only conversation, once the server has written its answer's end."""
    async with asyncio.timeout(5):
        while True:
            messages: list[dict[str, Any]] = (await server_conversations(rill))[0]["messages"]
            if messages[-1]["status"] != "streaming":
                return messages
            await asyncio.sleep(0.1)


async def test_a_conversation_written_on_one_device_appears_on_the_other(
    start_rill: StartRill, browser: Browser
) -> None:
    rill = await start(start_rill)
    laptop = await device(browser, rill)
    phone = await device(browser, rill)
    assert await sidebar_titles(phone.page) == []

    await send(laptop.page, "Written on the laptop")
    await wait_answer_ended(laptop.page)
    # No reload: the phone's sidebar hears of it from the change feed.
    await phone.page.locator(SIDEBAR, has_text="Written on the laptop").wait_for()
    await phone.page.locator(SIDEBAR, has_text="Written on the laptop").click()
    await phone.page.locator(".message.assistant", has_text="Hello world").wait_for()
    assert await shown_messages(phone.page) == [("user", "Written on the laptop"), ("assistant", "Hello world")]

    # The phone continues it; the laptop, which has it open, shows the new turn.
    rill.fake.script(Reply(chunks=answer(["Second", " answer"])))
    await send(phone.page, "And from the phone")
    await wait_answer_ended(phone.page)
    await laptop.page.locator(".message.assistant", has_text="Second answer").wait_for()
    assert await shown_messages(laptop.page) == [
        ("user", "Written on the laptop"),
        ("assistant", "Hello world"),
        ("user", "And from the phone"),
        ("assistant", "Second answer"),
    ]

    # A rename on one is the title on the other; a delete removes it there too.
    item = laptop.page.locator("#conversations .conversation").first
    await item.locator("[data-action=rename]").click()
    await laptop.page.locator(".rename-input").fill("Renamed on the laptop")
    await laptop.page.locator(".rename-input").press("Enter")
    await phone.page.locator(SIDEBAR, has_text="Renamed on the laptop").wait_for()
    await phone.page.locator("#chat-title", has_text="Renamed on the laptop").wait_for()

    delete = phone.page.locator("#conversations [data-action=delete]")
    await delete.click()
    await delete.click()
    await laptop.page.locator(SIDEBAR).wait_for(state="detached")
    await laptop.page.locator("#empty-chat").wait_for()
    assert await server_conversations(rill) == []
    assert len(rill.fake.requests) == 2
    for ui in (laptop, phone):
        await ui.assert_clean()


async def test_an_answer_started_on_one_device_streams_live_on_the_other(
    start_rill: StartRill, browser: Browser
) -> None:
    rill = await start(start_rill)
    words = [f"word{i} " for i in range(80)]
    rill.fake.script(Reply(chunks=answer(words, delay=0.05)))
    laptop = await device(browser, rill)
    phone = await device(browser, rill)
    streams: list[str] = []

    def on_request(request: Request) -> None:
        if "/api/chat/" in request.url and "/events" in request.url:
            streams.append(request.url)

    phone.page.on("request", on_request)

    await send(laptop.page, "Long one")
    await laptop.page.locator(ANSWER).get_by_text("word3").wait_for()
    # Before opening it, the phone's sidebar marks it as answering.
    await phone.page.locator("#conversations .conversation.streaming", has_text="Long one").wait_for()
    await phone.page.locator(SIDEBAR, has_text="Long one").click()
    # The phone shows the text saved so far, then the rest as the model writes it.
    await phone.page.locator(ANSWER).get_by_text("word20").wait_for()
    assert await phone.page.locator(".message.assistant.streaming").count() == 1
    assert await phone.page.locator("#stop").is_visible()
    shown_early = await answer_text(phone.page)
    assert "word79" not in shown_early

    await wait_answer_ended(phone.page, timeout=15)
    await wait_answer_ended(laptop.page, timeout=15)
    full = "".join(words).strip()
    assert (await answer_text(phone.page)).strip() == full
    assert (await answer_text(laptop.page)).strip() == full
    assert len(rill.fake.requests) == 1, "the second device asked the model again"
    assert len(streams) >= 1, "the phone followed the generation itself"
    stored = await stored_answer_ended(rill)
    assert [m["content"].strip() for m in stored] == ["Long one", full]
    assert stored[1]["status"] == "done"
    for ui in (laptop, phone):
        await ui.assert_clean()


async def test_stop_on_the_other_device_stops_the_answer(start_rill: StartRill, browser: Browser) -> None:
    rill = await start(start_rill)
    rill.fake.script(Reply(chunks=[chunk("Going on")], end="hang"))
    laptop = await device(browser, rill)
    phone = await device(browser, rill)
    await send(laptop.page, "Talk forever")
    await laptop.page.locator(ANSWER).get_by_text("Going on").wait_for()
    await phone.page.locator(SIDEBAR, has_text="Talk forever").click()
    await phone.page.locator(ANSWER).get_by_text("Going on").wait_for()

    await phone.page.click("#stop")
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 5)
    for ui in (laptop, phone):
        await ui.page.locator(f"{ANSWER} >> .message-status").get_by_text("Stopped").wait_for()
        assert await ui.page.locator("#send").is_visible()
        await ui.assert_clean()


async def test_a_cleared_local_storage_brings_everything_back(start_rill: StartRill, browser: Browser) -> None:
    rill = await start(start_rill)
    ui = await device(browser, rill)
    page = ui.page
    await send(page, "First question")
    await wait_answer_ended(page)
    await page.click("#new-chat")
    await send(page, "Second question")
    await wait_answer_ended(page)

    await page.evaluate("() => localStorage.clear()")
    await page.reload()
    await models_loaded(page)
    await page.locator(SIDEBAR, has_text="First question").wait_for()
    assert await sidebar_titles(page) == ["Second question", "First question"]
    await page.locator(SIDEBAR, has_text="First question").click()
    await page.locator(".message.assistant", has_text="Hello world").wait_for()
    assert await shown_messages(page) == [("user", "First question"), ("assistant", "Hello world")]
    # The cache fills again: what the page opens with next time.
    cached = await ui.stored_conversations()
    assert "First question" in [c["messages"][0]["content"] for c in cached if c["messages"]]
    await ui.assert_clean()


# The page's localStorage before conversations were kept on the server (rill.v1).
OLD_CONVERSATIONS = [
    {
        "id": "0123456789abcdef",
        "title": "Kept title",
        "titled": True,
        "created": 1_700_000_000_000,
        "updated": 1_700_000_100_000,
        "model": "fake-chat",
        "system": "Be brief.",
        "messages": [
            {"id": "a000000000000001", "role": "user", "content": "Old question 你好世界"},
            {"id": "a000000000000002", "role": "assistant", "content": "Old answer", "status": "done"},
            {"id": "a000000000000003", "role": "user", "content": "Follow-up"},
            {
                "id": "a000000000000004",
                "role": "assistant",
                "content": "Half an answ",
                "status": "streaming",
                "pending": {"body": None, "generation": "0" * 32, "lastEventId": 4, "stopRequested": False},
            },
        ],
    },
    {
        "id": "fedcba9876543210",
        "title": "",
        "titled": False,
        "created": 1_700_000_200_000,
        "updated": 1_700_000_300_000,
        "model": None,
        "system": "",
        "messages": [
            {"id": "b000000000000001", "role": "user", "content": "Second old chat"},
            {
                "id": "b000000000000002",
                "role": "assistant",
                "content": "",
                "status": "error",
                "error": {"code": "upstream_error", "message": "Boom", "retryable": True},
            },
        ],
    },
]


def old_storage_script(conversations: list[dict[str, Any]]) -> str:
    """Fills localStorage as the page before server history left it, once (not on reloads)."""
    items = {f"rill.v1.conversation.{c['id']}": json.dumps(c) for c in conversations}
    index = [{"id": c["id"], "title": c["title"], "updated": c["updated"]} for c in conversations]
    items["rill.v1.conversations"] = json.dumps(index)
    return f"""
      if (!sessionStorage.getItem("filled")) {{
        sessionStorage.setItem("filled", "1");
        for (const [key, value] of Object.entries({json.dumps(items)})) localStorage.setItem(key, value);
      }}
    """


async def test_an_old_local_storage_is_uploaded_once_and_seen_on_another_device(
    start_rill: StartRill, browser: Browser
) -> None:
    rill = await start(start_rill)
    context = await browser.new_context()
    await context.add_init_script(old_storage_script(OLD_CONVERSATIONS))
    imports: list[dict[str, Any]] = []

    def on_request(request: Request) -> None:
        if request.url.endswith("/api/import"):
            imports.append(dict(request.post_data_json or {}))

    context.on("request", on_request)
    laptop = await watch(await context.new_page())
    laptop.allowed_console.append(EXPECTED_401)
    laptop.page.set_default_timeout(10_000)
    await laptop.page.goto(str(rill.url))
    await sign_in(laptop.page, TOKEN)
    await models_loaded(laptop.page)
    await laptop.page.locator(SIDEBAR, has_text="Kept title").wait_for()
    assert len(imports) == 1
    uploaded = imports[0]
    assert uploaded["format"] == "rill.conversations"
    chain = uploaded["conversations"][0]["messages"]
    assert [m["parent"] for m in chain] == [None, "a000000000000001", "a000000000000002", "a000000000000003"]

    # Every message is on the server, in its order, with its ids.
    stored = {c["id"]: c for c in await server_conversations(rill)}
    assert set(stored) == {"0123456789abcdef", "fedcba9876543210"}
    first = stored["0123456789abcdef"]
    assert first["title"] == "Kept title"
    assert first["system"] == "Be brief."
    assert [(m["id"], m["content"]) for m in first["messages"]] == [
        ("a000000000000001", "Old question 你好世界"),
        ("a000000000000002", "Old answer"),
        ("a000000000000003", "Follow-up"),
        ("a000000000000004", "Half an answ"),
    ]
    assert first["messages"][3]["status"] == "interrupted"
    assert stored["fedcba9876543210"]["messages"][1]["error"]["code"] == "upstream_error"

    # A second device sees every message, and the interrupted answer offers Continue.
    phone = await device(browser, rill)
    await phone.page.locator(SIDEBAR, has_text="Kept title").click()
    await phone.page.locator(".message.assistant", has_text="Half an answ").wait_for()
    assert await shown_messages(phone.page) == [
        ("user", "Old question 你好世界"),
        ("assistant", "Old answer"),
        ("user", "Follow-up"),
        ("assistant", "Half an answ"),
    ]
    await phone.page.locator(f"{ANSWER} >> [data-action=continue]").wait_for()
    await phone.page.locator(SIDEBAR, has_text="Second old chat").click()
    await phone.page.locator(".message.user", has_text="Second old chat").wait_for()

    # Continue goes on writing into the same answer, on the server.
    await phone.page.locator(SIDEBAR, has_text="Kept title").click()
    await phone.page.locator(f"{ANSWER} >> [data-action=continue]").click()
    await wait_answer_ended(phone.page)
    assert await answer_text(phone.page) == "Half an answHello world"
    sent = [m["content"] for m in rill.fake.requests[0].body["messages"]]
    assert "Half an answ" in sent, "Continue sent the context without the text kept"

    # Reloading does not upload again.
    await laptop.page.reload()
    await models_loaded(laptop.page)
    await laptop.page.locator(SIDEBAR, has_text="Kept title").wait_for()
    assert len(imports) == 1
    for ui in (laptop, phone):
        await ui.assert_clean()


async def test_another_token_sees_nothing(start_rill: StartRill, browser: Browser) -> None:
    rill = await start(start_rill)
    alice = await device(browser, rill)
    await send(alice.page, "Alice's secret")
    await wait_answer_ended(alice.page)
    conversation_id = (await server_conversations(rill))[0]["id"]

    bob = await device(browser, rill, OTHER_TOKEN)
    await asyncio.sleep(0.5)  # time for a change feed to bring anything it (wrongly) would
    assert await sidebar_titles(bob.page) == []
    status = await bob.page.evaluate(
        "(id) => fetch('/api/conversations/' + id).then((response) => response.status)", conversation_id
    )
    assert status == 404
    assert await server_conversations(rill, OTHER_TOKEN) == []

    # Bob writes; Alice's sidebar does not hear of it.
    await send(bob.page, "Bob's own")
    await wait_answer_ended(bob.page)
    await asyncio.sleep(0.5)
    assert await sidebar_titles(alice.page) == ["Alice's secret"]
    bob.allowed_console.append("404")
    for ui in (alice, bob):
        await ui.assert_clean()


async def test_an_answer_the_database_cannot_take_says_not_saved_yet_until_it_can(
    start_rill: StartRill, browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rill = await start_rill(
        environ=TOKENS, storage={"url": f"sqlite:///{tmp_path}/down.db", "auto_titles": False, "save_interval": 0.2}
    )
    store = rill.app[STORE]
    write = store.save_answers
    down = True

    async def save_answers(writes: Any) -> Any:
        if down:
            raise StoreUnavailable()  # as when the disk is full or PostgreSQL restarts
        return await write(writes)

    monkeypatch.setattr(store, "save_answers", save_answers)
    words = [f"word{i} " for i in range(40)]
    rill.fake.script(Reply(chunks=answer(words, delay=0.05)))
    ui = await device(browser, rill)
    page = ui.page
    await send(page, "Keep this")
    unsaved = page.locator(f"{ANSWER} >> .message-status.unsaved")
    await unsaved.wait_for()
    assert "Not saved yet" in await unsaved.inner_text()
    await page.locator(ANSWER).get_by_text("word5").wait_for()  # the answer streams on meanwhile

    down = False  # the database is back: the writer's retry lands, and the page hears of it
    await unsaved.wait_for(state="detached")
    await wait_answer_ended(page)
    assert (await answer_text(page)).strip() == "".join(words).strip()
    stored = await stored_answer_ended(rill)
    assert stored[1]["content"].strip() == "".join(words).strip()
    assert len(rill.fake.requests) == 1
    await ui.assert_clean()


async def test_without_server_history_the_page_keeps_conversations_in_local_storage(
    start_rill: StartRill, browser: Browser
) -> None:
    rill = await start_rill(storage={"enabled": False})
    context = await browser.new_context()
    ui = await watch(await context.new_page())
    page = ui.page
    page.set_default_timeout(10_000)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    await page.goto(str(rill.url))
    await models_loaded(page)
    await send(page, "Only here")
    await wait_answer_ended(page)
    assert await answer_text(page) == "Hello world"
    assert [c["messages"][0]["content"] for c in await ui.stored_conversations()] == ["Only here"]
    assert any(url.endswith("/api/chat") for url in urls)
    assert not [url for url in urls if "/api/conversations" in url or "/api/changes" in url]
    assert await page.evaluate("() => localStorage.getItem('rill.v1.server')") is None
    await page.reload()
    await models_loaded(page)
    await page.locator(SIDEBAR, has_text="Only here").wait_for()
    await ui.assert_clean()
