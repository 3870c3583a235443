"""Search from the sidebar in real Chromium: debounced queries that abort the one before,
highlighted snippets built as text (an XSS payload stays text), Chinese two-character
queries, and opening a result on the branch that holds the message found."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Request, Route, expect

from .conftest import OpenPage, StartRill
from .history_ui import (
    ANSWER_BODIES,
    USER_BODIES,
    conversation,
    export_document,
    import_document,
    message,
    stored_conversation,
    stored_rill,
)

RESULTS = "#search-list .search-result"
XSS = '<img src=x onerror="window.__xss=1;alert(1)"><script>window.__xss=2</script>'


def documents() -> dict[str, object]:
    greeting = stored_conversation(
        "greet",
        "Greetings",
        [
            message("g1", None, "user", "请把你好世界翻译成英文", 1_000),
            message("g2", "g1", "assistant", "Hello world, in English.", 2_000),
        ],
    )
    # q1 -> a1 (mentions "zebra") -> q2 -> a2, and a later edit q1b -> a1b (active).
    branched = stored_conversation(
        "branched",
        "Animals",
        [
            message("q1", None, "user", "Name a striped animal", 10_000),
            message("a1", "q1", "assistant", "A zebra is striped.", 11_000),
            message("q2", "a1", "user", "And its colours?", 12_000),
            message("a2", "q2", "assistant", "Black and white.", 13_000),
            message("q1b", None, "user", "Name a spotted animal", 14_000),
            message("a1b", "q1b", "assistant", "A leopard is spotted.", 15_000),
        ],
        active="a1b",
    )
    hostile = stored_conversation(
        "hostile",
        "<b>bold</b> title",
        [
            message("h1", None, "user", f"payload {XSS} payload", 20_000),
            message("h2", "h1", "assistant", "noted", 21_000),
        ],
    )
    return export_document(greeting, branched, hostile)


async def test_search_finds_chinese_two_characters_and_highlights_with_marks(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    await import_document(rill, documents())
    ui = await open_ui(rill)
    page = ui.page
    search = page.locator("#search-input")
    await expect(search).to_be_visible()
    await expect(search).to_have_attribute("aria-label", "Search conversations")

    await search.fill("世界")
    result = page.locator(RESULTS)
    await expect(result).to_have_count(1)
    await expect(result.locator(".result-title")).to_have_text("Greetings")
    await expect(result.locator(".result-snippet")).to_contain_text("你好世界")
    await expect(result.locator("mark")).to_have_text(["世界"])
    await expect(page.locator("#conversations")).to_be_hidden()

    # Clearing brings the list back.
    await page.click("#search-clear")
    await expect(search).to_have_value("")
    await expect(page.locator("#search-results")).to_be_hidden()
    await expect(page.locator("#conversations .conversation")).to_have_count(3)

    # A title hit: the title itself, highlighted.
    await search.fill("greet")
    await expect(result).to_have_count(1)
    await expect(result.locator(".result-title mark")).to_have_text(["Greet"])
    await expect(result.locator(".result-snippet")).to_be_hidden()

    # Nothing found says so.
    await search.fill("xylophone")
    await expect(page.locator("#search-status")).to_have_text("Nothing found.")
    await expect(page.locator(RESULTS)).to_have_count(0)
    await ui.assert_clean()


async def test_snippets_are_text_never_html(start_rill: StartRill, tmp_path: Path, open_ui: OpenPage) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    await import_document(rill, documents())
    ui = await open_ui(rill)
    page = ui.page
    await page.fill("#search-input", "payload")
    result = page.locator(RESULTS)
    await expect(result).to_have_count(1)
    await expect(result.locator(".result-title")).to_have_text("<b>bold</b> title")
    await expect(result.locator(".result-snippet")).to_contain_text("<img src=x")
    assert await result.locator("img, script, b").count() == 0
    # Only text nodes and <mark> elements inside the snippet.
    tags = await result.locator(".result-snippet *").evaluate_all("(nodes) => nodes.map((n) => n.tagName)")
    assert tags
    assert set(tags) == {"MARK"}
    await expect(result.locator("mark").first).to_have_text("payload")
    await asyncio.sleep(0.2)
    assert await page.evaluate("window.__xss ?? null") is None
    await ui.assert_clean()


async def test_typing_is_debounced_and_a_newer_query_aborts_the_older(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    await import_document(rill, documents())
    ui = await open_ui(rill)
    page = ui.page
    sent: list[str] = []
    failed: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/api/search" in r.url else None)
    page.on("requestfailed", lambda r: failed.append(r.url) if "/api/search" in r.url else None)

    # Quick typing (five keystrokes well inside the debounce): one request for the whole word.
    await page.evaluate(
        """() => {
          const input = document.getElementById("search-input");
          for (const text of ["z", "ze", "zeb", "zebr", "zebra"]) {
            input.value = text;
            input.dispatchEvent(new Event("input", { bubbles: true }));
          }
        }"""
    )
    await expect(page.locator(RESULTS)).to_have_count(1)
    await asyncio.sleep(0.4)
    assert len(sent) == 1
    assert sent[0].endswith("q=zebra")

    # A slow answer to an older query is aborted and never shown over the newer one.
    async def slow(route: Route, request: Request) -> None:
        if request.url.endswith("q=leopard"):
            await asyncio.sleep(1.5)
        with contextlib.suppress(PlaywrightError):  # the page aborted it meanwhile
            await route.continue_()

    await page.route("**/api/search*", slow)
    await page.fill("#search-input", "leopard")
    async with asyncio.timeout(5):  # past the debounce: the request is on its way
        while not any(url.endswith("q=leopard") for url in sent):
            await asyncio.sleep(0.02)
    await page.fill("#search-input", "世界")
    await expect(page.locator(f"{RESULTS} .result-title")).to_have_text(["Greetings"])
    await asyncio.sleep(1.6)
    await expect(page.locator(f"{RESULTS} .result-title")).to_have_text(["Greetings"])
    assert any(url.endswith("q=leopard") for url in failed)
    await ui.assert_clean()


async def test_opening_a_result_shows_the_branch_with_the_message(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    await import_document(rill, documents())
    ui = await open_ui(rill)
    page = ui.page
    await page.fill("#search-input", "zebra")
    result = page.locator(RESULTS)
    await expect(result).to_have_count(1)
    await expect(result.locator(".result-title")).to_have_text("Animals")
    await result.locator(".search-open").click()
    # a1 is not on the active branch (a1b is): the page switches to the newest leaf under it.
    await expect(page.locator("#chat-title")).to_have_text("Animals")
    await expect(page.locator(USER_BODIES)).to_have_text(["Name a striped animal", "And its colours?"])
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["A zebra is striped.", "Black and white."])
    async with asyncio.timeout(5):
        while (await conversation(rill, "branched"))["active"] != "a2":
            await asyncio.sleep(0.05)
    await ui.assert_clean()


async def test_without_stored_conversations_search_and_the_data_dialog_stay_hidden(
    start_rill: StartRill, open_ui: OpenPage
) -> None:
    rill = await start_rill(storage={"enabled": False})
    ui = await open_ui(rill)
    page = ui.page
    await page.wait_for_timeout(300)  # past GET /api/history
    await expect(page.locator("#search")).to_be_hidden()
    await expect(page.locator("#data-open")).to_be_hidden()
    await ui.assert_clean()
