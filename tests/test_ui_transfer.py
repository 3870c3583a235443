"""Export, import and "delete all my data" from the page, in real Chromium: JSON that
imports back exactly (export all, delete all, import, the same conversations and
messages), Markdown of the branch shown, a confirmation that names what goes, and the
page's own copy cleared with the server's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from playwright.async_api import Page, expect

from .browser import ask, reload
from .conftest import OpenPage, Rill, StartRill
from .history_ui import (
    TITLES,
    api,
    conversations,
    export_document,
    import_document,
    message,
    stored_conversation,
    stored_rill,
)


async def download(page: Page, button: str, tmp_path: Path) -> tuple[str, str]:
    """Clicks button in the data dialog; (suggested file name, file text)."""
    async with page.expect_download() as info:
        await page.click(button)
    done = await info.value
    target = tmp_path / done.suggested_filename
    await done.save_as(target)
    return done.suggested_filename, target.read_text(encoding="utf-8")


def without_exported(document: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "exported"}


async def server_export(rill: Rill) -> dict[str, Any]:
    status, body = await api(rill, "GET", "api/export?format=json")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def settled_export(rill: Rill) -> dict[str, Any]:
    """The export once the answers' last writes are in (the page sees an answer end before
    the server's writer stores its ending): no message streaming, and the same twice."""
    previous: dict[str, Any] | None = None
    async with asyncio.timeout(10):
        while True:
            document = await server_export(rill)
            streaming = any(m["status"] == "streaming" for c in document["conversations"] for m in c["messages"])
            if not streaming and previous is not None and without_exported(document) == without_exported(previous):
                return document
            previous = document
            await asyncio.sleep(0.3)


async def test_export_all_delete_all_import_round_trip(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "First question")
    await page.click("#new-chat")
    await ask(page, "Second question")
    await ask(page, "Third question")
    before = await settled_export(rill)
    assert len(before["conversations"]) == 2

    await page.click("#data-open")
    dialog = page.locator("#data-dialog")
    await expect(dialog).to_be_visible()
    name, text = await download(page, "#export-all-json", tmp_path)
    assert name.endswith(".json")
    exported = json.loads(text)
    assert exported["format"] == "rill.conversations"
    assert without_exported(exported) == without_exported(before)

    # Delete everything: the confirmation says whose data and how much, and nothing goes before it.
    await page.click("#delete-all")
    warning = page.locator("#delete-warning")
    await expect(warning).to_be_visible()
    await expect(warning).to_contain_text("(conversations: 2, messages: 6)")
    await expect(warning).to_contain_text("“local”")
    await expect(page.locator("#delete-all-confirm")).to_be_visible()
    await page.click("#delete-all-cancel")
    await expect(warning).to_be_hidden()
    assert len(await conversations(rill)) == 2
    await page.click("#delete-all")
    await page.click("#delete-all-confirm")
    await expect(page.locator("#data-status")).to_have_text("Deleted. Conversations: 2, messages: 6.")
    assert await conversations(rill) == []
    await expect(page.locator(TITLES)).to_have_count(0)
    await expect(page.locator(".message")).to_have_count(0)
    await expect(page.locator("#chat-title")).to_have_text("New chat")

    # Import the file back: the same conversations and messages as before.
    await page.set_input_files("#import-file", str(tmp_path / name))
    await expect(page.locator("#data-status")).to_have_text("Imported. Conversations: 2, messages: 6.")
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(page.locator(TITLES)).to_have_text(["Second question", "First question"])
    after = await server_export(rill)
    assert without_exported(after) == without_exported(before)

    # Importing the same file again changes nothing (idempotent by ids).
    await page.click("#data-open")
    await page.set_input_files("#import-file", str(tmp_path / name))
    await expect(page.locator("#data-status")).to_contain_text("Imported.")
    assert without_exported(await server_export(rill)) == without_exported(before)

    # The page's cache went too: a reload shows what the server has, and nothing else.
    await reload(page)
    await expect(page.locator(TITLES)).to_have_text(["Second question", "First question"])
    await ui.assert_clean()


async def test_delete_all_clears_the_page_cache(start_rill: StartRill, tmp_path: Path, open_ui: OpenPage) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Something private")
    await page.click("#data-open")
    await page.click("#delete-all")
    await page.click("#delete-all-confirm")
    await expect(page.locator("#data-status")).to_have_text("Deleted. Conversations: 1, messages: 2.")
    leftovers = await page.evaluate(
        """() => Object.keys(localStorage).filter((key) => {
             const value = localStorage.getItem(key) || "";
             return value.includes("Something private");
           })"""
    )
    assert leftovers == []
    await reload(page)
    await expect(page.locator(TITLES)).to_have_count(0)
    await ui.assert_clean()


async def test_export_one_conversation_as_json_and_markdown_of_the_branch_shown(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    messages = [
        message("q1", None, "user", "Old question", 1_000),
        message("a1", "q1", "assistant", "Old answer", 2_000),
        message("q1b", None, "user", "New question", 3_000),
        message("a1b", "q1b", "assistant", "New answer", 4_000),
    ]
    other = stored_conversation("other", "Other", [message("o1", None, "user", "Elsewhere", 500)])
    await import_document(rill, export_document(stored_conversation("c1", "Two versions", messages), other))
    ui = await open_ui(rill)
    page = ui.page
    await page.locator(TITLES, has_text="Two versions").click()
    await page.click("#data-open")

    name, text = await download(page, "#export-one-json", tmp_path)
    assert name == "Two versions.json"
    document = json.loads(text)
    assert [c["id"] for c in document["conversations"]] == ["c1"]
    assert {m["id"] for m in document["conversations"][0]["messages"]} == {"q1", "a1", "q1b", "a1b"}

    name, text = await download(page, "#export-one-md", tmp_path)
    assert name == "Two versions.md"
    assert text.startswith("# Two versions\n")
    assert "New question" in text
    assert "New answer" in text
    assert "Old question" not in text

    name, text = await download(page, "#export-all-md", tmp_path)
    assert name.endswith(".md")
    assert "# Two versions" in text
    assert "# Other" in text
    assert "Elsewhere" in text
    await ui.assert_clean()


async def test_import_refuses_a_file_that_is_not_an_export(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    ui = await open_ui(rill, locale="zh-CN")
    page = ui.page
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": "world"}', encoding="utf-8")
    await page.click("#data-open")
    await expect(page.locator("#data-open")).to_have_text("导出、导入、删除…")
    await page.set_input_files("#import-file", str(bad))
    status = page.locator("#data-status")
    await expect(status).to_have_text("此文件不是 Rill 导出的 JSON 文件。")
    await expect(status).to_have_class("data-status error")
    assert await conversations(rill) == []
    await ui.assert_clean()
