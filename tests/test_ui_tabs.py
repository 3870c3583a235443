"""Two tabs of the same browser share localStorage: neither may overwrite the other."""

from __future__ import annotations

from .browser import send, wait_answer_ended, watch
from .conftest import OpenPage, Rill


async def test_a_second_tab_sees_new_conversations_and_does_not_overwrite_them(rill: Rill, open_page: OpenPage) -> None:
    first = await open_page(rill)
    second = await watch(await first.page.context.new_page())
    await second.page.goto(str(rill.url))

    await send(first.page, "From the first tab")
    await wait_answer_ended(first.page)
    await second.page.locator("#conversations .conversation-open", has_text="From the first tab").wait_for()

    # The second tab opens it and continues it; the first tab then shows both turns.
    await second.page.locator("#conversations .conversation-open", has_text="From the first tab").click()
    await second.page.locator(".message.assistant").wait_for()
    await send(second.page, "From the second tab")
    await wait_answer_ended(second.page)
    await first.page.locator(".message.user", has_text="From the second tab").wait_for()

    stored = (await first.stored_conversations())[0]["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["From the first tab", "From the second tab"]
    assert len(await first.stored_conversations()) == 1
    await first.assert_clean()
    await second.assert_clean()
