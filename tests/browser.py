"""Driving the chat page in real headless Chromium (Debian's package) with Playwright,
and watching it for anything that must never happen: page errors, console errors,
dialogs, Content-Security-Policy or Trusted Types violations."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, Playwright, expect

CHROMIUM = os.environ.get("RILL_CHROMIUM", "/usr/bin/chromium")
# As root (sessions and CI) Chromium needs --no-sandbox; the rest keep it from reaching
# for Google's servers, which this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]
SCREENSHOT_DIR = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"

# Records violations before any page script runs. Init scripts come in through the
# DevTools protocol, so the page's own CSP does not apply to this one.
WATCH_SCRIPT = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push({directive: event.violatedDirective, blocked: event.blockedURI, sample: event.sample});
});
"""

PHONE = {"width": 390, "height": 844}


def chromium_missing() -> bool:
    return not Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is None


async def launch(playwright: Playwright) -> Browser:
    if chromium_missing():
        raise RuntimeError(f"Chromium not found at {CHROMIUM}: install Debian's chromium (.ci/run does).")
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@dataclass
class WatchedPage:
    """A page plus everything it said that a user would call a bug."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    # Console errors a test expects (substrings), e.g. a 404 the test provokes on purpose.
    allowed_console: list[str] = field(default_factory=list)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    async def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    async def violations(self) -> list[dict[str, Any]]:
        result = await self.page.evaluate("window.__violations || []")
        assert isinstance(result, list)
        return result

    async def assert_clean(self) -> None:
        unexpected = [e for e in self.console_errors if not any(a in e for a in self.allowed_console)]
        assert unexpected == [], f"console errors: {unexpected}"
        assert self.page_errors == [], f"page errors: {self.page_errors}"
        assert self.dialogs == [], f"dialogs opened: {self.dialogs}"
        assert await self.violations() == [], "CSP / Trusted Types violations"

    async def stored_conversations(self) -> list[dict[str, Any]]:
        """Every conversation in localStorage, newest first (what the sidebar shows)."""
        raw = await self.page.evaluate(
            """() => {
              const index = JSON.parse(localStorage.getItem("rill.v1.conversations") || "[]");
              index.sort((a, b) => b.updated - a.updated);
              return JSON.stringify(index.map((e) => JSON.parse(localStorage.getItem("rill.v1.conversation." + e.id))));
            }"""
        )
        result = json.loads(raw)
        assert isinstance(result, list)
        return result


async def watch(page: Page) -> WatchedPage:
    watched = WatchedPage(page)
    await page.add_init_script(WATCH_SCRIPT)
    page.on("console", watched._on_console)
    page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
    page.on("dialog", watched._on_dialog)
    return watched


async def another_tab(ui: WatchedPage, url: str) -> WatchedPage:
    """A second tab of the same browser (same localStorage), watched like the first."""
    tab = await watch(await ui.page.context.new_page())
    await tab.page.goto(url)
    return tab


async def screenshot(page: Page, name: str) -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


ANSWER = ".message.assistant >> nth=-1"
# The request that starts an answer, for page.route: POST /api/chat, or with history on
# the server POST /api/conversations/{id}/messages.
START_ANSWER = re.compile(r"/api/(chat|conversations/[^/?]+/messages)$")
# The model picker is filled: the page has talked to the server.
MODELS_READY = "#model option[value]:not([value=''])"


async def send(page: Page, text: str) -> None:
    await page.fill("#prompt", text)
    await page.press("#prompt", "Enter")


async def wait_answer_ended(page: Page, timeout: float = 10.0) -> None:
    """Until the last answer has stopped streaming (finished, stopped or failed)."""
    await page.wait_for_function(
        """() => {
          const answers = document.querySelectorAll(".message.assistant");
          return answers.length > 0 && !answers[answers.length - 1].classList.contains("streaming");
        }""",
        timeout=timeout * 1000,
    )


async def reload(page: Page) -> None:
    await page.reload()
    await page.wait_for_selector(MODELS_READY, state="attached")


async def ask(page: Page, text: str) -> None:
    """Sends text and waits until its answer has ended."""
    await send(page, text)
    await expect(page.locator(".message.user >> nth=-1 >> .message-body")).to_have_text(text)
    await wait_answer_ended(page)


async def answer_text(page: Page) -> str:
    """The rendered text of the last answer, as a user sees it."""
    return await page.locator(f"{ANSWER} >> .message-body").inner_text()
