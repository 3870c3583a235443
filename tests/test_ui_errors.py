"""How the chat page reports a failed answer, in real Chromium: the page's own words for
each error code (English and 简体中文, the server's message under "Details"), the model
key's rejection told to users without the operator's advice (unless the reader runs this
Rill), one way on after a failure, no timing line for an answer that never started, and
the one automatic retry, with a countdown, of a limit that said how long to wait."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, Route, expect

from .browser import ANSWER, START_ANSWER, answer_text, send, wait_answer_ended
from .conftest import KEY_ENV, SENTINEL_KEY, OpenPage, Rill, StartRill
from .fakes import Reply, answer, chunk
from .test_ui_access import TOKEN, TOKENS, models_loaded, open_locked, sign_in

README = Path(__file__).resolve().parent.parent / "README.md"

USER_AUTH_TEXT = "The model API rejected this server's API key, so no model can answer. Tell whoever runs this Rill."
# How long an expect may wait when a countdown comes first: more than its default 5 s, as
# the machines that run these tests are often busy.
AFTER_COUNTDOWN = 15_000
LOCAL_AUTH_TEXT = (
    "The model API rejected this server's API key, so no model can answer. If you run this Rill, "
    "check its API key for this provider and restart it; otherwise tell whoever runs it."
)


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps({"error": {"message": message, "type": "some_error", "code": None}}).encode()
    return Reply(status=status, body=body, headers=headers or {})


class Answer:
    """The last answer's parts a user sees."""

    def __init__(self, page: Page) -> None:
        last = page.locator(ANSWER)
        self.error = last.locator(".message-error")
        self.text = self.error.locator(".error-text")
        self.countdown = self.error.locator(".error-countdown")
        self.details = self.error.locator(".error-details")
        self.retry = self.error.locator('[data-action="retry"]')
        self.cancel = self.error.locator('[data-action="cancel-retry"]')
        self.regenerate = last.locator('[data-action="regenerate"]')
        self.continue_ = last.locator('[data-action="continue"]')
        self.stats = last.locator(".message-stats")

    async def only_visible(self, *wanted: Locator) -> None:
        """Exactly these of Retry, Cancel, Regenerate and Continue show."""
        for button in (self.retry, self.cancel, self.regenerate, self.continue_):
            if any(button is w for w in wanted):
                await expect(button).to_be_visible()
            else:
                await expect(button).to_be_hidden()


async def fails(page: Page, prompt: str = "Hi") -> Answer:
    await send(page, prompt)
    last = Answer(page)
    await expect(last.error).to_be_visible()
    return last


# 18. The model API refuses the server's key


async def test_a_rejected_model_key_tells_users_to_tell_the_operator(start_rill: StartRill, browser: Browser) -> None:
    rill = await start_rill(environ=TOKENS)  # access tokens: the readers are not the operator
    rill.fake.script(error_reply(401, "Authentication Fails, Your api key is invalid"))
    ui = await open_locked(browser, rill)
    page = ui.page
    await sign_in(page, TOKEN)
    await models_loaded(page)

    last = await fails(page)
    await expect(last.text).to_have_text(USER_AUTH_TEXT)
    await expect(last.details).to_be_hidden()
    html = await page.content()
    assert KEY_ENV not in html, "the operator's advice reached a visitor"
    assert "restart" not in html.lower()
    assert SENTINEL_KEY not in html
    async with page.expect_download() as info:  # nor through the export
        await page.click("#export")
    exported = await asyncio.to_thread(Path(await (await info.value).path()).read_text, "utf-8")
    assert f"> {USER_AUTH_TEXT}" in exported
    assert KEY_ENV not in exported
    # Asking again cannot help until the operator acts: no Retry; Regenerate for later.
    await last.only_visible(last.regenerate)
    await expect(last.stats).to_have_text("")
    await ui.assert_clean()


async def test_a_rejected_model_key_on_a_local_run_adds_the_operators_advice(rill: Rill, open_ui: OpenPage) -> None:
    rill.fake.script(error_reply(401, "Authentication Fails, Your api key is invalid"))
    ui = await open_ui(rill)  # no access tokens: whoever reads this runs the server
    page = ui.page

    last = await fails(page)
    await expect(last.text).to_have_text(LOCAL_AUTH_TEXT)
    await expect(last.details).to_be_visible()
    await last.details.locator("summary").click()
    said = (await ui.stored_conversations())[0]["messages"][1]["error"]["message"]
    await expect(last.details.locator(".error-detail-text")).to_have_text(said)  # the server's own words
    assert SENTINEL_KEY not in await page.content()
    await ui.assert_clean()


# 19. One way on after a failure, and the automatic retry after a limit's wait


async def test_a_rate_limit_with_a_wait_counts_down_and_then_succeeds_by_itself(
    start_rill: StartRill, open_ui: OpenPage
) -> None:
    rill = await start_rill(upstream={"retries": 0})  # the server passes the 429 on at once
    rill.fake.script(
        error_reply(429, "Rate limit reached", {"Retry-After": "2"}),
        Reply(chunks=answer(["Back", " again"])),
    )
    ui = await open_ui(rill)
    page = ui.page
    seen = await watch_countdown(page)

    last = await fails(page)
    await expect(last.text).to_have_text(
        "The model API is limiting how many requests this server may send (rate limit)."
    )
    await expect(last.countdown).to_have_text(re.compile(r"^Trying again in [12] s…$"))
    await last.only_visible(last.cancel)
    await expect(last.stats).to_have_text("")

    await expect(page.locator(f"{ANSWER} >> .message-body")).to_have_text("Back again", timeout=AFTER_COUNTDOWN)
    await wait_answer_ended(page)
    await expect(last.error).to_be_hidden()
    await last.only_visible(last.regenerate)
    texts = await seen()
    assert "Trying again in 2 s…" in texts, texts  # it counted down
    assert "Trying again in 1 s…" in texts, texts
    assert len(rill.fake.requests) == 2
    await ui.assert_clean()


async def test_a_second_rate_limit_waits_for_the_user(start_rill: StartRill, open_ui: OpenPage) -> None:
    rill = await start_rill(upstream={"retries": 0})
    limit = error_reply(429, "Rate limit reached", {"Retry-After": "2"})
    rill.fake.script(limit, limit)
    ui = await open_ui(rill)
    page = ui.page

    last = await fails(page)
    await expect(last.countdown).to_be_visible()
    await wait_for_requests(rill, 2)  # the automatic retry, refused again
    await expect(last.retry).to_be_visible(timeout=AFTER_COUNTDOWN)
    await expect(last.countdown).to_be_hidden()
    await last.only_visible(last.retry)
    await asyncio.sleep(2.5)  # longer than Retry-After: nothing starts by itself now
    assert len(rill.fake.requests) == 2

    await last.retry.click()
    await wait_answer_ended(page)
    assert await answer_text(page) == "Hello world"
    assert len(rill.fake.requests) == 3
    await ui.assert_clean()


async def test_cancel_stops_the_countdown(start_rill: StartRill, open_ui: OpenPage) -> None:
    rill = await start_rill(upstream={"retries": 0})
    rill.fake.script(error_reply(429, "Rate limit reached", {"Retry-After": "2"}))
    ui = await open_ui(rill)
    page = ui.page

    last = await fails(page)
    await expect(last.countdown).to_be_visible()
    await last.cancel.click()
    await expect(last.countdown).to_be_hidden()
    await last.only_visible(last.retry)
    await asyncio.sleep(2.5)
    assert len(rill.fake.requests) == 1, "the cancelled retry ran anyway"
    await expect(last.retry).to_be_visible()

    await last.retry.click()
    await wait_answer_ended(page)
    assert await answer_text(page) == "Hello world"
    await ui.assert_clean()


async def test_a_refused_post_with_retry_after_is_retried_by_itself_with_the_same_client_id(
    rill: Rill, open_ui: OpenPage
) -> None:
    ui = await open_ui(rill)
    page = ui.page
    ui.allowed_console.append("status of 429")  # the browser logs the refused POST
    client_ids: list[str] = []

    async def limited_once(route: Route) -> None:
        client_ids.append((route.request.post_data_json or {})["client_id"])
        if len(client_ids) > 1:
            await route.continue_()
            return
        said = "You started 1 answers in the last minute, the limit. Try again in 1 s."
        body = {"error": {"code": "rate_limited", "message": said}}
        await route.fulfill(status=429, json=body, headers={"Retry-After": "2"})

    await page.route(START_ANSWER, limited_once)
    last = await fails(page)
    await expect(last.text).to_have_text("You have started as many answers as this server allows per minute.")
    await expect(last.countdown).to_have_text(re.compile(r"^Trying again in [12] s…$"))
    await expect(page.locator(f"{ANSWER} >> .message-body")).to_have_text("Hello world", timeout=AFTER_COUNTDOWN)
    await expect(last.error).to_be_hidden()
    assert len(client_ids) == 2
    assert client_ids[0] == client_ids[1]  # the server never made the first one
    assert len(rill.fake.requests) == 1
    await ui.assert_clean()


async def test_a_refused_stream_resumes_the_same_answer_instead_of_asking_again(
    start_rill: StartRill, open_ui: OpenPage
) -> None:
    # Two: the page's change feed (history on the server) holds one of them.
    rill = await start_rill(limits={"max_streams_per_client": 2})
    rill.fake.script(Reply(chunks=[chunk("Held")], end="hang"), Reply(chunks=answer(["Paid", " once"])))
    ui = await open_ui(rill)
    ui.allowed_console.append("429")  # the refused stream, and the page asking why
    page = ui.page
    # Another stream of this browser holds the only one allowed.
    await page.evaluate(
        """async () => {
          const response = await fetch("/api/chat", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ messages: [{ role: "user", content: "hold" }] }),
          });
          const { id } = await response.json();
          window.__held = new EventSource(`/api/chat/${id}/events`);
          await new Promise((resolve) => window.__held.addEventListener("delta", resolve, { once: true }));
        }"""
    )

    last = await fails(page)
    await expect(last.text).to_have_text("You have as many answer streams open as this server allows. Close some tabs.")
    await expect(last.countdown).to_be_visible()  # Retry-After: 5
    stored = (await ui.stored_conversations())[0]["messages"][1]
    assert stored["error"]["code"] == "too_many_streams"
    await page.evaluate("window.__held.close()")

    await expect(page.locator(f"{ANSWER} >> .message-body")).to_have_text("Paid once", timeout=AFTER_COUNTDOWN)
    await wait_answer_ended(page)
    assert len(rill.fake.requests) == 2, "the retry asked the model again instead of following its answer"
    await ui.assert_clean()


ONE_ACTION = [
    # replies, code, which button: a request that will fail the same way gets Regenerate
    # (after changing the model, say); one that may work now gets Retry, never both.
    pytest.param([error_reply(402, "Insufficient Balance")], "upstream_payment", "regenerate", id="402"),
    pytest.param([error_reply(400, "Model Not Exist")], "upstream_bad_request", "regenerate", id="400"),
    pytest.param([error_reply(500, "Internal error")], "upstream_unavailable", "retry", id="500"),
    pytest.param([error_reply(429, "Rate limit reached")], "upstream_rate_limited", "retry", id="429-no-wait"),
]


@pytest.mark.parametrize(("replies", "code", "action"), ONE_ACTION)
async def test_after_a_failure_before_any_text_one_action_and_no_timing_line(
    start_rill: StartRill, open_ui: OpenPage, replies: list[Reply], code: str, action: str
) -> None:
    rill = await start_rill(upstream={"retries": 0})
    rill.fake.script(*replies)
    ui = await open_ui(rill)
    page = ui.page

    last = await fails(page)
    await wait_answer_ended(page)
    stored = (await ui.stored_conversations())[0]["messages"][1]
    assert stored["error"]["code"] == code
    button = last.retry if action == "retry" else last.regenerate
    await last.only_visible(button)
    await expect(last.countdown).to_be_hidden()
    await expect(last.stats).to_have_text("")  # was "0.0 s"

    await button.click()
    await wait_answer_ended(page)
    assert await answer_text(page) == "Hello world"
    await expect(last.error).to_be_hidden()
    await expect(last.stats).not_to_have_text("")  # a real answer keeps its line
    await ui.assert_clean()


# 20. The page's own words, in the page's language


async def test_the_chinese_page_explains_errors_in_chinese(start_rill: StartRill, open_ui: OpenPage) -> None:
    rill = await start_rill(upstream={"retries": 0})
    rill.fake.script(error_reply(402, "Insufficient Balance"), error_reply(429, "Rate limit reached"))
    ui = await open_ui(rill, locale="zh-CN")
    page = ui.page

    last = await fails(page, "你好")
    await expect(last.text).to_have_text("模型服务商表示本服务器的账户余额不足，需要充值。")
    await expect(last.regenerate).to_have_text("重新生成")
    await expect(last.details.locator("summary")).to_have_text("详情")
    await last.details.locator("summary").click()  # the server's exact words stay reachable
    await expect(last.details.locator(".error-detail-text")).to_contain_text("Insufficient Balance")

    await page.click("#new-chat")
    last = await fails(page, "再来一次")
    await expect(last.text).to_have_text("模型 API 正在限制本服务器的请求频率（速率限制）。")
    await expect(last.retry).to_have_text("重试")

    await page.select_option("#language", "en")  # the stored error follows the language
    await expect(last.text).to_have_text(
        "The model API is limiting how many requests this server may send (rate limit)."
    )
    await ui.assert_clean()


async def test_the_countdown_speaks_chinese(start_rill: StartRill, open_ui: OpenPage) -> None:
    rill = await start_rill(upstream={"retries": 0})
    rill.fake.script(error_reply(429, "Rate limit reached", {"Retry-After": "2"}))
    ui = await open_ui(rill, locale="zh-CN")
    page = ui.page
    last = await fails(page, "你好")
    await expect(last.countdown).to_have_text(re.compile(r"^[12] 秒后自动重试…$"))
    await expect(last.cancel).to_have_text("取消")
    await expect(page.locator(f"{ANSWER} >> .message-body")).to_have_text("Hello world", timeout=AFTER_COUNTDOWN)
    await ui.assert_clean()


@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
async def test_an_unknown_code_shows_the_servers_message(rill: Rill, open_ui: OpenPage, locale: str) -> None:
    ui = await open_ui(rill, locale=locale)
    page = ui.page
    ui.allowed_console.append("status of 400")

    async def newer_server(route: Route) -> None:
        body = {"error": {"code": "brand_new_code", "message": "A newer Rill refuses this for a new reason."}}
        await route.fulfill(status=400, json=body)

    await page.route(START_ANSWER, newer_server)
    last = await fails(page)
    await expect(last.text).to_have_text("A newer Rill refuses this for a new reason.")
    await expect(last.details).to_be_hidden()  # nothing more to show
    await ui.assert_clean()


def readme_error_codes() -> set[str]:
    """Every error code README's Event reference lists (stream errors and request errors)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Event reference", 1)[1].split("\n## ", 1)[0]
    paragraphs = [p for p in section.split("\n\n") if p.startswith(("Error codes on the stream:", "Request errors:"))]
    assert len(paragraphs) == 2, "README's Event reference changed shape: update this parser"
    codes: set[str] = set()
    for paragraph in paragraphs:
        # Parentheses explain a code; a name in them is a setting (`resume_grace`), not a code.
        bare = re.sub(r"\([^()]*\)", "", paragraph)
        codes.update(re.findall(r"`([a-z][a-z0-9_]*)`", bare))
    return codes


async def test_every_documented_error_code_has_english_and_chinese_text(rill: Rill, open_ui: OpenPage) -> None:
    codes = readme_error_codes()
    assert {"upstream_auth", "upstream_rate_limited", "internal_error", "bad_json", "bad_token"} <= codes
    assert "resume_grace" not in codes
    ui = await open_ui(rill)
    missing = await ui.page.evaluate(
        """async (codes) => {
          const i18n = await import("/static/js/i18n.js");
          const missing = [];
          for (const code of codes) {
            for (const language of i18n.LANGUAGES) {
              if (!i18n.hasTextIn(language, `error.${code}`)) missing.push(`${language}: ${code}`);
            }
          }
          return missing;
        }""",
        sorted(codes),
    )
    assert missing == [], f"error codes without a translation: {missing}"
    await ui.assert_clean()


# helpers


async def wait_for_requests(rill: Rill, count: int, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while len(rill.fake.requests) < count:
            await asyncio.sleep(0.02)


async def watch_countdown(page: Page) -> Any:
    """Records every text the countdown line shows; call the result to read them."""
    await page.evaluate(
        """() => {
          window.__countdown = [];
          new MutationObserver(() => {
            for (const line of document.querySelectorAll(".error-countdown")) {
              const text = line.textContent;
              if (text && window.__countdown.at(-1) !== text) window.__countdown.push(text);
            }
          }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
        }"""
    )

    async def seen() -> list[str]:
        result = await page.evaluate("window.__countdown")
        assert isinstance(result, list)
        return [str(text) for text in result]

    return seen
