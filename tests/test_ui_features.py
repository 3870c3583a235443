"""The chat page's features in real Chromium: the conversation list, model picker, system
prompt, regenerate / edit / continue, reasoning, code blocks and copying, export, the
composer, auto-scroll, language, theme, errors on POST and the phone layout."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Locator, Page, Request, Route, expect

from .browser import (
    ANSWER,
    PHONE,
    START_ANSWER,
    WatchedPage,
    answer_text,
    ask,
    reload,
    send,
    wait_answer_ended,
)
from .conftest import OpenPage, Rill, StartRill, wait_for
from .fakes import Reply, answer, chunk

ANSWER_BODY = f"{ANSWER} >> .message-body"
TITLES = "#conversations .conversation-open"
CONTINUE_PROMPT = "Continue exactly where your previous answer stopped. Do not repeat anything you already wrote."


def capture_posts(page: Page) -> list[dict[str, Any]]:
    """The JSON bodies of every POST the page sends to start an answer, in order: POST
    /api/chat, or with history on the server POST /api/conversations/{id}/messages."""
    posts: list[dict[str, Any]] = []

    def on_request(request: Request) -> None:
        if request.method == "POST" and (request.url.endswith("/api/chat") or request.url.endswith("/messages")):
            posts.append(dict(request.post_data_json or {}))

    page.on("request", on_request)
    return posts


async def two_conversations(page: Page) -> None:
    await ask(page, "First question")
    await page.click("#new-chat")
    await ask(page, "Second question")
    await expect(page.locator(TITLES)).to_have_text(["Second question", "First question"])


def conversation(page: Page, title: str) -> Locator:
    return page.locator("#conversations .conversation", has=page.locator(".conversation-open", has_text=title))


async def conversation_button(page: Page, title: str, action: str) -> Locator:
    """The ✎ or × button of a conversation (shown on hover, as a user reaches it)."""
    item = conversation(page, title)
    await item.hover()
    return item.locator(f'[data-action="{action}"]')


async def stored_ids(ui: WatchedPage) -> list[str]:
    return [str(c["id"]) for c in await ui.stored_conversations()]


async def scroll_state(page: Page) -> dict[str, float]:
    result = await page.evaluate(
        """() => {
          const m = document.getElementById("messages");
          return {top: m.scrollTop, height: m.scrollHeight, client: m.clientHeight,
                  gap: m.scrollHeight - m.scrollTop - m.clientHeight};
        }"""
    )
    assert isinstance(result, dict)
    return result


async def clipboard(page: Page) -> str:
    text = await page.evaluate("() => navigator.clipboard.readText()")
    assert isinstance(text, str)
    return text


# 1. The conversation list


async def test_sidebar_lists_newest_first_keeps_them_on_reload_and_opens_one(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill)
    page = ui.page
    await two_conversations(page)
    await expect(page.locator("#conversations .conversation.current .conversation-open")).to_have_text(
        "Second question"
    )
    assert [c["title"] for c in await ui.stored_conversations()] == ["Second question", "First question"]

    await reload(page)
    await expect(page.locator(TITLES)).to_have_text(["Second question", "First question"])
    await expect(page.locator("#chat-title")).to_have_text("Second question")
    await expect(page.locator(".message.user .message-body")).to_have_text(["Second question"])

    await page.locator(TITLES, has_text="First question").click()
    await expect(page.locator("#chat-title")).to_have_text("First question")
    await expect(page.locator(".message.user .message-body")).to_have_text(["First question"])
    assert await answer_text(page) == "Hello world"
    await expect(page.locator("#conversations .conversation.current .conversation-open")).to_have_text("First question")
    # Opening one does not reorder the list.
    await expect(page.locator(TITLES)).to_have_text(["Second question", "First question"])
    await ui.assert_clean()


async def test_rename_saves_on_enter_and_persists(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill)
    page = ui.page
    await two_conversations(page)

    # The open conversation: its heading follows.
    await (await conversation_button(page, "Second question", "rename")).click()
    field = page.locator("#conversations .rename-input")
    await expect(field).to_be_focused()
    await expect(field).to_have_value("Second question")
    await field.fill("Renamed chat")
    await field.press("Enter")
    await expect(field).to_have_count(0)
    await expect(page.locator(TITLES)).to_have_text(["Renamed chat", "First question"])
    await expect(page.locator("#chat-title")).to_have_text("Renamed chat")

    # Another one.
    await (await conversation_button(page, "First question", "rename")).click()
    await field.fill("Also renamed")
    await field.press("Enter")
    await expect(page.locator(TITLES)).to_have_text(["Renamed chat", "Also renamed"])
    await expect(page.locator("#chat-title")).to_have_text("Renamed chat")

    await reload(page)
    # After a reload the list is in the server's order, which counts a rename as an update
    # (the last renamed comes first): the titles persist, in either order.
    await expect(page.locator(TITLES)).to_have_count(2)
    assert sorted(await page.locator(TITLES).all_inner_texts()) == ["Also renamed", "Renamed chat"]
    await expect(page.locator("#chat-title")).to_have_text("Renamed chat")
    assert sorted(c["title"] for c in await ui.stored_conversations()) == ["Also renamed", "Renamed chat"]
    await ui.assert_clean()


async def test_rename_escape_cancels_and_keeps_the_title(rill: Rill, open_ui: OpenPage) -> None:
    # Regression: render() skipped the rebuild when nothing changed, leaving the row without its title.
    ui = await open_ui(rill)
    page = ui.page
    await two_conversations(page)

    await (await conversation_button(page, "First question", "rename")).click()
    field = page.locator("#conversations .rename-input")
    await expect(field).to_be_focused()
    await field.fill("Not this one")
    await field.press("Escape")
    await expect(field).to_have_count(0)
    await expect(page.locator(TITLES)).to_have_text(["Second question", "First question"], timeout=2000)
    await page.locator(TITLES, has_text="First question").click()
    await expect(page.locator("#chat-title")).to_have_text("First question")
    assert [c["title"] for c in await ui.stored_conversations()] == ["Second question", "First question"]
    await ui.assert_clean()


async def test_delete_needs_a_second_click_and_removes_it_from_list_and_storage(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill)
    page = ui.page
    await two_conversations(page)
    second_id, first_id = await stored_ids(ui)

    # Another conversation than the open one.
    delete = await conversation_button(page, "First question", "delete")
    await delete.click()
    await expect(delete).to_have_class(re.compile(r"\bconfirm\b"))
    await expect(delete).to_have_text("Delete?")
    await expect(page.locator(TITLES)).to_have_count(2)
    assert await stored_ids(ui) == [second_id, first_id]
    await delete.click()
    await expect(page.locator(TITLES)).to_have_text(["Second question"])
    assert await stored_ids(ui) == [second_id]
    assert await page.evaluate("(id) => localStorage.getItem('rill.v1.conversation.' + id)", first_id) is None
    await expect(page.locator("#chat-title")).to_have_text("Second question")

    # The open one: the page falls back to an empty new chat.
    delete = await conversation_button(page, "Second question", "delete")
    await delete.click()
    await expect(page.locator(TITLES)).to_have_count(1)
    await delete.click()
    await expect(page.locator(TITLES)).to_have_count(0)
    await expect(page.locator("#no-conversations")).to_be_visible()
    await expect(page.locator(".message")).to_have_count(0)
    await expect(page.locator("#empty-chat")).to_be_visible()
    await expect(page.locator("#chat-title")).to_have_text("New chat")
    assert await ui.stored_conversations() == []

    await reload(page)
    await expect(page.locator("#no-conversations")).to_be_visible()
    await expect(page.locator(TITLES)).to_have_count(0)
    await ui.assert_clean()


async def test_arming_another_delete_disarms_the_first(rill: Rill, open_ui: OpenPage) -> None:
    # Regression: the first button kept saying "Delete?" for good, without being armed.
    ui = await open_ui(rill)
    page = ui.page
    await two_conversations(page)

    first = await conversation_button(page, "First question", "delete")
    await first.click()
    await expect(first).to_have_text("Delete?")
    second = await conversation_button(page, "Second question", "delete")
    await second.click()
    await expect(second).to_have_text("Delete?")
    # Only the second one is armed now, so only it may say so.
    await expect(first).to_have_text("×", timeout=1000)
    await expect(first).not_to_have_class(re.compile(r"\bconfirm\b"))
    await ui.assert_clean()


async def test_new_chat_shows_an_empty_chat_and_keeps_the_old_one(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "First question")
    await expect(page.locator(".message")).to_have_count(2)

    await page.click("#new-chat")
    await expect(page.locator(".message")).to_have_count(0)
    await expect(page.locator("#empty-chat")).to_be_visible()
    await expect(page.locator("#chat-title")).to_have_text("New chat")
    await expect(page.locator("#conversations .conversation.current")).to_have_count(0)
    await expect(page.locator("#prompt")).to_be_focused()
    await expect(page.locator(TITLES)).to_have_text(["First question"])

    await ask(page, "Another topic")
    await expect(page.locator(".message")).to_have_count(2)
    await expect(page.locator(TITLES)).to_have_text(["Another topic", "First question"])
    assert [len(c["messages"]) for c in await ui.stored_conversations()] == [2, 2]
    await ui.assert_clean()


# 2. Deleting a conversation while its answer streams


async def test_deleting_a_streaming_conversation_closes_the_upstream_request(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(Reply(chunks=[chunk("Partial")], end="hang"))
    ui = await open_ui(rill)
    page = ui.page

    await send(page, "Talk forever")
    await page.locator(ANSWER).get_by_text("Partial").wait_for()
    await expect(page.locator("#conversations .conversation.streaming")).to_have_count(1)
    assert not rill.fake.requests[0].closed.is_set()

    delete = await conversation_button(page, "Talk forever", "delete")
    await delete.click()
    await expect(delete).to_have_text("Delete?")
    await delete.click()

    # Well before the server's own resume_grace (5 s) would abandon it.
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2)
    await expect(page.locator(TITLES)).to_have_count(0)
    await expect(page.locator(".message")).to_have_count(0)
    await expect(page.locator("#send")).to_be_visible()
    await expect(page.locator("#stop")).to_be_hidden()
    assert await ui.stored_conversations() == []
    await ui.assert_clean()


async def test_deleting_works_while_tokens_are_still_arriving(rill: Rill, open_ui: OpenPage) -> None:
    # Regression: every event rebuilt the sidebar, which dropped the pending confirmation.
    rill.fake.script(Reply(chunks=[x for i in range(200) for x in (0.03, chunk(f"word{i} "))], end="hang"))
    ui = await open_ui(rill)
    page = ui.page

    await send(page, "Talk forever")
    await page.locator(ANSWER).get_by_text("word3").wait_for()
    delete = await conversation_button(page, "Talk forever", "delete")
    await delete.click()
    # More tokens arrive while the user moves to confirm; the confirm state must survive them.
    await page.locator(ANSWER).get_by_text("word12").wait_for()
    await expect(page.locator('#conversations [data-action="delete"]')).to_have_text("Delete?", timeout=500)
    await page.locator('#conversations [data-action="delete"]').click()

    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2)
    await expect(page.locator(TITLES)).to_have_count(0)
    assert await ui.stored_conversations() == []
    await ui.assert_clean()


async def test_deleting_before_the_post_is_answered_still_closes_the_upstream_request(
    rill: Rill, open_ui: OpenPage
) -> None:
    rill.fake.script(Reply(chunks=[chunk("Partial")], end="hang"))
    ui = await open_ui(rill)
    page = ui.page
    # Regression: discard() only stopped generations whose POST had answered.
    release = asyncio.Event()

    async def slow_post(route: Route) -> None:
        # The server gets the POST at once (the upstream request starts); its answer is late.
        response = await route.fetch()
        await release.wait()
        await route.fulfill(response=response)

    await page.route(START_ANSWER, slow_post)
    await send(page, "Talk forever")
    await wait_for(lambda: bool(rill.fake.requests), 3)
    delete = await conversation_button(page, "Talk forever", "delete")
    await delete.click()
    await delete.click()
    await expect(page.locator(TITLES)).to_have_count(0)
    release.set()

    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2)
    assert await ui.stored_conversations() == []
    await ui.assert_clean()


# 3. Model picker


async def test_model_picker_lists_the_models_and_the_choice_reaches_the_upstream(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill)
    page = ui.page
    posts = capture_posts(page)
    options = page.locator("#model option")
    await expect(options).to_have_text(["Fake chat", "Fake reasoner"])
    assert await options.evaluate_all("(all) => all.map((o) => o.value)") == ["fake-chat", "fake-reasoner"]
    await expect(page.locator("#model")).to_have_value("fake-chat")
    await expect(page.locator("#model")).not_to_have_class(re.compile(r"\bdemo\b"))
    await expect(page.locator("#demo-banner")).to_have_count(0)

    await ask(page, "Default model")
    assert rill.fake.requests[0].body["model"] == "fake-model"
    await expect(page.locator(f"{ANSWER} >> .message-model")).to_have_text("Fake chat")

    await page.click("#new-chat")
    await page.select_option("#model", "fake-reasoner")
    await ask(page, "Reasoner please")
    assert rill.fake.requests[1].body["model"] == "fake-model-r"
    assert [post["model"] for post in posts] == ["fake-chat", "fake-reasoner"]
    await expect(page.locator(f"{ANSWER} >> .message-model")).to_have_text("Fake reasoner")

    # Each conversation keeps its model; a new chat starts with the last choice.
    await page.locator(TITLES, has_text="Default model").click()
    await expect(page.locator("#model")).to_have_value("fake-chat")
    await reload(page)
    await expect(page.locator("#model")).to_have_value("fake-chat")
    await page.locator(TITLES, has_text="Reasoner please").click()
    await expect(page.locator("#model")).to_have_value("fake-reasoner")
    await page.click("#new-chat")
    await expect(page.locator("#model")).to_have_value("fake-reasoner")

    # Switching the model of a conversation under way: its next turn uses the new one.
    await page.locator(TITLES, has_text="Default model").click()
    await page.select_option("#model", "fake-reasoner")
    await ask(page, "Follow-up")
    assert rill.fake.requests[2].body["model"] == "fake-model-r"
    await reload(page)
    await expect(page.locator("#chat-title")).to_have_text("Default model")
    await expect(page.locator("#model")).to_have_value("fake-reasoner")
    await ui.assert_clean()


async def test_demo_mode_marks_the_models_and_shows_the_banner(start_rill: StartRill, open_ui: OpenPage) -> None:
    rill = await start_rill(key=False)
    ui = await open_ui(rill)
    page = ui.page
    options = page.locator("#model option")
    assert await options.evaluate_all("(all) => all.map((o) => o.value)") == ["rill-demo", "rill-demo-reasoner"]
    labels = await options.all_inner_texts()
    assert len(labels) == 2
    assert all("demo" in label.lower() for label in labels), labels
    assert await options.evaluate_all("(all) => all.map((o) => o.dataset.demo)") == ["true", "true"]
    await expect(page.locator("#model")).to_have_class(re.compile(r"\bdemo\b"))
    await expect(page.locator("#demo-banner")).to_be_visible()
    await expect(page.locator("#demo-banner")).to_contain_text("Demo mode")

    await ask(page, "Hello demo")
    await expect(page.locator(f"{ANSWER} >> .demo-badge")).to_be_visible()
    assert rill.fake.requests == []
    await ui.assert_clean()


# 4. System prompt


async def test_system_prompt_is_sent_first_and_kept_per_conversation(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill)
    page = ui.page
    await expect(page.locator("#system-prompt")).to_be_hidden()
    await page.click("#system-toggle")
    await expect(page.locator("#system-prompt")).to_be_visible()
    await expect(page.locator("#system-prompt")).to_be_focused()
    await expect(page.locator("#system-toggle")).to_have_attribute("aria-expanded", "true")
    await page.fill("#system-prompt", "Answer in French.")

    await ask(page, "Hi")
    assert rill.fake.requests[0].body["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
    ]
    assert (await ui.stored_conversations())[0]["system"] == "Answer in French."

    await page.click("#new-chat")
    await expect(page.locator("#system-prompt")).to_have_value("")
    await ask(page, "Hello")
    assert rill.fake.requests[1].body["messages"] == [{"role": "user", "content": "Hello"}]

    await page.locator(TITLES, has_text="Hi").click()
    await expect(page.locator("#system-prompt")).to_have_value("Answer in French.")
    await reload(page)
    await expect(page.locator("#system-prompt")).to_have_value("Answer in French.")
    await ask(page, "Again")
    assert rill.fake.requests[2].body["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert rill.fake.requests[2].body["messages"][-1] == {"role": "user", "content": "Again"}
    await ui.assert_clean()


async def test_a_click_on_a_conversation_is_not_lost_when_the_list_changes_under_it(
    rill: Rill, open_ui: OpenPage
) -> None:
    """The list is rebuilt when something in it changes (an answer ends, another device
    renames a conversation). A rebuild between the button's press and its release once
    swallowed the click: the browser fires none when the two land on different nodes."""
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Hi")
    await page.click("#new-chat")
    await ask(page, "Hello")
    hello = next(c for c in await ui.stored_conversations() if c["title"] == "Hello")
    # The pointer over the button (hover() waits out the rebuilds that follow an answer's end).
    await page.locator(TITLES, has_text="Hi").hover()
    await page.mouse.down()
    # Another device renames the other conversation while the button is held down.
    status = await page.evaluate(
        """async (id) => (await fetch(`/api/conversations/${id}`, {
             method: "PATCH",
             headers: { "Content-Type": "application/json" },
             body: JSON.stringify({ title: "Renamed elsewhere" }),
           })).status""",
        hello["id"],
    )
    assert status == 200
    await page.wait_for_function(
        "(id) => JSON.parse(localStorage.getItem('rill.v1.conversation.' + id)).title === 'Renamed elsewhere'",
        arg=hello["id"],
    )
    await page.mouse.up()
    await expect(page.locator("#conversations .conversation.current .conversation-open")).to_have_text("Hi")
    await expect(page.locator(TITLES)).to_contain_text(["Renamed elsewhere"])  # the held rebuild came after
    await ui.assert_clean()


# 5-7. Regenerate, edit, continue


async def test_regenerate_asks_again_with_the_same_messages_and_replaces_the_answer(
    rill: Rill, open_ui: OpenPage
) -> None:
    rill.fake.script(Reply(chunks=answer(["First answer"])), Reply(chunks=answer(["Second answer"])))
    ui = await open_ui(rill)
    page = ui.page
    posts = capture_posts(page)
    await ask(page, "Tell me")
    assert await answer_text(page) == "First answer"

    regenerate = page.locator(f'{ANSWER} >> [data-action="regenerate"]')
    await expect(regenerate).to_be_visible()
    await regenerate.click()
    await expect(page.locator(ANSWER_BODY)).to_have_text("Second answer")
    await wait_answer_ended(page)

    await expect(page.locator(".message.assistant")).to_have_count(1)
    assert len(rill.fake.requests) == 2
    assert rill.fake.requests[1].body["messages"] == rill.fake.requests[0].body["messages"]
    assert rill.fake.requests[0].body["messages"] == [{"role": "user", "content": "Tell me"}]
    assert len(posts) == 2
    assert posts[0]["client_id"] != posts[1]["client_id"]
    stored = (await ui.stored_conversations())[0]["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", "Tell me"), ("assistant", "Second answer")]
    await ui.assert_clean()


async def test_edit_and_resend_replaces_the_question_and_drops_the_old_answer(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(Reply(chunks=answer(["First answer"])), Reply(chunks=answer(["Second answer"])))
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Original question")
    edit = page.locator('.message.user >> nth=-1 >> [data-action="edit"]')
    editor = page.locator(".message.user .edit-box textarea")

    # Escape cancels an edit without sending anything.
    await edit.click()
    await expect(editor).to_be_focused()
    await expect(editor).to_have_value("Original question")
    await editor.fill("Discarded text")
    await editor.press("Escape")
    await expect(editor).to_have_count(0)
    await expect(page.locator(".message.user .message-body")).to_have_text(["Original question"])

    await edit.click()
    await expect(editor).to_have_value("Original question")
    await editor.fill("Edited question")
    await page.click('[data-action="save-edit"]')
    await expect(page.locator(".message.user .message-body")).to_have_text(["Edited question"])
    await expect(page.locator(ANSWER_BODY)).to_have_text("Second answer")
    await wait_answer_ended(page)

    await expect(page.locator(".message")).to_have_count(2)
    await expect(page.locator("#messages")).not_to_contain_text("First answer")
    assert len(rill.fake.requests) == 2
    assert rill.fake.requests[1].body["messages"] == [{"role": "user", "content": "Edited question"}]
    stored = (await ui.stored_conversations())[0]["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "Edited question"),
        ("assistant", "Second answer"),
    ]
    await ui.assert_clean()


async def test_continue_after_a_length_cut_appends_to_the_same_answer(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(
        Reply(chunks=answer(["The first ", "half,"], finish="length")),
        Reply(chunks=answer([" and the ", "second half."])),
    )
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Write a story")
    status = page.locator(f"{ANSWER} >> .message-status")
    await expect(status).to_have_text("The answer reached its length limit.")
    assert (await ui.stored_conversations())[0]["messages"][1]["status"] == "length"
    proceed = page.locator(f'{ANSWER} >> [data-action="continue"]')
    await expect(proceed).to_be_visible()

    await proceed.click()
    await expect(page.locator(ANSWER_BODY)).to_have_text("The first half, and the second half.")
    await wait_answer_ended(page)

    await expect(page.locator(".message.assistant")).to_have_count(1)
    await expect(status).to_be_hidden()
    await expect(proceed).to_be_hidden()
    assert rill.fake.requests[1].body["messages"] == [
        {"role": "user", "content": "Write a story"},
        {"role": "assistant", "content": "The first half,"},
        {"role": "user", "content": CONTINUE_PROMPT},
    ]
    stored = (await ui.stored_conversations())[0]["messages"]
    assert len(stored) == 2
    assert stored[1]["content"] == "The first half, and the second half."
    assert stored[1]["status"] == "done"
    await ui.assert_clean()


# 8. Reasoning


async def test_reasoning_is_open_while_thinking_then_closed_with_its_duration(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(Reply(chunks=answer(["The answer is 4."], reasoning=["Two plus ", "two is four."], delay=0.3)))
    ui = await open_ui(rill)
    page = ui.page
    await page.select_option("#model", "fake-reasoner")
    await send(page, "2+2?")

    thinking = await page.wait_for_function(
        """() => {
          const details = document.querySelector(".message.assistant details.reasoning");
          if (!details || details.hidden || !details.open) return false;
          return {
            label: details.querySelector(".reasoning-label").textContent,
            text: details.querySelector(".reasoning-text").textContent,
            answer: document.querySelector(".message.assistant .message-body").textContent,
          };
        }"""
    )
    seen = await thinking.json_value()
    assert seen["label"] == "Thinking"
    assert seen["text"].startswith("Two plus")
    assert seen["answer"] == ""

    await wait_answer_ended(page)
    details = page.locator(f"{ANSWER} >> details.reasoning")
    assert await details.evaluate("(d) => d.open") is False
    await expect(details.locator(".reasoning-text")).to_have_text("Two plus two is four.")
    label = await details.locator(".reasoning-label").inner_text()
    match = re.fullmatch(r"Thought for (\d+\.\d) s", label)
    assert match, label
    # From the first reasoning token to the first answer token: two delays of 0.3 s.
    assert 0.4 <= float(match[1]) <= 2.0, label
    assert await answer_text(page) == "The answer is 4."
    assert rill.fake.requests[0].body["model"] == "fake-model-r"

    await details.locator("summary").click()  # the user can open it again
    assert await details.evaluate("(d) => d.open") is True
    await ui.assert_clean()


# 9. Code blocks and copying

CODE = "def add(a, b):\n    return a + b"
CODE_ANSWER = f"Here you go:\n\n```python\n{CODE}\n```\n\nCall `add(1, 2)`."


async def test_code_block_is_highlighted_labelled_and_copies_exactly_the_code(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(Reply(chunks=answer([CODE_ANSWER[i : i + 7] for i in range(0, len(CODE_ANSWER), 7)])))
    ui = await open_ui(rill, permissions=["clipboard-read", "clipboard-write"])
    page = ui.page
    await ask(page, "Show me code")

    pre = page.locator(f"{ANSWER} >> pre")
    await expect(pre).to_have_count(1)
    await expect(pre.locator(".code-language")).to_have_text("python")
    await expect(pre.locator("code")).to_have_class(re.compile(r"\blanguage-python\b"))
    await expect(pre.locator("code span.hljs-keyword").first).to_have_text("def")
    assert await pre.locator("code span[class^='hljs-']").count() >= 2
    assert await pre.locator("code").text_content() == CODE

    copy_code = pre.locator('[data-action="copy-code"]')
    await expect(copy_code).to_have_text("Copy code")
    await copy_code.click()
    await expect(copy_code).to_have_text("Copied")
    assert await clipboard(page) == CODE

    copy = page.locator(f'{ANSWER} >> .message-actions [data-action="copy"]')
    await copy.click()
    await expect(copy).to_have_text("Copied")
    assert await clipboard(page) == CODE_ANSWER  # the Markdown source, not the rendered text
    await expect(copy).to_have_text("Copy")  # the label comes back
    await ui.assert_clean()


async def test_copy_label_comes_back_after_two_quick_clicks(rill: Rill, open_ui: OpenPage) -> None:
    # Regression: the second click saved "Copied" as the label to put back.
    ui = await open_ui(rill, permissions=["clipboard-read", "clipboard-write"])
    page = ui.page
    await ask(page, "Hi")
    copy = page.locator(f'{ANSWER} >> .message-actions [data-action="copy"]')
    await copy.click()
    await expect(copy).to_have_text("Copied")
    await copy.click()
    await expect(copy).to_have_text("Copy", timeout=3000)
    await ui.assert_clean()


# 10. Export


async def test_export_downloads_the_conversation_as_markdown(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(Reply(chunks=answer(["**Bold** answer ", "with `code`."])))
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Export me please")

    async with page.expect_download() as info:
        await page.click("#export")
    download = await info.value
    assert download.suggested_filename == "Export me please.md"
    text = await asyncio.to_thread(Path(await download.path()).read_text, "utf-8")
    assert text.startswith("# Export me please\n")
    assert "\nExport me please\n" in text
    assert "**Bold** answer with `code`." in text  # the Markdown source
    assert text.index("## You") < text.index("Export me please\n\n## Assistant") < text.index("**Bold**")
    await ui.assert_clean()


# 11. Composer


async def test_composer_focus_shift_enter_enter_and_blank_input(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill)
    page = ui.page
    posts = capture_posts(page)
    await expect(page.locator("#prompt")).to_be_focused()

    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("line two")
    await expect(page.locator("#prompt")).to_have_value("line one\nline two")
    await expect(page.locator(".message")).to_have_count(0)

    await page.keyboard.press("Enter")
    await expect(page.locator(".message.user .message-body")).to_have_text(["line one\nline two"])
    await wait_answer_ended(page)
    await expect(page.locator("#prompt")).to_have_value("")
    assert rill.fake.requests[0].body["messages"] == [{"role": "user", "content": "line one\nline two"}]

    # Blank input: neither Enter nor the Send button sends anything...
    await page.fill("#prompt", "  \n\t  ")
    await page.press("#prompt", "Enter")
    await page.click("#send")
    # ...which the next real message proves: it is the very next POST.
    await page.fill("#prompt", "Real one")
    await page.click("#send")
    await expect(page.locator(".message.user .message-body")).to_have_text(["line one\nline two", "Real one"])
    await wait_answer_ended(page)
    assert len(posts) == 2
    assert [r.body["messages"][-1]["content"] for r in rill.fake.requests] == ["line one\nline two", "Real one"]
    assert len(rill.fake.requests) == 2
    await ui.assert_clean()


# 12. Auto-scroll

AT_THE_VERY_BOTTOM = """() => {
  const m = document.getElementById("messages");
  return m.scrollHeight - m.scrollTop - m.clientHeight <= 1;
}"""
NEAR_THE_BOTTOM = """() => {
  const m = document.getElementById("messages");
  return m.scrollHeight > 2 * m.clientHeight && m.scrollHeight - m.scrollTop - m.clientHeight < 60;
}"""


async def test_auto_scroll_follows_until_the_user_scrolls_up_and_jump_returns(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(Reply(chunks=answer([f"Line {i}\n" for i in range(1, 181)], delay=0.025)))
    ui = await open_ui(rill)
    page = ui.page
    jump = page.locator("#jump")
    await send(page, "Count to 180, one number per line")

    # Follows the bottom while the answer grows past two screens.
    await page.wait_for_function(NEAR_THE_BOTTOM)
    assert await jump.is_hidden()

    # The user scrolls up with the wheel: the list stays where the user put it.
    box = await page.locator("#messages").bounding_box()
    assert box is not None
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.wheel(0, -4000)
    await expect(jump).to_be_visible()
    await page.wait_for_function("() => document.getElementById('messages').scrollTop < 100")
    before = await scroll_state(page)
    await page.wait_for_function(
        "(height) => document.getElementById('messages').scrollHeight > height + 300", arg=before["height"]
    )
    after = await scroll_state(page)
    # Still up there (Chromium's scroll anchoring may shift it by a line), far from the bottom.
    assert after["top"] < before["top"] + 50, (before, after)
    assert after["gap"] > 300, after
    assert await page.locator(ANSWER).evaluate("(a) => a.classList.contains('streaming')"), "the test was too slow"

    # Jump: back to the bottom, and following again.
    await jump.click()
    await expect(jump).to_be_hidden()
    await page.wait_for_function(NEAR_THE_BOTTOM)
    await wait_answer_ended(page)
    assert await answer_text(page) == "\n".join(f"Line {i}" for i in range(1, 181))
    # The end of the answer is in view, down to its last pixel.
    await page.wait_for_function(AT_THE_VERY_BOTTOM, timeout=2000)
    await ui.assert_clean()


# 13. Language


async def test_chinese_browser_gets_chinese_and_the_language_choice_persists(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill, locale="zh-CN")
    page = ui.page
    await expect(page.locator("#send")).to_have_text("发送")
    await expect(page.locator("#new-chat")).to_have_text("新对话")
    await expect(page.locator("#theme-toggle")).to_have_text("主题：跟随系统")
    await expect(page.locator("#prompt")).to_have_attribute("placeholder", re.compile("^给 Rill 发消息"))
    assert await page.evaluate("() => document.documentElement.lang") == "zh-CN"
    await ask(page, "你好")
    await expect(page.locator(f"{ANSWER} >> .message-role")).to_have_text("助手")

    await page.select_option("#language", "en")
    await expect(page.locator("#send")).to_have_text("Send")
    await expect(page.locator("#new-chat")).to_have_text("New chat")
    await expect(page.locator("#theme-toggle")).to_have_text("Theme: system")
    await expect(page.locator(f"{ANSWER} >> .message-role")).to_have_text("Assistant")
    await expect(page.locator(f'{ANSWER} >> [data-action="copy"]')).to_have_text("Copy")
    assert await page.evaluate("() => document.documentElement.lang") == "en"

    await reload(page)
    await expect(page.locator("#send")).to_have_text("Send")
    await expect(page.locator("#language")).to_have_value("en")
    await expect(page.locator(f"{ANSWER} >> .message-role")).to_have_text("Assistant")

    await page.select_option("#language", "auto")  # back to the browser's language
    await expect(page.locator("#send")).to_have_text("发送")
    await ui.assert_clean()


# 14. Theme

DARK_BG = "rgb(22, 24, 29)"
LIGHT_BG = "rgb(255, 255, 255)"


async def theme_state(page: Page) -> tuple[str | None, str]:
    result = await page.evaluate(
        "() => [document.documentElement.dataset.theme ?? null, getComputedStyle(document.body).backgroundColor]"
    )
    assert isinstance(result, list)
    return result[0], result[1]


async def test_theme_follows_the_system_then_cycles_and_persists(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill, color_scheme="dark")
    page = ui.page
    toggle = page.locator("#theme-toggle")
    assert await theme_state(page) == (None, DARK_BG)
    await expect(toggle).to_have_text("Theme: system")

    await toggle.click()
    await expect(toggle).to_have_text("Theme: light")
    assert await theme_state(page) == ("light", LIGHT_BG)  # overrides the dark system
    await reload(page)
    assert await theme_state(page) == ("light", LIGHT_BG)
    await expect(toggle).to_have_text("Theme: light")

    await toggle.click()
    await expect(toggle).to_have_text("Theme: dark")
    await page.emulate_media(color_scheme="light")
    assert await theme_state(page) == ("dark", DARK_BG)  # overrides a light system too
    await reload(page)
    assert await theme_state(page) == ("dark", DARK_BG)

    await toggle.click()
    await expect(toggle).to_have_text("Theme: system")
    assert await theme_state(page) == (None, LIGHT_BG)
    await reload(page)
    await expect(toggle).to_have_text("Theme: system")
    assert await theme_state(page) == (None, LIGHT_BG)
    await ui.assert_clean()


# 15. Errors on POST


async def test_a_refused_post_is_explained_inline_and_retried_by_itself_after_its_wait(
    start_rill: StartRill, open_ui: OpenPage
) -> None:
    rill = await start_rill(limits={"max_concurrent_per_client": 1})
    rill.fake.script(Reply(chunks=[chunk("Still going")], end="hang"))
    ui = await open_ui(rill)
    ui.allowed_console.append("status of 429")  # the browser logs the refused POST
    page = ui.page
    posts = capture_posts(page)

    await send(page, "Long one")
    await page.locator(ANSWER).get_by_text("Still going").wait_for()
    await page.click("#new-chat")
    await send(page, "Another")

    error = page.locator(f"{ANSWER} >> .message-error")
    await expect(error).to_be_visible()
    await expect(error.locator(".error-text")).to_have_text(
        "You have as many answers streaming as this server allows. Wait for one to finish, or stop one."
    )
    # The server's exact words (with its limit) under Details; Retry-After: 5 counts down.
    await expect(error.locator(".error-detail-text")).to_have_text(
        "You already have 1 answers streaming. Wait for one to finish or stop one."
    )
    await expect(error.locator(".error-countdown")).to_have_text(re.compile(r"^Trying again in [1-5] s…$"))
    await expect(error.locator('[data-action="cancel-retry"]')).to_be_visible()
    await expect(error.locator('[data-action="retry"]')).to_be_hidden()
    stored = (await ui.stored_conversations())[0]["messages"][1]
    assert stored["status"] == "error"
    assert stored["error"]["code"] == "too_many_generations"
    assert len(rill.fake.requests) == 1

    # Stop the other answer: the automatic retry then succeeds.
    await page.locator(TITLES, has_text="Long one").click()
    await page.click("#stop")
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3)
    await wait_answer_ended(page)
    await page.locator(TITLES, has_text="Another").click()
    # What is left of Retry-After: 5, then the answer: more than expect's default 5 s.
    await expect(page.locator(ANSWER_BODY)).to_have_text("Hello world", timeout=15_000)
    await wait_answer_ended(page)
    await expect(error).to_be_hidden()
    assert len(posts) == 3
    assert posts[2]["client_id"] == posts[1]["client_id"]  # refused, so never made: the same one is safe
    assert rill.fake.requests[1].body["messages"] == [{"role": "user", "content": "Another"}]
    await ui.assert_clean()


# 16. Phone width


SIDEBAR_SHOWN = "() => document.getElementById('sidebar').getBoundingClientRect().left >= 0"
SIDEBAR_HIDDEN = "() => document.getElementById('sidebar').getBoundingClientRect().right <= 0"


async def sidebar_right_edge(page: Page) -> float:
    right = await page.evaluate("() => document.getElementById('sidebar').getBoundingClientRect().right")
    assert isinstance(right, int | float)
    return float(right)


async def test_phone_sidebar_is_a_drawer_that_closes_when_a_conversation_opens(rill: Rill, open_ui: OpenPage) -> None:
    ui = await open_ui(rill, viewport=PHONE)
    page = ui.page
    await ask(page, "First chat")
    assert await sidebar_right_edge(page) <= 0  # off-screen
    menu = page.locator("#menu")
    await expect(menu).to_be_visible()
    await expect(menu).to_have_attribute("aria-expanded", "false")

    await menu.click()
    await page.wait_for_function(SIDEBAR_SHOWN)
    await expect(menu).to_have_attribute("aria-expanded", "true")
    await expect(page.locator("#scrim")).to_be_visible()
    await page.click("#new-chat")
    await page.wait_for_function(SIDEBAR_HIDDEN)
    await ask(page, "Second chat")

    await menu.click()
    await page.wait_for_function(SIDEBAR_SHOWN)
    await page.locator(TITLES, has_text="First chat").click()
    await page.wait_for_function(SIDEBAR_HIDDEN)
    await expect(page.locator("#chat-title")).to_have_text("First chat")
    await expect(page.locator(".message.user .message-body")).to_have_text(["First chat"])
    await expect(page.locator("#scrim")).to_be_hidden()
    await expect(menu).to_have_attribute("aria-expanded", "false")
    await ui.assert_clean()


@pytest.mark.parametrize("reason", ["tool_calls", "constructor", "__proto__", "toString"])
async def test_an_unknown_finish_reason_ends_the_answer_as_done(rill: Rill, open_ui: OpenPage, reason: str) -> None:
    """The upstream names the finish reason: one that is an Object property name must not
    turn the message's status into a function or an object (it is stored and reloaded)."""
    rill.fake.script(Reply(chunks=answer(["All ", "there."], finish=reason)))
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Call a tool")
    await expect(page.locator(f"{ANSWER} >> .message-body")).to_have_text("All there.")
    assert (await ui.stored_conversations())[0]["messages"][1]["status"] == "done"
    await page.reload()
    await expect(page.locator(f"{ANSWER} >> .message-body")).to_have_text("All there.")
    assert (await ui.stored_conversations())[0]["messages"][1]["status"] == "done"
    await ui.assert_clean()
