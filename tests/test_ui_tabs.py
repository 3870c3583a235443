"""Two tabs of the same browser share localStorage: neither may overwrite the other."""

from __future__ import annotations

import asyncio

from playwright.async_api import Request

from .browser import ANSWER, WatchedPage, another_tab, answer_text, send, wait_answer_ended
from .conftest import OpenPage, Rill
from .fakes import Reply, answer, chunk


async def test_a_second_tab_sees_new_conversations_and_does_not_overwrite_them(rill: Rill, open_page: OpenPage) -> None:
    first = await open_page(rill)
    second = await another_tab(first, str(rill.url))

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


async def test_one_tab_follows_an_answer_and_another_takes_over_when_it_closes(rill: Rill, open_page: OpenPage) -> None:
    text = "".join(f"word{i} " for i in range(60))
    rill.fake.script(Reply(chunks=answer([f"word{i} " for i in range(60)], delay=0.05)))
    first = await open_page(rill)
    await send(first.page, "Long one")
    await first.page.locator(ANSWER).get_by_text("word3").wait_for()

    streams: list[str] = []

    def on_request(request: Request) -> None:
        if "/events" in request.url:
            streams.append(request.url)

    first.page.context.on("request", on_request)  # every tab of this browser
    second = await another_tab(first, str(rill.url))
    await second.page.locator(ANSWER).get_by_text("word3").wait_for()  # from the first tab's saves
    assert await second.page.locator("#stop").is_visible()
    assert streams == [], "the second tab opened its own stream while the first followed"

    await first.page.close()  # the second tab takes over where the first one's saves ended
    await wait_answer_ended(second.page)
    assert (await answer_text(second.page)).strip() == text.strip()
    assert len(streams) == 1
    assert "last_event_id=" in streams[0]
    assert len(rill.fake.requests) == 1
    await second.assert_clean()


async def test_a_tab_open_before_the_answer_started_takes_over_when_the_sender_closes(
    rill: Rill, open_page: OpenPage
) -> None:
    words = [f"word{i} " for i in range(60)]
    rill.fake.script(Reply(chunks=answer(words, delay=0.05)))
    first = await open_page(rill)
    second = await another_tab(first, str(rill.url))
    await second.page.locator("#model option[value]:not([value=''])").first.wait_for(state="attached")

    await send(first.page, "Long one")
    await second.page.locator("#conversations .conversation-open", has_text="Long one").click()
    await second.page.locator(ANSWER).get_by_text("word3").wait_for()
    await first.page.close()

    await wait_answer_ended(second.page)
    assert (await answer_text(second.page)).strip() == "".join(words).strip()
    assert (await second.stored_conversations())[0]["messages"][1]["status"] == "done"
    assert len(rill.fake.requests) == 1
    await second.assert_clean()


async def two_tabs_on_an_endless_answer(rill: Rill, open_page: OpenPage) -> tuple[WatchedPage, WatchedPage]:
    """The first tab sends and follows; a second tab, opened meanwhile, shows it."""
    rill.fake.script(Reply(chunks=[chunk("Going on")], end="hang"))
    first = await open_page(rill)
    await send(first.page, "Talk forever")
    await first.page.locator(ANSWER).get_by_text("Going on").wait_for()
    second = await another_tab(first, str(rill.url))
    await second.page.locator(ANSWER).get_by_text("Going on").wait_for()
    assert await second.page.locator("#stop").is_visible()
    return first, second


async def test_stop_in_a_tab_that_does_not_follow_the_answer_stops_it(rill: Rill, open_page: OpenPage) -> None:
    first, second = await two_tabs_on_an_endless_answer(rill, open_page)

    await second.page.click("#stop")
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3)
    for ui in (first, second):
        await ui.page.locator(f"{ANSWER} >> .message-status").get_by_text("Stopped").wait_for()
        assert await ui.page.locator("#send").is_visible()
        await ui.assert_clean()


async def test_deleting_in_another_tab_stops_the_answer_streaming_in_this_one(rill: Rill, open_page: OpenPage) -> None:
    first, second = await two_tabs_on_an_endless_answer(rill, open_page)
    assert len(rill.fake.requests) == 1

    delete = first.page.locator("#conversations [data-action=delete]")
    await delete.click()
    await delete.click()
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3)
    await second.page.locator("#empty-chat").wait_for()
    assert await second.stored_conversations() == []
    keys = await second.page.evaluate("() => Object.keys(localStorage)")
    assert not [key for key in keys if key.startswith("rill.v1.conversation.")], "a deleted conversation came back"
    await first.assert_clean()
    await second.assert_clean()
