"""The chat page on a Rill with access tokens: it asks for a token once, keeps the
session in a cookie page scripts cannot read, asks again when the session ends, and
signs out."""

from __future__ import annotations

import asyncio

from playwright.async_api import Browser, Page

from .browser import ANSWER, WatchedPage, answer_text, screenshot, send, wait_answer_ended, watch
from .conftest import Rill, StartRill

TOKEN = "alice-0123456789abcdefghij"
TOKENS = {"RILL_ACCESS_TOKENS": f"alice:{TOKEN}"}
# Chromium logs every 401 answer as a console error; those are expected here.
EXPECTED_401 = "status of 401"


async def open_locked(browser: Browser, rill: Rill) -> WatchedPage:
    context = await browser.new_context()
    ui = await watch(await context.new_page())
    ui.allowed_console.append(EXPECTED_401)
    await ui.page.goto(str(rill.url))
    return ui


async def sign_in(page: Page, token: str) -> None:
    await page.locator("#signin-token").fill(token)
    await page.locator("#signin-token").press("Enter")


async def models_loaded(page: Page) -> None:
    await page.wait_for_selector("#model option[value]:not([value=''])", state="attached")


async def open_signed_in(start_rill: StartRill, browser: Browser) -> tuple[Rill, WatchedPage]:
    """A Rill with access tokens, and a page signed in to it with its models loaded."""
    rill = await start_rill(environ=TOKENS)
    ui = await open_locked(browser, rill)
    await sign_in(ui.page, TOKEN)
    await models_loaded(ui.page)
    return rill, ui


async def test_the_page_asks_for_a_token_once(start_rill: StartRill, browser: Browser) -> None:
    rill = await start_rill(environ=TOKENS)
    ui = await open_locked(browser, rill)
    page = ui.page
    api_calls: list[str] = []
    page.on("request", lambda request: api_calls.append(request.url) if "/api/" in request.url else None)
    dialog = page.locator("#signin")
    await dialog.wait_for()
    assert await page.locator("#signin-token").evaluate("(input) => document.activeElement === input")
    await screenshot(page, "sign-in")

    await page.keyboard.press("Escape")  # there is nothing to go back to
    await asyncio.sleep(0.1)
    assert await dialog.is_visible()

    await sign_in(page, "wrong-0123456789abcdefghij")
    error = page.locator("#signin .signin-error")
    await error.wait_for()
    assert await error.inner_text() == "That access token is not valid."
    assert await page.locator("#model").input_value() == ""  # nothing loaded behind the dialog

    await sign_in(page, TOKEN)
    await dialog.wait_for(state="hidden")
    await models_loaded(page)
    assert await page.locator("#sign-out").is_visible()
    await send(page, "Hi")
    await wait_answer_ended(page)
    assert await answer_text(page) == "Hello world"

    # The session is an HttpOnly, SameSite=Strict cookie: page scripts never see it.
    cookies = await page.context.cookies()
    session = next(c for c in cookies if c["name"] == "rill_session")
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert await page.evaluate("() => document.cookie") == ""
    assert TOKEN not in await page.evaluate("() => JSON.stringify(localStorage)")

    await page.reload()
    await models_loaded(page)
    assert not await dialog.is_visible()
    assert "/api/models" in " ".join(api_calls)
    await ui.assert_clean()


async def test_a_session_that_ends_mid_use_asks_again_and_retry_works(start_rill: StartRill, browser: Browser) -> None:
    rill, ui = await open_signed_in(start_rill, browser)
    page = ui.page

    await page.context.clear_cookies()  # as when the session expires or the token is rotated
    await send(page, "Hi")
    await page.locator("#signin").wait_for()
    error = page.locator(f"{ANSWER} >> .error-text")
    await error.wait_for()
    assert await error.inner_text() == "You are signed out of this Rill. Sign in, then try again."
    assert rill.fake.requests == []

    await sign_in(page, TOKEN)
    await page.locator("#signin").wait_for(state="hidden")
    await page.locator(f"{ANSWER} >> [data-action=retry]").click()
    await wait_answer_ended(page)
    assert await answer_text(page) == "Hello world"
    assert len(rill.fake.requests) == 1
    await ui.assert_clean()


async def test_sign_out(start_rill: StartRill, browser: Browser) -> None:
    _, ui = await open_signed_in(start_rill, browser)
    page = ui.page
    await page.click("#sign-out")
    await page.locator("#signin").wait_for()
    status = await page.evaluate("() => fetch('/api/models').then((response) => response.status)")
    assert status == 401
    assert [c["name"] for c in await page.context.cookies()] == []
    await ui.assert_clean()


async def test_an_open_rill_never_asks(rill: Rill, browser: Browser) -> None:
    context = await browser.new_context()
    ui = await watch(await context.new_page())
    await ui.page.goto(str(rill.url))
    await models_loaded(ui.page)
    assert not await ui.page.locator("#signin").is_visible()
    assert not await ui.page.locator("#sign-out").is_visible()
    await ui.assert_clean()
