"""The API key never leaves the server: not in a response body or header, not in an
SSE byte, not in a log record, not in the config's repr, whatever the upstream echoes."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

import aiohttp
import pytest

from server.config import Config
from server.keys import CONFIG

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
