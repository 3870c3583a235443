"""The chat page streaming answers in real Chromium: tokens appear as they arrive, the
final text is exact, Stop ends the upstream request, a reload resumes the same answer."""

from __future__ import annotations

import asyncio
from typing import Any

from playwright.async_api import Request

from server.keys import OPEN_STREAMS

from .browser import ANSWER, answer_text, send, wait_answer_ended
from .conftest import OpenPage, Rill, StartRill
from .fakes import Reply, answer, chunk

# Plain paragraphs with line breaks, CJK and emoji: Markdown shows them as they are.
TEXT = "Line one\nLine two: 中文字符，标点。\n\nSecond paragraph 😀🎉 with emoji 👩‍💻 and 日本語."


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def test_tokens_appear_incrementally_and_the_final_text_is_exact(rill: Rill, open_page: OpenPage) -> None:
    rill.fake.script(Reply(chunks=answer(pieces(TEXT, 3), delay=0.06)))
    ui = await open_page(rill)
    page = ui.page

    await send(page, "Write something")
    body = page.locator(f"{ANSWER} >> .message-body")
    await page.wait_for_function(
        """() => {
          const last = [...document.querySelectorAll(".message.assistant")].pop();
          const body = last?.querySelector(".message-body");
          return last?.classList.contains("streaming") && body.innerText.length > 0;
        }"""
    )
    partial = await body.inner_text()
    upstream_still_sending = not rill.fake.requests[0].closed.is_set()

    await wait_answer_ended(page)
    final = await body.inner_text()
    assert upstream_still_sending, "text appeared only after the upstream had finished"
    assert 0 < len(partial) < len(final)
    assert final == TEXT
    stored = (await ui.stored_conversations())[0]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == TEXT
    assert stored[1]["status"] == "done"
    assert rill.fake.requests[0].body["messages"] == [{"role": "user", "content": "Write something"}]
    await ui.assert_clean()


async def test_finished_blocks_are_not_rebuilt_while_the_answer_grows(rill: Rill, open_page: OpenPage) -> None:
    # No flicker: the first paragraph's element stays the same while later ones stream in.
    tokens = ["First paragraph.", "\n\n", *pieces("Then a long second paragraph " * 6, 8)]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.03)))
    ui = await open_page(rill)
    page = ui.page

    await send(page, "Go")
    first = page.locator(f"{ANSWER} >> .md-block >> nth=0")
    await page.wait_for_function("() => document.querySelectorAll('.message.assistant .md-block').length >= 2")
    handle = await first.element_handle()
    assert handle is not None
    await wait_answer_ended(page)
    assert await handle.evaluate("(node) => node.isConnected && node.textContent.trim()") == "First paragraph."
    await ui.assert_clean()


async def test_stop_button_closes_the_upstream_connection(rill: Rill, open_page: OpenPage) -> None:
    rill.fake.script(Reply(chunks=[chunk("Hello"), chunk(" there"), 0.05, chunk(" and")], end="hang"))
    ui = await open_page(rill)
    page = ui.page
    deletes: list[str] = []
    page.on("request", lambda request: deletes.append(request.url) if request.method == "DELETE" else None)

    await send(page, "Talk forever")
    await page.locator(ANSWER).get_by_text("Hello there and").wait_for()
    assert not rill.fake.requests[0].closed.is_set()
    await page.click("#stop")

    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3)
    await wait_answer_ended(page)
    assert len(deletes) == 1
    assert await page.locator(f"{ANSWER} >> .message-status").inner_text() == "Stopped"
    assert await answer_text(page) == "Hello there and"
    assert await page.locator("#send").is_visible()
    assert not await page.locator("#stop").is_visible()
    stored = (await ui.stored_conversations())[0]["messages"][1]
    assert stored["status"] == "stopped"
    assert "pending" not in stored
    await ui.assert_clean()


async def test_escape_stops_the_answer(rill: Rill, open_page: OpenPage) -> None:
    rill.fake.script(Reply(chunks=[chunk("Partial")], end="hang"))
    ui = await open_page(rill)
    page = ui.page

    await send(page, "Talk forever")
    await page.locator(ANSWER).get_by_text("Partial").wait_for()
    await page.keyboard.press("Escape")

    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3)
    await wait_answer_ended(page)
    assert await page.locator(f"{ANSWER} >> .message-status").inner_text() == "Stopped"
    await ui.assert_clean()


async def test_reload_mid_answer_resumes_the_same_answer(rill: Rill, open_page: OpenPage) -> None:
    rill.fake.script(Reply(chunks=answer(pieces(TEXT, 2), delay=0.04)))
    ui = await open_page(rill)
    page = ui.page
    streams: list[str] = []

    def on_request(request: Request) -> None:
        if "/events" in request.url:
            streams.append(request.url)

    page.on("request", on_request)
    await send(page, "Write something")
    await page.wait_for_function(
        "() => (document.querySelector('.message.assistant .message-body')?.innerText.length ?? 0) > 8"
    )
    await page.reload()
    await page.wait_for_selector(".message.assistant")
    await wait_answer_ended(page)

    assert await answer_text(page) == TEXT
    assert (await ui.stored_conversations())[0]["messages"][1]["content"] == TEXT
    assert len(rill.fake.requests) == 1, "the reload asked the model again"
    generation = rill.registry.get(streams[0].split("/")[-2])
    assert generation is not None
    # The page picked up where its stored text ended, not from the start.
    assert "last_event_id=" in streams[-1]
    await ui.assert_clean()


async def test_each_send_has_a_fresh_client_id_and_a_double_enter_sends_once(rill: Rill, open_page: OpenPage) -> None:
    ui = await open_page(rill)
    page = ui.page
    posts: list[dict[str, Any]] = []

    def on_request(request: Request) -> None:
        # The requests that start answers (with history on, creating the conversation is another POST).
        if request.method == "POST" and (request.url.endswith("/api/chat") or request.url.endswith("/messages")):
            posts.append(dict(request.post_data_json or {}))

    page.on("request", on_request)

    await page.fill("#prompt", "First")
    await page.press("#prompt", "Enter")
    await page.press("#prompt", "Enter")  # a second Enter while the first is streaming
    await wait_answer_ended(page)
    await send(page, "Second")
    await wait_answer_ended(page)

    assert len(posts) == 2
    assert len(rill.fake.requests) == 2
    client_ids = [post["client_id"] for post in posts]
    assert all(isinstance(c, str) and len(c) == 36 for c in client_ids)
    assert client_ids[0] != client_ids[1]
    await ui.assert_clean()


async def test_a_dropped_connection_resumes_the_same_answer(start_rill: StartRill, open_page: OpenPage) -> None:
    rill = await start_rill(stream={"retry_ms": 200})
    rill.fake.script(Reply(chunks=answer(pieces(TEXT, 2), delay=0.05)))
    ui = await open_page(rill)
    page = ui.page
    resumes: list[str | None] = []

    async def on_request(request: Request) -> None:
        if "/events" in request.url:
            resumes.append((await request.all_headers()).get("last-event-id"))

    page.on("request", on_request)
    await send(page, "Write something")
    await page.wait_for_function(
        "() => (document.querySelector('.message.assistant .message-body')?.innerText.length ?? 0) > 6"
    )
    # Cut the connection under the page, as a flaky network or a proxy restart would.
    for stream in rill.app[OPEN_STREAMS]:
        assert stream.request.transport is not None
        stream.request.transport.close()
    await wait_answer_ended(page)

    assert await answer_text(page) == TEXT
    assert len(rill.fake.requests) == 1
    assert len(resumes) == 2
    assert resumes[0] is None
    assert resumes[1] is not None
    assert int(resumes[1]) > 1  # EventSource resumed after the events it had
    ui.allowed_console.append("net::ERR_")  # Chromium logs the dropped connection
    await ui.assert_clean()
