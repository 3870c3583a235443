"""The classic relay tutorial's page on GET /stream, in real Chromium, hosted where the
README says it can live: Rill's own origin, its script in a file (tests/tutorial/,
served through Rill's static route as if it were in web/static/)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer
from playwright.async_api import Browser, Request

from server.http import views_pages
from server.keys import OPEN_STREAMS

from .browser import WatchedPage, watch
from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, answer

TUTORIAL_DIR = Path(__file__).resolve().parent / "tutorial"
COMPAT = {"get_stream": True}
SHOWN = "document.getElementById('output').textContent"


@pytest.fixture(autouse=True)
def tutorial_in_static(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rill's static route serves tests/tutorial/ as if the operator had put it in web/static/."""
    monkeypatch.setattr(views_pages, "STATIC_DIR", TUTORIAL_DIR)


async def open_tutorial(browser: Browser, rill: Rill, page_name: str = "ask.html") -> WatchedPage:
    page = await (await browser.new_context()).new_page()
    ui = await watch(page)
    await page.goto(str(rill.url / "static" / page_name))
    return ui


async def ask(ui: WatchedPage, prompt: str) -> list[Request]:
    """Submits the prompt; returns the page's requests to /stream as they happen."""
    requests: list[Request] = []
    ui.page.on("request", lambda request: requests.append(request) if "/stream?" in request.url else None)
    await ui.page.fill("#prompt", prompt)
    await ui.page.press("#prompt", "Enter")
    return requests


async def wait_done(ui: WatchedPage) -> str:
    await ui.page.wait_for_function("() => document.body.dataset.state === 'done'", timeout=15_000)
    shown = await ui.page.evaluate(SHOWN)
    assert isinstance(shown, str)
    return shown


async def test_a_dropped_connection_resumes_the_same_answer(start_rill: StartRill, browser: Browser) -> None:
    # Before: EventSource's reconnect asked the model again and the page showed half of
    # one answer followed by a different second one.
    rill = await start_rill(compat=COMPAT, stream={"retry_ms": 300})
    tokens = [f"word{i} " for i in range(20)]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.1)), Reply(chunks=answer(["A SECOND ANSWER"])))
    ui = await open_tutorial(browser, rill)
    ui.allowed_console.append("net::ERR_")  # the cut connection
    requests = await ask(ui, "Tell me something")
    await ui.page.wait_for_function(f"() => {SHOWN}.includes('word4 ')")

    streams = rill.app[OPEN_STREAMS]
    (stream,) = list(streams)
    transport = stream.request.transport
    assert transport is not None
    transport.abort()  # the connection drops mid-answer

    assert await wait_done(ui) == "".join(tokens)
    assert len(rill.fake.requests) == 1
    assert len(requests) == 2
    resumed_from = await requests[1].header_value("last-event-id")
    assert resumed_from is not None
    generation_id, event_id = resumed_from.split(".")
    assert rill.registry.get(generation_id) is not None
    assert int(event_id) >= 6  # the meta event, then at least word0..word4
    await ui.assert_clean()


async def test_line_breaks_and_a_token_that_is_the_end_marker(start_rill: StartRill, browser: Browser) -> None:
    # A bare CR arrives as LF (SSE has no other way to say it); a token that is exactly
    # [STREAM_END] is shown as text, and only the real end ends the page.
    rill = await start_rill(compat=COMPAT)
    tokens = ["Line one", "\r", "line two\r\n", "[STREAM_END]", " and more", "\n", "end."]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.02)))
    ui = await open_tutorial(browser, rill)
    await ask(ui, "hi")
    assert await wait_done(ui) == "Line one\nline two\n[STREAM_END] and more\nend."
    assert len(rill.fake.requests) == 1
    await wait_for(lambda: not rill.registry.live())
    await ui.assert_clean()


async def test_an_inline_script_never_runs_on_rills_origin(start_rill: StartRill, browser: Browser) -> None:
    rill = await start_rill(compat=COMPAT)
    ui = await open_tutorial(browser, rill, "ask-inline.html")
    await ui.page.wait_for_load_state("load")
    assert await ui.page.evaluate("document.body.dataset.state") is None
    violations = await ui.violations()
    assert [v["directive"] for v in violations] == ["script-src-elem"]
    assert rill.fake.requests == []


OTHER_ORIGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>elsewhere</title>
<script src="/other.js"></script>"""
OTHER_ORIGIN_SCRIPT = """const source = new EventSource("{url}");
source.onmessage = () => {{ document.title = "got a message"; }};
source.onerror = () => {{ if (source.readyState === EventSource.CLOSED) document.title = "refused"; }};"""


async def test_a_page_on_another_origin_is_refused(
    start_rill: StartRill, browser: Browser, aiohttp_server: AiohttpServer
) -> None:
    rill = await start_rill(compat=COMPAT)
    stream_url = str((rill.url / "stream").with_query(prompt="spend"))
    other = web.Application()

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=OTHER_ORIGIN_PAGE, content_type="text/html")

    async def script(_: web.Request) -> web.Response:
        return web.Response(text=OTHER_ORIGIN_SCRIPT.format(url=stream_url), content_type="text/javascript")

    other.router.add_get("/", page)
    other.router.add_get("/other.js", script)
    server = await aiohttp_server(other)
    tab = await (await browser.new_context()).new_page()
    await tab.goto(str(server.make_url("/")))  # 127.0.0.1 on another port: same site, another origin
    await tab.wait_for_function("() => document.title === 'refused'", timeout=10_000)
    await asyncio.sleep(0.2)
    assert rill.fake.requests == []
    assert len(rill.registry) == 0
