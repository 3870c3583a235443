"""Screenshots of the chat page for review (light, dark, phone width), written to
artifacts/screenshots/ by every test run, of a real demo conversation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .browser import PHONE, screenshot, send, wait_answer_ended
from .conftest import OpenPage, StartRill

LAYOUTS = [
    pytest.param("light", {"color_scheme": "light", "viewport": {"width": 1280, "height": 900}}, id="light"),
    pytest.param("dark", {"color_scheme": "dark", "viewport": {"width": 1280, "height": 900}}, id="dark"),
    pytest.param("phone", {"color_scheme": "light", "viewport": PHONE, "is_mobile": True}, id="phone"),
    pytest.param(
        "phone-dark-zh", {"color_scheme": "dark", "viewport": PHONE, "is_mobile": True, "locale": "zh-CN"}, id="zh"
    ),
]


@pytest.mark.parametrize(("name", "options"), LAYOUTS)
async def test_screenshots_of_a_demo_conversation(
    start_rill: StartRill, open_page: OpenPage, name: str, options: dict[str, Any]
) -> None:
    rill = await start_rill(key=False)
    ui = await open_page(rill, **options)
    page = ui.page
    assert await page.locator("#demo-banner").is_visible()

    await page.select_option("#model", "rill-demo-reasoner")
    await send(page, "Show me what streaming looks like")
    await wait_answer_ended(page)
    await page.locator(".message.assistant .reasoning summary").click()  # show the thinking too
    await page.locator("#messages").evaluate("(list) => { list.scrollTop = 0; }")
    path = await screenshot(page, name)

    assert path.stat().st_size > 20_000
    expected_background = "rgb(22, 24, 29)" if options["color_scheme"] == "dark" else "rgb(255, 255, 255)"
    assert await page.evaluate("() => getComputedStyle(document.body).backgroundColor") == expected_background
    if options["viewport"] == PHONE:
        # Nothing wider than the phone: no sideways scrolling.
        assert await page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
        assert not await page.locator("#sidebar").is_visible() or await page.locator("#sidebar").evaluate(
            "(el) => el.getBoundingClientRect().right <= 0"
        )
    await ui.assert_clean()


def test_screenshot_folder_is_ignored_by_git() -> None:
    ignore = (Path(__file__).resolve().parent.parent / ".gitignore").read_text()
    assert "artifacts/" in ignore.split()
