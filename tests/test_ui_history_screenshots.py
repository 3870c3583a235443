"""Screenshots of the stored conversations' page features for review (light, dark, phone
width in Chinese), written to artifacts/screenshots/: a conversation with versions
(`‹ 2 / 2 ›`) beside search results, and the export / import / delete dialog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from .browser import PHONE, screenshot
from .conftest import OpenPage, StartRill
from .history_ui import TITLES, export_document, import_document, message, stored_conversation, stored_rill

LAYOUTS = [
    pytest.param("light", {"color_scheme": "light", "viewport": {"width": 1280, "height": 800}}, id="light"),
    pytest.param("dark", {"color_scheme": "dark", "viewport": {"width": 1280, "height": 800}}, id="dark"),
    pytest.param(
        "phone-zh", {"color_scheme": "light", "viewport": PHONE, "is_mobile": True, "locale": "zh-CN"}, id="zh"
    ),
]


@pytest.mark.parametrize(("name", "options"), LAYOUTS)
async def test_screenshots_of_branches_search_and_the_data_dialog(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage, name: str, options: dict[str, Any]
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    messages = [
        message("q1", None, "user", "请把“你好世界”翻译成英文", 1_000),
        message("a1", "q1", "assistant", "Hello world.", 2_000),
        message("a2", "q1", "assistant", "“你好世界” in English is **Hello, world!**", 3_000),
        message("q2", "a2", "user", "Thanks!", 4_000),
        message("a3", "q2", "assistant", "You're welcome.", 5_000),
    ]
    older = stored_conversation("c0", "Travel plans", [message("t1", None, "user", "A week in 世界 cities", 500)])
    await import_document(rill, export_document(stored_conversation("c1", "Hello world 你好世界", messages), older))
    ui = await open_ui(rill, **options)
    page = ui.page
    phone = options["viewport"] == PHONE
    if phone:
        await page.click("#menu")
    await page.locator(TITLES, has_text="Hello world").click()
    await expect(page.locator(".branch-nav:visible")).to_have_count(1)
    if phone:
        await page.click("#menu")
    await page.fill("#search-input", "世界")
    await expect(page.locator("#search-list .search-result")).to_have_count(4)
    await expect(page.locator("#search-list mark").first).to_be_visible()
    assert (await screenshot(page, f"history-{name}")).stat().st_size > 20_000

    await page.click("#data-open")
    await page.click("#delete-all")
    await expect(page.locator("#delete-warning")).to_be_visible()
    assert (await screenshot(page, f"history-dialog-{name}")).stat().st_size > 10_000
    await ui.assert_clean()
