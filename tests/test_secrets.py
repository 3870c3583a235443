"""The API key never leaves the server: not in a response body or header, not in an
SSE byte, not in a log record, not in the config's repr, whatever the upstream echoes."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import logging
import re
import unicodedata
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import Config
from server.keys import CONFIG
from server.ops.scrub import scrub, shown

from .conftest import SENTINEL_KEY, Rill, StartRill, wait_for
from .fakes import Reply, answer, chunk, sse, terminal, text_of

TAIL = SENTINEL_KEY[-12:]  # distinctive on its own: a half-scrubbed key still shows it
ECHO_401 = json.dumps({"error": {"message": f"Authentication Fails, your api key: {SENTINEL_KEY} is invalid"}})


def leaks(text: str) -> list[str]:
    return [part for part in (SENTINEL_KEY, TAIL) if part in text]


class Seen:
    """Everything that left the server: status lines, headers, bodies, SSE bytes."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, text: str) -> None:
        self.items.append((where, text))

    def add_response(self, where: str, response: aiohttp.ClientResponse, body: bytes) -> None:
        self.add(f"{where} status", f"{response.status} {response.reason}")
        for name, value in response.headers.items():
            self.add(f"{where} header {name}", f"{name}: {value}")
        self.add(f"{where} body", body.decode("utf-8", errors="replace"))

    def leaked(self) -> list[tuple[str, list[str]]]:
        return [(where, found) for where, text in self.items if (found := leaks(text))]


async def fetch(rill: Rill, seen: Seen, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    async with rill.session.request(method, rill.url / path, **kwargs) as response:
        body = await response.read()
        seen.add_response(f"{method} {path}", response, body)
        return response.status, body


async def chat_stream(rill: Rill, seen: Seen, name: str, **fields: Any) -> list[Any]:
    """POST a chat, read its whole SSE stream, keep every byte; the events."""
    status, body = await fetch(
        rill, seen, "POST", "api/chat", json={"messages": [{"role": "user", "content": "Hi"}], **fields}
    )
    assert status == 201, body
    generation_id = json.loads(body)["id"]
    reader = await rill.open_stream(generation_id)
    events = await reader.read_all()
    seen.add_response(f"{name} stream", reader.response, reader.raw)
    status, _ = await fetch(rill, seen, "DELETE", f"api/chat/{generation_id}")  # after the end: replays the result
    assert status == 200
    return events


def error_of(events: list[Any]) -> dict[str, Any]:
    end = terminal(events)
    assert end.event == "error", events
    return dict(end.data)


async def test_api_key_never_leaves_the_server(start_rill: StartRill, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    rill = await start_rill(compat={"get_stream": True})
    seen = Seen()

    # Pages and JSON endpoints.
    for path in ("", "api/models", "healthz", "static/app.css"):
        status, _ = await fetch(rill, seen, "GET", path)
        assert status == 200, path

    # A full, normal answer.
    rill.fake.script(Reply(chunks=answer(["Hello", " world"], reasoning=["hm"])))
    events = await chat_stream(rill, seen, "normal")
    assert text_of(events) == "Hello world"

    # The upstream rejects the key and echoes it, in its body and in a header.
    rill.fake.script(Reply(status=401, body=ECHO_401.encode(), headers={"X-Echo-Key": SENTINEL_KEY}))
    error = error_of(await chat_stream(rill, seen, "401"))
    assert error["code"] == "upstream_auth"
    assert "Authentication Fails" in error["message"]  # the echo did reach Rill; it was scrubbed, not dropped

    # A 400 whose JSON body quotes the key, and one whose plain-text body does.
    rill.fake.script(Reply(status=400, body=json.dumps({"error": {"message": f"bad key {SENTINEL_KEY}"}}).encode()))
    assert error_of(await chat_stream(rill, seen, "400 json"))["code"] == "upstream_bad_request"
    rill.fake.script(Reply(status=400, body=f"invalid Authorization: Bearer {SENTINEL_KEY}".encode()))
    assert error_of(await chat_stream(rill, seen, "400 text"))["code"] == "upstream_bad_request"
    rill.fake.script(Reply(status=422, body=json.dumps({"message": f"key={SENTINEL_KEY}"}).encode()))
    assert error_of(await chat_stream(rill, seen, "422"))["code"] == "upstream_bad_params"

    # A retried status (every attempt echoes the key, so it goes through the retry log too).
    rill.fake.script(*[Reply(status=429, body=ECHO_401.encode(), headers={"Retry-After": "0"})] * 3)
    assert error_of(await chat_stream(rill, seen, "429"))["code"] == "upstream_rate_limited"
    rill.fake.script(*[Reply(status=503, body=json.dumps({"error": SENTINEL_KEY}).encode())] * 3)
    assert error_of(await chat_stream(rill, seen, "503"))["code"] == "upstream_unavailable"

    # An error in the middle of the stream.
    rill.fake.script(Reply(chunks=[chunk("Hel"), sse({"error": {"message": f"bad key {SENTINEL_KEY}"}})]))
    events = await chat_stream(rill, seen, "mid-stream")
    assert text_of(events) == "Hel"
    assert error_of(events)["code"] == "upstream_error"
    assert "bad key" in error_of(events)["message"]

    # The same mid-stream echo through the compat endpoint's plain-text errors.
    rill.fake.script(Reply(chunks=[chunk("Hel"), sse({"error": {"message": f"bad key {SENTINEL_KEY}"}})]))
    status, body = await fetch(rill, seen, "GET", "stream", params={"prompt": "hello"})
    assert status == 200
    assert b"event: error" in body
    assert b"bad key" in body
    rill.fake.script(Reply(status=401, body=ECHO_401.encode()))
    status, body = await fetch(rill, seen, "GET", "stream", params={"prompt": "hello"})
    assert b"Authentication Fails" in body

    # Bad input, and DELETE of live, unknown and malformed ids.
    bad_requests: list[dict[str, Any]] = [
        {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
        {"json": {"messages": []}},
        {"json": {"messages": [{"role": "user", "content": "Hi"}], "model": "nope"}},
        {"json": {"messages": [{"role": "user", "content": "Hi"}], "options": {"max_tokens": 10**9}}},
        {"data": b"{}", "headers": {"Content-Type": "text/plain"}},
    ]
    for body_kwargs in bad_requests:
        status, _ = await fetch(rill, seen, "POST", "api/chat", **body_kwargs)
        assert 400 <= status < 500
    rill.fake.script(Reply(chunks=[chunk("wait")], end="hang"))
    status, body = await fetch(rill, seen, "POST", "api/chat", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 201
    status, _ = await fetch(rill, seen, "DELETE", f"api/chat/{json.loads(body)['id']}")
    assert status == 200
    for path in (f"api/chat/{uuid.uuid4().hex}", "api/chat/not-an-id"):
        status, _ = await fetch(rill, seen, "DELETE", path)
        assert status == 404
    await wait_for(lambda: not rill.registry.live())

    # The test would notice if the key were not used at all: the upstream did get it, every time.
    assert len(rill.fake.requests) == 1 + 1 + 3 + 3 + 3 + 1 + 2 + 1
    for request in rill.fake.requests:
        assert request.headers["Authorization"] == f"Bearer {SENTINEL_KEY}"

    assert seen.leaked() == []
    assert len(seen.items) > 50  # sanity: the collector really saw the traffic

    records = [r.getMessage() for r in caplog.records]
    assert any("upstream_auth" in message for message in records)  # sanity: logs were captured
    assert any(r.name == "aiohttp.access" for r in caplog.records)
    assert [(m, leaks(m)) for m in records if leaks(m)] == []
    assert leaks(caplog.text) == []
    for record in caplog.records:
        assert leaks(repr(record.args)) == [], record  # nothing secret waiting in a lazy argument


def everything_in(config: Config) -> Iterable[str]:
    yield repr(config)
    yield str(config)
    for provider in config.providers:
        yield repr(provider)
        yield str(provider)
        assert provider.api_key is not None
        yield repr(provider.api_key)
        yield str(provider.api_key)
        yield f"{provider.api_key}"
        yield "%s %r" % (provider.api_key, provider.api_key)  # noqa: UP031  (how logging formats)


async def test_config_repr_hides_the_key(rill: Rill) -> None:
    config = rill.app[CONFIG]
    assert config.providers[0].api_key is not None
    assert config.providers[0].api_key.reveal() == SENTINEL_KEY  # the key is there, just never shown
    assert config.secrets == (SENTINEL_KEY,)
    for text in everything_in(config):
        assert leaks(text) == [], text


# --- the key echoed altered ------------------------------------------------------------------


def _spread(text: str, gap: str, every: int) -> str:
    return gap.join(text[i : i + every] for i in range(0, len(text), every))


KEY_BYTES = SENTINEL_KEY.encode()
# Forms a broken or hostile upstream might echo the key in; `ascii` ones can go in a header.
ALTERED: dict[str, tuple[str, bool]] = {
    "upper": (SENTINEL_KEY.upper(), True),
    "swapcase": (SENTINEL_KEY.swapcase(), True),
    "percent": ("".join(f"%{b:02X}" for b in KEY_BYTES), True),
    "percent_lower_partial": (SENTINEL_KEY[:10] + "".join(f"%{b:02x}" for b in KEY_BYTES[10:]), True),
    "percent_twice": ("".join(f"%25{b:02X}" for b in KEY_BYTES), True),
    "json_escaped": ("".join(f"\\u{ord(c):04x}" for c in SENTINEL_KEY), True),
    "html_entities": ("".join(f"&#{ord(c)};" for c in SENTINEL_KEY), False),
    "html_hex_entities": ("".join(f"&#x{ord(c):X};" for c in SENTINEL_KEY), False),
    "spaced": (_spread(SENTINEL_KEY, " ", 4), False),
    "line_broken": (_spread(SENTINEL_KEY, "\n", 7), False),
    "zero_width": ("\u200b".join(SENTINEL_KEY), False),
    "full_width": ("".join(chr(ord(c) + 0xFEE0) for c in SENTINEL_KEY), False),
    "hex": (KEY_BYTES.hex(), True),
    "base64": (base64.b64encode(KEY_BYTES).decode(), True),
    "base64_bearer": (base64.b64encode(b"Bearer " + KEY_BYTES).decode(), True),
    "base64_basic": (base64.b64encode(b"user:" + KEY_BYTES).decode(), True),
    "base64url_json": (base64.urlsafe_b64encode(json.dumps({"key": SENTINEL_KEY}).encode()).decode(), True),
}


def _decodings(text: str) -> Iterable[str]:
    """The text read every way the forms above could be undone."""
    yield text
    yield urllib.parse.unquote(urllib.parse.unquote(text))
    yield html.unescape(text)
    yield re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    yield unicodedata.normalize("NFKC", text)
    yield re.sub(r"[\s\u200b]+", "", text)
    for run in re.findall(r"[0-9a-fA-F]{16,}", text):
        yield bytes.fromhex(run[: len(run) // 2 * 2]).decode("latin-1")
    for run in re.findall(r"[A-Za-z0-9+/_\-]{12,}", text):
        for start in range(4):
            piece = run[start:]
            piece = piece[: -1 if len(piece) % 4 == 1 else None]
            piece += "=" * (-len(piece) % 4)
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                with contextlib.suppress(ValueError):
                    yield decode(piece).decode("latin-1")


def exposes_key(text: str) -> bool:
    return any(part.lower() in decoded.lower() for decoded in _decodings(text) for part in (SENTINEL_KEY, TAIL))


@pytest.mark.parametrize("form", list(ALTERED))
async def test_an_altered_echo_of_the_key_never_leaves_the_server(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    caplog.set_level(logging.DEBUG)
    altered, ascii_only = ALTERED[form]
    assert exposes_key(altered)  # the check below would see this form
    rill = await start_rill(compat={"get_stream": True}, upstream={"retries": 0})
    seen = Seen()
    messages: list[str] = []

    # Quoted by the API: in a JSON error body (whose own escapes json reads), in a plain-text
    # body, in the middle of the stream, and through the compat endpoint.
    rill.fake.script(Reply(status=401, body=json.dumps({"error": {"message": f"bad key {altered} !"}}).encode()))
    messages.append(error_of(await chat_stream(rill, seen, "401 json"))["message"])
    rill.fake.script(Reply(status=400, body=f"invalid Authorization: Bearer {altered} !".encode()))
    messages.append(error_of(await chat_stream(rill, seen, "400 text"))["message"])
    mid_stream = sse({"error": {"message": f"bad key {altered} !"}})
    rill.fake.script(Reply(chunks=[chunk("Hel"), mid_stream]))
    messages.append(error_of(await chat_stream(rill, seen, "mid-stream"))["message"])
    rill.fake.script(Reply(chunks=[chunk("Hel"), mid_stream]))
    status, body = await fetch(rill, seen, "GET", "stream", params={"prompt": "hello"})
    assert status == 200
    messages.append(body.decode())
    # As a finish reason, which is otherwise passed on verbatim.
    rill.fake.script(Reply(chunks=answer(["ok"], finish=f"why {altered} !")))
    done = terminal(await chat_stream(rill, seen, "finish reason"))
    assert done.event == "done"
    messages.append(done.data["finish_reason"])
    if ascii_only:  # header values: a content type and a redirect target
        rill.fake.script(Reply(chunks=[b"{}"], content_type=f"text/{altered}"))
        messages.append(error_of(await chat_stream(rill, seen, "content type"))["message"])
        target = f"http://127.0.0.1:1/v1/{altered}/chat/completions"
        rill.fake.script(Reply(status=307, headers={"Location": target}))
        messages.append(error_of(await chat_stream(rill, seen, "redirect"))["message"])

    for message in messages:
        assert "***" in message, message  # found and masked, not dropped
        assert not exposes_key(message), message
    assert [where for where, text in seen.items if exposes_key(text)] == []
    assert [m for r in caplog.records if exposes_key(m := r.getMessage())] == []
    assert not exposes_key(caplog.text)
    assert len(rill.fake.requests) == len(messages)  # every reply was used: each channel was tried


def test_scrub_leaves_ordinary_text_alone() -> None:
    """The wide net for altered keys catches no ordinary text: words, hex and base64 of
    other data, URLs, and text that shares a few characters with the key."""
    texts = [
        "Rate limit reached for requests. Please retry after 20s (request id 5f3c9a1e-7d2b).",
        hashlib.sha256(b"other").hexdigest() + " " + base64.b64encode(bytes(range(64))).decode(),
        "https://api.example.com/v1/chat/completions?model=sk-rill&x=%2F%20",
        "ｆｕｌｌ ｗｉｄｔｈ &#115;&#107; \\u0073\\u006b s k - r i l l",
        SENTINEL_KEY[1:] + " is not the key",
    ]
    for text in texts:
        assert scrub(text, (SENTINEL_KEY,)) == text


def test_scrub_masks_each_of_several_secrets_whole() -> None:
    token = "alice-0123456789abcdefghij"
    text = f"{SENTINEL_KEY.upper()} / {base64.b64encode(token.encode()).decode()} / {token}x"
    # base64 keeps a character or two at the edges that the secret shares with its neighbours
    assert re.fullmatch(r"\*\*\* / \*\*\*[A-Za-z0-9+/=]{0,3} / \*\*\*x", scrub(text, (SENTINEL_KEY, token, "")))


# --- what a message shows of a long text ------------------------------------------------------

KEY_PIECES = [SENTINEL_KEY[i : i + 12] for i in range(len(SENTINEL_KEY) - 11)]


def shows_part_of_the_key(text: str) -> bool:
    """Any 12 characters of the key in a row, however the text is decoded: stricter than
    exposes_key, for a key cut in half."""
    return any(piece.lower() in decoded.lower() for decoded in _decodings(text) for piece in KEY_PIECES)


FILLER = st.text(alphabet="xyzQ .,!?\n\t\u00e9\u4e16", max_size=80)
RUNS = st.builds(lambda c, n: c * n, st.sampled_from([" ", "\n", "\u200b", "x", "\x01"]), st.integers(0, 3000))
FORMS = st.sampled_from([SENTINEL_KEY, *(form for form, _ in ALTERED.values())])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(FILLER, RUNS, FORMS), max_size=25), st.integers(1, 400))
def test_a_message_never_shows_part_of_a_key(parts: list[str], limit: int) -> None:
    """However the key's forms fall against the message's limit, the raw text's cut (where
    the work stops on a long text) and collapsed whitespace, no part of it shows."""
    text = "".join(parts)
    out = shown(text, (SENTINEL_KEY,), limit)
    assert len(out) <= limit
    assert "\n" not in out
    assert not shows_part_of_the_key(out), out


def test_a_message_is_the_start_of_the_text_on_one_line() -> None:
    assert shown("  Rate limit\n\treached. ", (SENTINEL_KEY,), 300) == "Rate limit reached."
    assert shown("a\x00b\u200bc", (SENTINEL_KEY,), 300) == "a\ufffdbc"
    assert shown("word " * 100, (SENTINEL_KEY,), 20) == "word word word word…"
    assert shown(f"x {SENTINEL_KEY} y " + "z" * 10**6, (SENTINEL_KEY,), 12) == "x *** y zzz…"
    # A long text's start is shown, its key masked, the rest not even looked at.
    assert (
        shown(f"{SENTINEL_KEY.upper()} " + "long " * 200_000, (SENTINEL_KEY,), 30) == "*** long long long long long …"
    )


# One of each kind of form: a plain run, an encoding, spread out, inside base64.
SWEPT = ["plain", "percent", "json_escaped", "spaced", "line_broken", "zero_width", "hex", "base64_bearer"]


@pytest.mark.parametrize("form", SWEPT)
@pytest.mark.parametrize(
    ("padding", "reach"),
    [(" ", 4000), ("\u200b", 4000), ("x ", 400)],  # text that collapses shows no more than `limit`
    ids=["spaces", "invisible", "text"],
)
def test_a_key_form_at_any_offset_is_never_shown_in_part(form: str, padding: str, reach: int) -> None:
    """Sweeps a form of the key across every place a long text can be cut (the message's
    limit, the raw text's cut), after text that collapses to nothing or to a little."""
    form = SENTINEL_KEY if form == "plain" else ALTERED[form][0]
    checked: set[str] = set()
    for offset in range(0, reach, 5):
        text = padding * (offset // len(padding)) + form + " tail" * 400
        for limit in (20, 300):
            out = shown(text, (SENTINEL_KEY,), limit)
            if out not in checked:  # most offsets give one of a few messages
                assert not shows_part_of_the_key(out), (offset, limit, out)
                checked.add(out)


async def test_only_the_figures_of_the_upstreams_usage_reach_the_client(rill: Rill) -> None:
    """The usage object is relayed to every reader and kept for resumes: an upstream that
    puts text there (an echoed key, say) or a huge object gets only its counts through."""
    usage = {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 2, "note": SENTINEL_KEY, "deeper": {"x": 1}},
        "echo": f"your key is {SENTINEL_KEY}",
        "flag": True,
        "x" * 65: 1,
        **{f"extra_{i}": i for i in range(100)},
    }
    rill.fake.script(Reply(chunks=answer(["Hi"], usage=usage)))
    reader = await rill.open_stream(await rill.start_chat())
    events = await reader.read_all()
    assert not leaks(reader.raw.decode())
    (relayed,) = [e.data for e in events if e.event == "usage"]
    assert relayed["prompt_tokens"] == 7
    assert relayed["total_tokens"] == 10
    assert relayed["prompt_tokens_details"] == {"cached_tokens": 2}
    assert not {"echo", "flag", "x" * 65} & set(relayed)
    assert len(relayed) == 32
