"""Automatic titles on the page, in real Chromium: made by the server after the first
answer, they arrive through the change feed in the sidebar and the header (of this
device and another one); the user can still rename, and the user's title wins even
over an automatic title that arrives afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

from playwright.async_api import expect

from .browser import ask, reload
from .conftest import OpenPage, StartRill
from .fakes import Reply, answer
from .history_ui import TITLES, conversation, conversations, stored_rill


async def test_automatic_title_shows_in_sidebar_and_header_and_renaming_still_works(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path, auto_titles=True)
    rill.fake.script(Reply(chunks=answer(["Hello", " there"])), Reply(chunks=answer(["Friendly greeting"])))
    ui = await open_ui(rill)
    other = await open_ui(rill)
    page = ui.page
    await ask(page, "Say hello to me please")
    await expect(page.locator(TITLES)).to_have_text(["Friendly greeting"])
    await expect(page.locator("#chat-title")).to_have_text("Friendly greeting")
    await expect(other.page.locator(TITLES)).to_have_text(["Friendly greeting"])
    [summary] = await conversations(rill)
    assert summary["title"] == "Friendly greeting"
    assert summary["title_source"] == "auto"

    # Renaming: the user's title replaces it, here, on the server and on the other device.
    item = page.locator("#conversations .conversation").first
    await item.hover()
    await item.locator('[data-action="rename"]').click()
    field = page.locator("#conversations .rename-input")
    await expect(field).to_have_value("Friendly greeting")
    await field.fill("My own title")
    await field.press("Enter")
    await expect(page.locator(TITLES)).to_have_text(["My own title"])
    await expect(page.locator("#chat-title")).to_have_text("My own title")
    await expect(other.page.locator(TITLES)).to_have_text(["My own title"])
    async with asyncio.timeout(5):
        while (await conversation(rill, summary["id"]))["title_source"] != "user":
            await asyncio.sleep(0.05)

    # A second answer does not name it again.
    await ask(page, "And again")
    await reload(page)
    await expect(page.locator(TITLES)).to_have_text(["My own title"])
    await expect(page.locator("#chat-title")).to_have_text("My own title")
    assert len(rill.fake.requests) == 3
    await ui.assert_clean()
    await other.assert_clean()


async def test_a_title_given_while_the_automatic_one_is_on_its_way_wins(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path, auto_titles=True)
    # The title request takes a while: the user renames before it ends.
    rill.fake.script(Reply(chunks=answer(["Hi"])), Reply(chunks=[1.5, *answer(["Late automatic title"])]))
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Quick question")
    item = page.locator("#conversations .conversation").first
    await item.hover()
    await item.locator('[data-action="rename"]').click()
    field = page.locator("#conversations .rename-input")
    await field.fill("Mine")
    await field.press("Enter")
    await expect(page.locator(TITLES)).to_have_text(["Mine"])
    async with asyncio.timeout(10):
        while len(rill.fake.requests) < 2 or not rill.fake.requests[1].closed.is_set():
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # time for a (wrong) title event to reach the page
    await expect(page.locator(TITLES)).to_have_text(["Mine"])
    await expect(page.locator("#chat-title")).to_have_text("Mine")
    [summary] = await conversations(rill)
    assert summary["title"] == "Mine"
    assert summary["title_source"] == "user"
    await ui.assert_clean()
