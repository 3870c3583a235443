"""The chat page recovering from the awkward moments: a reload mid-answer, Stop while
the stream is reconnecting, a POST whose answer was lost, a proxy answering with a
page of its own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from playwright.async_api import Request, Route

from server.keys import OPEN_STREAMS

from .browser import ANSWER, START_ANSWER, answer_text, send, wait_answer_ended
from .conftest import OpenPage, Rill, StartRill
from .fakes import Reply, chunk


def delta_text(rill: Rill, generation_id: str) -> str:
    generation = rill.registry.get(generation_id)
    assert generation is not None
    return "".join(json.loads(e.data)["text"] for e in generation.events if e.name == "delta")


def slow_tokens(count: int, delay: float) -> list[bytes | float]:
    out: list[bytes | float] = []
    for i in range(count):
        out += [chunk(f"t{i} "), delay]
    return out


async def test_after_a_reload_mid_answer_stop_is_offered_and_works(rill: Rill, open_page: OpenPage) -> None:
    rill.fake.script(Reply(chunks=[chunk("Still going")], end="hang"))
    ui = await open_page(rill)
    page = ui.page
    await send(page, "Talk forever")
    await page.locator(ANSWER).get_by_text("Still going").wait_for()

    await page.reload()
    await page.locator(ANSWER).get_by_text("Still going").wait_for()
    await page.locator("#stop").wait_for()
    assert not await page.locator("#send").is_visible()
    assert not await page.locator(f"{ANSWER} >> [data-action=regenerate]").is_visible()
    await page.click("#stop")

    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3)
    await wait_answer_ended(page)
    assert await page.locator(f"{ANSWER} >> .message-status").inner_text() == "Stopped"
    assert len(rill.fake.requests) == 1
    await ui.assert_clean()


async def test_stop_while_reconnecting_keeps_everything_the_model_wrote(
    start_rill: StartRill, open_page: OpenPage
) -> None:
    # The browser would only reconnect after 10 s; Stop must not wait for that, nor drop
    # the tokens that arrived at the server while the page was disconnected.
    rill = await start_rill(stream={"retry_ms": 10_000})
    rill.fake.script(Reply(chunks=slow_tokens(200, 0.02), end="hang"))
    ui = await open_page(rill)
    page = ui.page
    await send(page, "Count")
    await page.locator(ANSWER).get_by_text("t3").wait_for()
    generation_id = next(iter(rill.registry.live())).id

    for stream in rill.app[OPEN_STREAMS]:
        assert stream.request.transport is not None
        stream.request.transport.close()
    await page.locator(f"{ANSWER} >> .message-status").get_by_text("reconnecting").wait_for()
    await asyncio.sleep(0.3)  # the model keeps writing meanwhile
    await page.click("#stop")

    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3)
    await wait_answer_ended(page, timeout=5)
    expected = delta_text(rill, generation_id)
    assert (await answer_text(page)).strip() == expected.strip()
    assert (await ui.stored_conversations())[0]["messages"][1]["content"] == expected
    ui.allowed_console.append("net::ERR_")
    await ui.assert_clean()


async def test_retry_after_a_lost_post_answer_reuses_the_client_id(rill: Rill, open_page: OpenPage) -> None:
    ui = await open_page(rill)
    page = ui.page
    client_ids: list[str] = []

    async def deliver_then_lose(route: Route) -> None:
        body = route.request.post_data_json or {}
        client_ids.append(body["client_id"])
        await route.fetch()  # the server gets the POST and starts the generation...
        await route.abort("connectionreset")  # ...but its answer never reaches the page

    await page.route(START_ANSWER, deliver_then_lose)
    await send(page, "Hello")
    await wait_answer_ended(page)
    error = page.locator(f"{ANSWER} >> .message-error")
    assert "Could not reach the Rill server" in await error.inner_text()

    await page.unroute(START_ANSWER)
    posts: list[dict[str, Any]] = []

    def on_request(request: Request) -> None:
        if request.method == "POST":
            posts.append(dict(request.post_data_json or {}))

    page.on("request", on_request)
    await error.get_by_role("button", name="Retry").click()
    await wait_answer_ended(page)

    assert await answer_text(page) == "Hello world"
    assert len(set(client_ids)) == 1, "every automatic attempt uses one client_id"
    assert [p["client_id"] for p in posts] == client_ids[:1]
    assert len(rill.fake.requests) == 1, "the retry started a second generation"
    ui.allowed_console.append("net::ERR_CONNECTION_RESET")
    await ui.assert_clean()


async def test_a_proxy_page_instead_of_the_stream_is_an_error_not_a_loop(rill: Rill, open_page: OpenPage) -> None:
    ui = await open_page(rill)
    page = ui.page
    hits = 0

    async def portal(route: Route) -> None:
        nonlocal hits
        hits += 1
        await route.fulfill(status=200, content_type="text/html", body="<html>Sign in to the Wi-Fi</html>")

    await page.route("**/events*", portal)
    await send(page, "Hello")
    await wait_answer_ended(page)
    error = page.locator(f"{ANSWER} >> .message-error")
    assert "does not understand" in await error.inner_text()
    await asyncio.sleep(0.5)
    assert hits <= 3
    ui.allowed_console.append("EventSource's response has a MIME type")
    await ui.assert_clean()
