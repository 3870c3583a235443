"""Model output is data, never markup: an XSS corpus streamed as an answer (and typed
as a prompt) renders inert in real Chromium, with no dialog, no script, no request to
a URL from the output, and no CSP violation."""

from __future__ import annotations

import random

import pytest
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Request

from .browser import ANSWER, answer_text, send, wait_answer_ended
from .conftest import SENTINEL_KEY, OpenPage, Rill
from .fakes import Reply, answer, chunk

# Every piece tries to run script, load something, or restyle the page. window.__pwned
# is the canary the payloads would set if they ever ran.
CORPUS = [
    "<script>window.__pwned = 'script'; alert('script')</script>",
    "<img src=x onerror=\"window.__pwned='img'; alert('img')\">",
    "<svg onload=\"window.__pwned='svg'\"><script>alert('svg')</script></svg>",
    "<iframe src=\"javascript:window.__pwned='iframe'\"></iframe>",
    "[click me](javascript:window.__pwned='link')",
    "[encoded](jav&#x61;script:alert('encoded'))",
    "[spaced](  javascript:alert('spaced'))",
    "![pic](javascript:alert('image'))",
    "![tracker](http://127.0.0.1:9/track.png?leak=conversation)",
    "<a href=\"javascript:alert('raw-a')\">raw link</a>",
    "&lt;script&gt;alert('entity')&lt;/script&gt; &#60;img src=x onerror=alert(1)&#62;",
    "<details open ontoggle=\"window.__pwned='details'\">x</details>",
    "<math><mtext><table><mglyph><style><img src=x onerror=\"window.__pwned='mxss'\">",
    "<style>body { display: none }</style>",
    "<form action=\"javascript:alert('form')\"><button>go</button></form>",
    "```html\n<script>window.__pwned='code'</script>\n```",
    "`<img src=x onerror=\"window.__pwned='codespan'\">`",
    "<div style=\"background:url(javascript:alert('css'))\">styled</div>",
    "<object data=\"javascript:alert('object')\"></object>",
    '<meta http-equiv="refresh" content="0;url=javascript:alert(\'meta\')">',
    "<base href=\"javascript:alert('base')//\">",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    '<a href="https://example.com/" onclick="window.__pwned=\'onclick\'">ok link</a>',
    "[fine](https://example.com/docs)",
    "[inside](/api/chat/0123456789abcdef0123456789abcdef) [relative](healthz) [proto](//evil.example/x)",
]
PAYLOAD = "\n\n".join(CORPUS)

FORBIDDEN_ELEMENTS = (
    "script, img, svg, iframe, object, embed, style, form, meta, base, math, input, button:not(.code-copy)"
)


def split_everywhere(text: str, seed: int) -> list[str]:
    """Tokens of 1 to 6 characters, so tags and entities break across token boundaries."""
    rng = random.Random(seed)
    tokens, i = [], 0
    while i < len(text):
        size = rng.randint(1, 6)
        tokens.append(text[i : i + size])
        i += size
    return tokens


@pytest.mark.parametrize("seed", [1, 2])
async def test_xss_corpus_streamed_as_an_answer_is_inert(rill: Rill, open_page: OpenPage, seed: int) -> None:
    rill.fake.script(Reply(chunks=answer(split_everywhere(PAYLOAD, seed), delay=0.002)))
    ui = await open_page(rill)
    page = ui.page
    outside: list[str] = []

    def on_request(request: Request) -> None:
        if not request.url.startswith(str(rill.url)):
            outside.append(request.url)

    page.on("request", on_request)
    await send(page, "<img src=x onerror=\"window.__pwned='prompt'\"> tell me about <script>")
    await wait_answer_ended(page)
    body = page.locator(f"{ANSWER} >> .message-body")
    await page.locator("#messages").hover()
    await body.locator("a >> nth=0").hover()  # hover and focus handlers must not fire either

    assert await page.evaluate("() => window.__pwned ?? null") is None
    assert ui.dialogs == []
    assert outside == [], "the page requested a URL taken from model output"
    # Everywhere output or the prompt shows up: both messages, the title, the sidebar.
    for where in ("#messages .message-body", "#chat-title", "#conversations .conversation-open"):
        assert await page.locator(f"{where} :is({FORBIDDEN_ELEMENTS})").count() == 0, where
    handlers = await page.evaluate(
        """() => [...document.querySelectorAll("#messages *, #sidebar *")]
                  .flatMap((el) => [...el.attributes].map((a) => a.name))
                  .filter((name) => name.startsWith("on"))"""
    )
    assert handlers == []
    hrefs = await body.locator("a").evaluate_all("(links) => links.map((a) => a.getAttribute('href'))")
    assert hrefs, "the safe links should still be links"
    assert all(href is None or href.startswith(("https://", "http://")) for href in hrefs), hrefs
    assert "https://example.com/docs" in hrefs
    rels = await body.locator("a[href]").evaluate_all("(links) => links.map((a) => a.rel + ' ' + a.target)")
    assert all("noopener" in rel and "_blank" in rel for rel in rels)

    text = await answer_text(page)
    assert "<script>window.__pwned = 'script'" in text  # raw HTML is shown as text
    assert "<img src=x onerror=" in text
    assert "&lt;script&gt;" not in text
    assert "<script>alert('entity')" in text
    prompt = page.locator(".message.user .message-body")
    assert await prompt.inner_text() == "<img src=x onerror=\"window.__pwned='prompt'\"> tell me about <script>"
    assert (await ui.stored_conversations())[0]["messages"][1]["content"] == PAYLOAD
    await ui.assert_clean()


async def test_trusted_types_refuse_raw_html_in_the_page(rill: Rill, open_page: OpenPage) -> None:
    # The guarantee behind the corpus test: even a bug that assigned model output to
    # innerHTML would throw instead of parsing it. Only DOMPurify's policy may make HTML.
    ui = await open_page(rill)
    with pytest.raises(PlaywrightError, match="TrustedHTML"):
        await ui.page.evaluate("() => { document.querySelector('#messages').innerHTML = '<b>x</b>'; }")
    violations = await ui.violations()
    assert [v["directive"] for v in violations] == ["require-trusted-types-for"]


ERRORS = [
    pytest.param(
        [Reply(status=401, body=b'{"error": {"message": "Authentication Fails"}}')],
        "The model API rejected this server's API key",
        "Regenerate",  # not retryable as it is: the way on is a new answer, once fixed
        id="401",
    ),
    pytest.param(
        [Reply(status=402, body=b'{"error": {"message": "Insufficient Balance"}}')],
        "insufficient balance",
        "Regenerate",
        id="402",
    ),
    pytest.param(
        [Reply(status=429, body=b"{}") for _ in range(3)],  # the first try and both retries
        "rate limit",
        "Retry",
        id="429",
    ),
]


@pytest.mark.parametrize(("replies", "message", "action"), ERRORS)
async def test_upstream_errors_are_shown_with_an_action_that_works(
    rill: Rill, open_page: OpenPage, replies: list[Reply], message: str, action: str
) -> None:
    rill.fake.script(*replies)
    ui = await open_page(rill)
    page = ui.page

    await send(page, "Hi")
    await wait_answer_ended(page)
    error = page.locator(f"{ANSWER} >> .message-error")
    assert message in await error.inner_text()
    assert SENTINEL_KEY not in await page.content()

    await page.locator(ANSWER).get_by_role("button", name=action, exact=True).click()
    await wait_answer_ended(page)
    assert await answer_text(page) == "Hello world"  # the fake's default answer
    assert not await page.locator(f"{ANSWER} >> .message-error").is_visible()
    assert len(page.context.pages) == 1
    await ui.assert_clean()


async def test_a_cut_stream_keeps_the_text_and_offers_continue(rill: Rill, open_page: OpenPage) -> None:
    rill.fake.script(Reply(chunks=[chunk("The first half"), chunk(" of it")], end="cut"))
    ui = await open_page(rill)
    page = ui.page

    await send(page, "Hi")
    await wait_answer_ended(page)
    assert await answer_text(page) == "The first half of it"
    error = page.locator(f"{ANSWER} >> .message-error")
    assert "ended before the answer was complete" in await error.inner_text()
    assert await page.locator(f"{ANSWER} >> [data-action=continue]").is_visible()
    stored = (await ui.stored_conversations())[0]["messages"][1]
    assert stored["status"] == "error"
    assert stored["error"]["code"] == "upstream_cut"
    await ui.assert_clean()
