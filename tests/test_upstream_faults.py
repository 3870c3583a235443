"""Fault injection on the whole path: POST /api/chat, then read /api/chat/<id>/events
while the fake upstream misbehaves. Every failure must reach the client as exactly one
terminal `error` event {code, message, retryable}, with a message a person can act on,
and the server must keep serving afterwards."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import re
import select
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from server import jsoncodec
from server.relay import upstream as upstream_module
from server.relay.sse import SSEEvent, SSEParser

from .conftest import BASE_DOCUMENT, KEY_ENV, SENTINEL_KEY, Rill, StartRill, wait_for
from .fakes import USAGE, Chunk, FakeUpstream, ReadEvent, Reply, answer, chunk, sse, terminal, text_of

# --- helpers ----------------------------------------------------------------------------


async def run_chat(rill: Rill, **fields: Any) -> list[ReadEvent]:
    """POST a chat and read its whole event stream."""
    generation_id = await rill.start_chat(**fields)
    return await (await rill.open_stream(generation_id)).read_all(timeout=5.0)


def assert_human(message: str) -> None:
    """A sentence for a person: capitalised, several words, no internals, no secrets."""
    assert isinstance(message, str)
    assert message[:1].isupper(), message
    assert len(message.split()) >= 5, message
    for internal in ("Traceback", "Error(", "Exception", "aiohttp", "None"):
        assert internal not in message, message
    assert SENTINEL_KEY not in message
    assert not re.search(r"sk-[A-Za-z0-9]{6,}", message), message


def error_of(events: Sequence[ReadEvent]) -> dict[str, Any]:
    """The single terminal event, which must be an `error` with exactly the documented fields."""
    end = terminal(events)
    assert end.event == "error", [(e.event, e.data) for e in events]
    data: dict[str, Any] = end.data
    # retry_after (seconds) only when the upstream said how long to wait.
    assert set(data) - {"retry_after"} == {"code", "message", "retryable"}, data
    assert isinstance(data["retryable"], bool)
    assert_human(data["message"])
    return data


def names(events: Sequence[ReadEvent]) -> list[str]:
    return [e.event for e in events]


async def assert_still_serves(rill: Rill, model: str | None = None) -> None:
    """The failure left nothing behind: upstream connections closed, no live generation,
    and a normal chat on the same server succeeds."""
    await wait_for(lambda: rill.fake.open == 0, timeout=3.0)
    await wait_for(lambda: not rill.registry.live(), timeout=3.0)
    before = len(rill.fake.requests)
    rill.fake.replies.clear()  # drop anything a failed test scripted but never used
    rill.fake.script(Reply(chunks=answer(["still", " here"])))
    fields = {"model": model} if model else {}
    events = await run_chat(rill, **fields)
    assert text_of(events) == "still here"
    assert terminal(events).data == {"finish_reason": "stop"}
    assert len(rill.fake.requests) == before + 1


def upstream_error_body(message: str, kind: str, code: str | None = "invalid_request_error") -> bytes:
    """A DeepSeek-style error body."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def one_byte_per_write(data: bytes) -> list[Chunk]:
    """Each byte its own write, with a loop turn between so the relay reads them apart."""
    out: list[Chunk] = []
    for i in range(len(data)):
        out += [data[i : i + 1], 0.0]
    return out


def random_cuts(data: bytes, seed: int) -> list[Chunk]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(5, 60)))
    out: list[Chunk] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        out += [data[start:end], 0.0]
    return out


class RecordingParser(SSEParser):
    """SSEParser that remembers how many pieces the relay fed it."""

    feeds: list[int] = []  # noqa: RUF012 - reset per test through the fixture

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        RecordingParser.feeds.append(len(chunk))
        return super().feed(chunk)


@pytest.fixture
def recorded_feeds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    RecordingParser.feeds = []
    monkeypatch.setattr(upstream_module, "SSEParser", RecordingParser)
    return RecordingParser.feeds


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def blackhole_port() -> Iterator[int]:
    """A listening socket with listen(0) whose accept queue is full of unaccepted
    connections, so Linux drops further SYNs and a connect() just waits."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [filler], [], 0.2)
            if not writable:
                break  # this SYN was dropped: the queue is full
        else:
            pytest.fail("could not fill the listen backlog: connects never stalled")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def with_good_provider(fake: FakeUpstream) -> dict[str, Any]:
    """Config sections adding a second, working provider (model `good-chat`) on the fake
    upstream, so a server whose default provider is broken can show it still serves."""
    broken = copy.deepcopy(BASE_DOCUMENT["providers"][0])
    good = {
        "name": "good",
        "base_url": fake.url,
        "api_key_env": KEY_ENV,
        "models": [{"id": "good-chat", "upstream_id": "fake-model"}],
    }
    return {"providers": [broken, good]}


# --- HTTP statuses ------------------------------------------------------------------------

STATUS_CASES = [
    # status, type, upstream message, code, retryable, requests, hint in our message
    (400, "invalid_request_error", "Model Not Exist", "upstream_bad_request", False, 1, "model name"),
    (401, "authentication_error", "Authentication Fails, Your api key is invalid", "upstream_auth", False, 1, KEY_ENV),
    (402, "unknown_error", "Insufficient Balance", "upstream_payment", False, 1, "balance"),
    (422, "invalid_request_error", "Invalid temperature value", "upstream_bad_params", False, 1, "parameters"),
    (404, "invalid_request_error", "Not Found", "upstream_not_found", False, 1, "base_url"),
    (429, "rate_limit_error", "Rate limit reached for requests", "upstream_rate_limited", True, 3, "Try again"),
    (500, "server_error", "Internal server error", "upstream_unavailable", True, 3, "Try again"),
    (503, "server_error", "Server overloaded, please try later", "upstream_unavailable", True, 3, "Try again"),
]


@pytest.mark.parametrize(
    ("status", "kind", "said", "code", "retryable", "requests", "hint"),
    STATUS_CASES,
    ids=[str(case[0]) for case in STATUS_CASES],
)
async def test_http_status_maps_to_error(
    rill: Rill,
    status: int,
    kind: str,
    said: str,
    code: str,
    retryable: bool,
    requests: int,
    hint: str,
) -> None:
    # As many failing replies as the server should use; an extra request would get the
    # fake's default good answer and end in `done`, failing the test.
    rill.fake.script(*[Reply(status=status, body=upstream_error_body(said, kind)) for _ in range(requests)])
    events = await run_chat(rill)

    assert names(events) == ["meta", "error"]
    error = error_of(events)
    assert error["code"] == code
    assert error["retryable"] is retryable
    assert hint in error["message"]
    assert str(status) in error["message"]
    assert said in error["message"]  # the upstream's own words, after ours
    assert len(rill.fake.requests) == requests
    await assert_still_serves(rill)


async def test_auth_error_says_which_variable_and_hides_the_key(rill: Rill) -> None:
    said = f"Authentication Fails, Your api key: {SENTINEL_KEY} is invalid (also sk-0therKey12345678)"
    rill.fake.script(Reply(status=401, body=upstream_error_body(said, "authentication_error")))
    events = await run_chat(rill)

    error = error_of(events)  # checks that neither key shows
    assert error["code"] == "upstream_auth"
    assert error["retryable"] is False
    assert "Check FAKE_API_KEY" in error["message"]
    assert "Authentication Fails, Your api key: *** is invalid (also sk-***)" in error["message"]
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


async def test_non_json_error_body_is_quoted_short_and_on_one_line(rill: Rill) -> None:
    page = b"<html>\n<body>\n  <h1>502 Bad Gateway</h1>\n" + b"x" * 2000 + b"\n</body></html>"
    rill.fake.script(*[Reply(status=502, body=page) for _ in range(3)])
    events = await run_chat(rill)

    end = terminal(events)
    assert end.data["code"] == "upstream_unavailable"
    assert end.data["retryable"] is True
    message = end.data["message"]
    assert "HTTP 502" in message
    assert "\n" not in message
    assert "<html> <body> <h1>502 Bad Gateway</h1>" in message
    assert len(message) < 600
    assert len(rill.fake.requests) == 3
    await assert_still_serves(rill)


# --- retries that succeed, and waits that are too long ---------------------------------------


async def test_429_with_retry_after_zero_then_success(rill: Rill) -> None:
    rill.fake.script(
        Reply(status=429, body=upstream_error_body("Rate limit", "rate_limit_error"), headers={"Retry-After": "0"}),
        Reply(chunks=answer(["Hello", " again", " 世界"])),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await run_chat(rill)

    assert loop.time() - started < 1.5
    assert names(events) == ["meta", "delta", "delta", "delta", "usage", "done"]
    assert text_of(events) == "Hello again 世界"
    assert terminal(events).data == {"finish_reason": "stop"}
    assert len(rill.fake.requests) == 2
    assert rill.fake.requests[0].body == rill.fake.requests[1].body  # the same request, asked again


async def test_500_then_503_then_success(rill: Rill) -> None:
    rill.fake.script(
        Reply(status=500, body=upstream_error_body("Internal error", "server_error")),
        Reply(status=503, body=upstream_error_body("Overloaded", "server_error")),
        Reply(chunks=answer(["third", " time"])),
    )
    events = await run_chat(rill)

    assert text_of(events) == "third time"
    assert terminal(events).data == {"finish_reason": "stop"}
    assert not [e for e in events if e.event == "error"]
    assert len(rill.fake.requests) == 3


async def test_retry_after_beyond_the_limit_is_not_waited_out(start_rill: StartRill) -> None:
    rill = await start_rill(upstream={"max_retry_after": 2.0})
    rill.fake.script(
        Reply(status=429, body=upstream_error_body("Slow down", "rate_limit_error"), headers={"Retry-After": "30"})
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await run_chat(rill)

    assert loop.time() - started < 1.5
    error = error_of(events)
    assert error["code"] == "upstream_rate_limited"
    assert error["retryable"] is True
    assert "Try again in 30 s" in error["message"]
    assert error["retry_after"] == 30  # for clients, which may wait it out (the chat page does)
    assert "Slow down" in error["message"]
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


@pytest.mark.parametrize(("header", "expected"), [("2", 2), ("0.5", 0.5), (None, None), ("soon", None)])
async def test_a_rate_limit_error_carries_the_upstreams_wait(
    start_rill: StartRill, header: str | None, expected: float | None
) -> None:
    rill = await start_rill(upstream={"retries": 0})
    headers = {"Retry-After": header} if header is not None else {}
    rill.fake.script(Reply(status=429, body=upstream_error_body("Slow down", "rate_limit_error"), headers=headers))
    error = error_of(await run_chat(rill))

    assert error["code"] == "upstream_rate_limited"
    assert error["retryable"] is True
    if expected is None:
        assert "retry_after" not in error  # no number to count down from: the client decides
    else:
        assert error["retry_after"] == expected
        assert isinstance(error["retry_after"], int | float)
    await assert_still_serves(rill)


# --- the stream ends early or strangely --------------------------------------------------------


async def test_cut_mid_answer_keeps_text_and_is_not_retried(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=[b": keep-alive\n\n", chunk("Hel"), chunk("lo,"), chunk(" wor")], end="cut"))
    events = await run_chat(rill)

    assert names(events) == ["meta", "delta", "delta", "delta", "error"]
    assert text_of(events) == "Hello, wor"
    error = error_of(events)
    assert error["code"] == "upstream_cut"
    assert error["retryable"] is True
    assert "kept" in error["message"]
    assert len(rill.fake.requests) == 1  # final: retries happen before the terminal event
    await assert_still_serves(rill)


@pytest.mark.parametrize("end", ["eof", "cut"])
@pytest.mark.parametrize("finish", ["stop", "length"])
async def test_finish_reason_without_done_is_a_normal_end(rill: Rill, end: str, finish: str) -> None:
    rill.fake.script(Reply(chunks=[chunk("All"), chunk(" there"), chunk("", finish=finish)], end=end))
    events = await run_chat(rill)

    assert text_of(events) == "All there"
    assert terminal(events).data == {"finish_reason": finish}
    assert len(rill.fake.requests) == 1


@pytest.mark.parametrize("finish", ["stop", "length"])
async def test_done_without_trailing_blank_line_at_eof(rill: Rill, finish: str) -> None:
    rill.fake.script(Reply(chunks=[chunk("Done"), chunk("", finish=finish), b"data: [DONE]"]))
    events = await run_chat(rill)

    assert text_of(events) == "Done"
    assert terminal(events).data == {"finish_reason": finish}


async def test_done_alone_without_blank_line_and_no_finish_reason(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=[chunk("Only"), b"data: [DONE]"]))
    events = await run_chat(rill)

    assert text_of(events) == "Only"
    assert terminal(events).data == {"finish_reason": "stop"}


@pytest.mark.parametrize("finish", ["length", "content_filter"])
async def test_finish_reasons_pass_through(rill: Rill, finish: str) -> None:
    rill.fake.script(Reply(chunks=answer(["partial", " answer"], finish=finish)))
    events = await run_chat(rill)

    assert names(events) == ["meta", "delta", "delta", "usage", "done"]
    assert text_of(events) == "partial answer"
    assert terminal(events).data == {"finish_reason": finish}


async def test_insufficient_system_resource_is_a_retryable_error(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["Half", " an"], finish="insufficient_system_resource")))
    events = await run_chat(rill)

    assert text_of(events) == "Half an"
    assert names(events)[-2:] == ["usage", "error"]  # what was used is still reported
    error = error_of(events)
    assert error["code"] == "upstream_overloaded"
    assert error["retryable"] is True
    assert "try again" in error["message"].lower()
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


# --- connections that fail ------------------------------------------------------------------------


async def test_connection_refused_is_unreachable_after_retries(
    start_rill: StartRill, fake_upstream: FakeUpstream
) -> None:
    port = closed_port()
    rill = await start_rill(upstream_url=f"http://127.0.0.1:{port}/v1", **with_good_provider(fake_upstream))
    events = await run_chat(rill)

    assert names(events) == ["meta", "error"]
    error = error_of(events)
    assert error["code"] == "upstream_unreachable"
    assert error["retryable"] is True
    assert f"127.0.0.1:{port}" in error["message"]
    assert "base_url" in error["message"]
    assert rill.fake.requests == []  # nothing went to the working provider
    await assert_still_serves(rill, model="good-chat")


async def test_connect_timeout(start_rill: StartRill, fake_upstream: FakeUpstream) -> None:
    with blackhole_port() as port:
        rill = await start_rill(
            upstream_url=f"http://127.0.0.1:{port}/v1",
            timeouts={"connect": 0.3},
            upstream={"retries": 1},
            **with_good_provider(fake_upstream),
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = await run_chat(rill)
        elapsed = loop.time() - started

    error = error_of(events)
    assert error["code"] == "upstream_connect_timeout"
    assert error["retryable"] is True
    assert "0.3 s" in error["message"]
    assert 0.55 <= elapsed < 2.0  # two attempts of 0.3 s each
    await assert_still_serves(rill, model="good-chat")


# --- connections ---------------------------------------------------------------------------------


async def test_a_complete_answer_leaves_its_connection_for_the_next(start_rill: StartRill) -> None:
    """After [DONE] the body's end follows at once; Rill waits for it, so the connection
    goes back to the pool (no new TCP and TLS handshake for the next answer), while the
    readers get `done` without waiting for it."""
    rill = await start_rill()
    for _ in range(3):
        rill.fake.script(Reply(chunks=[*answer(["again"]), 0.1]))  # the body's end comes 0.1 s after [DONE]
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = await run_chat(rill)
        assert loop.time() - started < 0.1
        assert terminal(events).data == {"finish_reason": "stop"}
        await asyncio.wait_for(rill.fake.requests[-1].closed.wait(), 2.0)
    assert len({seen.peer for seen in rill.fake.requests}) == 1


async def test_a_body_that_goes_on_after_done_is_not_waited_for(start_rill: StartRill) -> None:
    """An upstream that keeps the body open after [DONE] still ends the answer at once;
    its connection is closed (it cannot be reused) and the next answer gets a new one."""
    rill = await start_rill()
    rill.fake.script(Reply(chunks=[*answer(["kept"]), b": more\n\n"], end="hang"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await run_chat(rill)
    assert terminal(events).data == {"finish_reason": "stop"}
    assert loop.time() - started < 1.0
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 3.0)
    await assert_still_serves(rill)


class RawUpstream:
    """A model API written with bare asyncio streams, for framing aiohttp's test server
    never produces: headers in a packet of their own, a broken chunk size line."""

    def __init__(self, body: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.body = body
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                await writer.drain()
                await asyncio.sleep(0.05)  # the headers in a packet of their own, as most servers send them
                await self.body(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_the_connection_is_kept_when_the_headers_come_alone(start_rill: StartRill) -> None:
    async def body(writer: asyncio.StreamWriter) -> None:
        for piece in answer(["hi"]):
            if isinstance(piece, bytes):
                writer.write(http_chunk(piece))
        await writer.drain()
        await asyncio.sleep(0.05)  # the body's end a moment after [DONE]
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    upstream = RawUpstream(body)
    rill = await start_rill(upstream_url=await upstream.start())
    loop = asyncio.get_running_loop()
    try:
        for _ in range(3):
            generation_id = await rill.start_chat()
            events = await (await rill.open_stream(generation_id)).read_all()
            assert terminal(events).data == {"finish_reason": "stop"}
            generation = rill.registry.get(generation_id)
            assert generation is not None
            started = loop.time()
            await generation.wait_closed()
            assert loop.time() - started < 0.5  # settled by the body's end, not cut off after 1 s
        assert upstream.connections == 1
    finally:
        await upstream.close()


async def test_broken_chunk_framing_ends_the_answer_at_once(start_rill: StartRill) -> None:
    """aiohttp closes the connection on a malformed chunk size and tells only the
    connection; the answer still ends then, as cut, not at the idle limit."""

    async def body(writer: asyncio.StreamWriter) -> None:
        writer.write(http_chunk(b": keep-alive\n\n") + http_chunk(chunk("kept")) + b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        await asyncio.sleep(3600)

    upstream = RawUpstream(body)
    rill = await start_rill(upstream_url=await upstream.start(), timeouts={"idle_read": 30.0})
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        events = await run_chat(rill)
        assert loop.time() - started < 2.0
        assert text_of(events) == "kept"
        assert error_of(events)["code"] == "upstream_cut"
    finally:
        await upstream.close()


async def test_an_answer_with_no_token_is_not_held_to_the_first_token_deadline_after_done(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    """The deadline for a first token passes while Rill waits for the end of a body
    whose answer is complete (with no token: a content filter): the answer stays done."""
    caplog.set_level(logging.INFO)
    # The deadline (1 s) falls inside the up-to-1-s wait for the body's end that follows
    # [DONE] at 0.3 s, with room for a loaded machine before it.
    rill = await start_rill(timeouts={"first_token": 1.0})
    rill.fake.script(Reply(chunks=[0.3, chunk("", finish="content_filter"), b"data: [DONE]\n\n"], end="hang"))
    generation_id = await rill.start_chat()
    events = await (await rill.open_stream(generation_id)).read_all(timeout=3.0)
    assert terminal(events).data == {"finish_reason": "content_filter"}
    generation = rill.registry.get(generation_id)
    assert generation is not None
    await asyncio.wait_for(generation.wait_closed(), 3.0)
    assert generation.terminal is not None
    assert generation.terminal.name == "done"
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)
    assert "failed upstream" not in caplog.text
    assert "crashed" not in caplog.text


# --- deadlines -------------------------------------------------------------------------------------


async def test_idle_limit_counts_from_the_last_byte(start_rill: StartRill) -> None:
    """Tokens 0.2 s apart never trip a 0.6 s idle limit, however long the answer goes on;
    the silence after the last one does. (Rill keeps one lazy timer for the body instead
    of aiohttp's, which it moves on every chunk.)"""
    rill = await start_rill(timeouts={"idle_read": 0.6})  # 0.4 s of room for a loaded machine
    pieces: list[Chunk] = [chunk("a")]
    for text in "bcdef":
        pieces += [0.2, chunk(text)]
    rill.fake.script(Reply(chunks=pieces, end="hang"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await run_chat(rill)
    elapsed = loop.time() - started

    assert text_of(events) == "abcdef"
    assert error_of(events)["code"] == "upstream_idle_timeout"
    assert 1.0 + 0.6 <= elapsed < 3.5  # five gaps of 0.2 s, then the limit
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)


async def test_idle_timeout_keeps_the_text(start_rill: StartRill) -> None:
    rill = await start_rill(timeouts={"idle_read": 0.3})
    rill.fake.script(Reply(chunks=[b": keep-alive\n\n", chunk("One"), chunk(" token")], end="hang"))
    events = await run_chat(rill)

    assert names(events) == ["meta", "delta", "delta", "error"]
    assert text_of(events) == "One token"
    error = error_of(events)
    assert error["code"] == "upstream_idle_timeout"
    assert error["retryable"] is True
    assert "0.3 s" in error["message"]
    assert "kept" in error["message"]
    assert len(rill.fake.requests) == 1
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)  # the upstream was hung up on
    await assert_still_serves(rill)


async def test_keep_alive_comments_do_not_hold_off_the_first_token_deadline(start_rill: StartRill) -> None:
    rill = await start_rill(timeouts={"first_token": 0.5, "idle_read": 2.0})
    queueing: list[Chunk] = [chunk("", reasoning="")]  # a role-only delta is not a token
    for _ in range(40):
        queueing += [b": keep-alive\n\n", 0.1]
    rill.fake.script(Reply(chunks=queueing, end="hang"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await run_chat(rill)
    elapsed = loop.time() - started

    assert names(events) == ["meta", "error"]  # no comment became text
    error = error_of(events)
    assert error["code"] == "upstream_first_token_timeout"
    assert error["retryable"] is True
    assert "0.5 s" in error["message"]
    assert 0.45 <= elapsed < 1.9  # the deadline, not the idle timeout nor the 4 s of comments
    assert len(rill.fake.requests) == 1
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)
    await assert_still_serves(rill)


async def test_max_generation_stops_a_long_answer_and_keeps_the_text(start_rill: StartRill) -> None:
    """Once tokens flow, the body's one timer (the idle limit's) keeps this deadline too."""
    rill = await start_rill(timeouts={"max_generation": 0.5})
    tokens = [f" t{i}" for i in range(40)]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.1)))
    events = await run_chat(rill)

    text = text_of(events)
    assert "".join(tokens).startswith(text)
    assert 2 <= len([e for e in events if e.event == "delta"]) < len(tokens)
    error = error_of(events)
    assert error["code"] == "generation_timeout"
    assert error["retryable"] is False
    assert "0.5 s" in error["message"]
    assert "kept" in error["message"]
    assert len(rill.fake.requests) == 1
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)
    await assert_still_serves(rill)


# --- bad data -------------------------------------------------------------------------------------


async def test_error_object_in_the_stream(rill: Rill) -> None:
    rill.fake.script(
        Reply(
            chunks=[
                chunk("Some"),
                chunk(" text"),
                sse({"error": {"message": f"boom: backend exploded (key {SENTINEL_KEY})", "type": "server_error"}}),
                b"data: [DONE]\n\n",
            ]
        )
    )
    events = await run_chat(rill)

    assert text_of(events) == "Some text"
    error = error_of(events)
    assert error["code"] == "upstream_error"
    assert error["retryable"] is True
    assert "boom: backend exploded (key ***)" in error["message"]
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


BAD_DATA_CASES: list[tuple[str, list[Chunk], str]] = [
    ("malformed_json", [chunk("Kept"), b'data: {"choices": [{"delta": \n\n'], "Kept"),
    ("not_an_object", [chunk("Kept"), b"data: [1,2]\n\n"], "Kept"),
    ("string_chunk", [b'data: "hello"\n\n'], ""),
    # a pause so the token and the long line arrive in separate reads (see the test below)
    (
        "oversize_line",
        [chunk("Kept"), 0.05, sse({"choices": [{"index": 0, "delta": {"content": "x" * 5000}}]})],
        "Kept",
    ),
]


@pytest.mark.parametrize(("chunks", "kept"), [c[1:] for c in BAD_DATA_CASES], ids=[c[0] for c in BAD_DATA_CASES])
async def test_bad_chunks_are_bad_data(start_rill: StartRill, chunks: list[Chunk], kept: str) -> None:
    rill = await start_rill(upstream={"max_line_chars": 1000})
    rill.fake.script(Reply(chunks=[*chunks, *answer(["never", " seen"])]))
    events = await run_chat(rill)

    assert text_of(events) == kept
    assert "x" * 100 not in text_of(events)
    error = error_of(events)
    assert error["code"] == "upstream_bad_data"
    assert error["retryable"] is False
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


async def test_tokens_before_an_oversize_line_in_the_same_read_are_kept(start_rill: StartRill) -> None:
    """Where the upstream's TCP segments fall must not change what the client sees: a
    complete token that arrived just before a too-long line is delivered, as it is when
    the two arrive in separate reads (the test above)."""
    rill = await start_rill(upstream={"max_line_chars": 1000})
    long_line = sse({"choices": [{"index": 0, "delta": {"content": "x" * 5000}}]})
    rill.fake.script(Reply(chunks=[chunk("Kept") + long_line, *answer(["never"])]))  # one write
    events = await run_chat(rill)

    assert error_of(events)["code"] == "upstream_bad_data"
    assert text_of(events) == "Kept"
    await assert_still_serves(rill)


async def test_oversize_line_arriving_in_pieces_is_bad_data(start_rill: StartRill) -> None:
    rill = await start_rill(upstream={"max_line_chars": 1000})
    line = sse({"choices": [{"index": 0, "delta": {"content": "y" * 5000}}]})
    pieces: list[Chunk] = []
    for start in range(0, len(line), 300):
        pieces += [line[start : start + 300], 0.0]
    rill.fake.script(Reply(chunks=[chunk("Kept"), *pieces, *answer(["never"])]))
    events = await run_chat(rill)

    assert text_of(events) == "Kept"
    assert error_of(events)["code"] == "upstream_bad_data"
    await assert_still_serves(rill)


async def test_json_instead_of_an_event_stream(rill: Rill) -> None:
    completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]}
    rill.fake.script(Reply(chunks=[json.dumps(completion).encode()], content_type="application/json"))
    events = await run_chat(rill)

    assert names(events) == ["meta", "error"]
    error = error_of(events)
    assert error["code"] == "upstream_bad_data"
    assert error["retryable"] is False
    assert "application/json" in error["message"]
    assert "base_url" in error["message"]
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


# --- bytes split anywhere ----------------------------------------------------------------------------

SPLIT_TOKENS = ["第一行 line one\n", "line two 🎉\r\n\n", "  indented 👩‍💻\r", "end ", "中文字符", "😀", "é"]
SPLIT_REASONING = ["思考 ", "🤔\n", "done"]
SPLIT_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


# One event whose JSON spans two `data:` lines (joined with LF, which JSON reads as space):
# a parser that ends a line at CR and again at the LF of a split CRLF would break it.
MULTI_LINE_EVENT = b'data: {"choices": [{"index": 0,\ndata:  "delta": {"content": " multi"}}]}\n\n'
SPLIT_TEXT = "".join(SPLIT_TOKENS) + " multi"


def split_answer(newline: bytes) -> bytes:
    """A whole answer as one byte string, with the upstream's line endings replaced.
    JSON escapes the line breaks inside text, so every raw LF is a line ending."""
    chunks = answer(SPLIT_TOKENS, reasoning=SPLIT_REASONING, usage=SPLIT_USAGE)
    chunks.insert(len(chunks) - 3, MULTI_LINE_EVENT)  # before the finish chunk
    data = b"".join(c for c in chunks if isinstance(c, bytes))
    return data.replace(b"\n", newline)


def comparable(events: Sequence[ReadEvent]) -> list[tuple[str, str, Any]]:
    """Events without `meta`, which carries the generation id and time."""
    assert events[0].event == "meta"
    return [(e.id, e.event, e.data) for e in events[1:]]


def assert_split_answer(events: Sequence[ReadEvent]) -> None:
    assert text_of(events) == SPLIT_TEXT
    assert text_of(events, "reasoning") == "".join(SPLIT_REASONING)
    assert [e.data for e in events if e.event == "usage"] == [SPLIT_USAGE]
    assert terminal(events).data == {"finish_reason": "stop"}
    assert "keep-alive" not in json.dumps([e.data for e in events])


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_one_byte_per_write_gives_the_same_events(rill: Rill, recorded_feeds: list[int], newline: bytes) -> None:
    data = split_answer(newline)
    rill.fake.script(Reply(chunks=[data]))
    whole = await run_chat(rill, model="fake-reasoner")
    assert_split_answer(whole)

    recorded_feeds.clear()
    rill.fake.script(Reply(chunks=one_byte_per_write(data)))
    split = await run_chat(rill, model="fake-reasoner")

    assert comparable(split) == comparable(whole)
    assert len(recorded_feeds) > len(data) // 4  # the relay really did read it in small pieces
    assert len(rill.fake.requests) == 2


async def test_crlf_split_between_cr_and_lf(rill: Rill) -> None:
    """Every CRLF arrives in two reads, CR in one and LF in the next: still one line end."""
    data = split_answer(b"\r\n")
    rill.fake.script(Reply(chunks=[data]))
    whole = await run_chat(rill, model="fake-reasoner")
    assert_split_answer(whole)

    pieces: list[Chunk] = []
    for piece in data.split(b"\r"):
        pieces += [piece, 0.005, b"\r", 0.005]  # the pause lets the relay read each part alone
    rill.fake.script(Reply(chunks=pieces[:-2]))  # no CR after the last piece
    split = await run_chat(rill, model="fake-reasoner")
    assert comparable(split) == comparable(whole)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_random_cut_points_give_the_same_events(rill: Rill, seed: int) -> None:
    data = split_answer(b"\r\n")
    rill.fake.script(Reply(chunks=[data]))
    whole = await run_chat(rill, model="fake-reasoner")
    assert_split_answer(whole)

    rill.fake.script(Reply(chunks=random_cuts(data, seed)))
    split = await run_chat(rill, model="fake-reasoner")
    assert comparable(split) == comparable(whole)


# --- comments and usage ---------------------------------------------------------------------------


async def test_keep_alive_comments_between_tokens_are_not_text(rill: Rill) -> None:
    rill.fake.script(
        Reply(
            chunks=[
                b": keep-alive\n\n",
                chunk("a"),
                b": keep-alive\n\n",
                b":\n\n",
                b": keep-alive\r\n\r\n",
                chunk("b"),
                b": keep-alive\n\n",
                chunk("", finish="stop"),
                b": keep-alive\n\n",
                b"data: [DONE]\n\n",
            ]
        )
    )
    events = await run_chat(rill)

    assert names(events) == ["meta", "delta", "delta", "done"]
    assert [e.data for e in events if e.event == "delta"] == [{"text": "a"}, {"text": "b"}]


def deepseek_chunk(content: str | None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    """A chunk shaped like DeepSeek's: `usage` present on every chunk, null until the end."""
    return sse(
        {
            "id": "x",
            "object": "chat.completion.chunk",
            "choices": [
                {"index": 0, "delta": {"content": content, "reasoning_content": None}, "finish_reason": finish}
            ],
            "usage": usage,
        }
    )


async def test_usage_on_the_finish_chunk_is_reported(rill: Rill) -> None:
    usage = {
        "prompt_tokens": 6,
        "completion_tokens": 2,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    rill.fake.script(
        Reply(
            chunks=[
                deepseek_chunk("Hi"),
                deepseek_chunk(" there"),
                deepseek_chunk("", finish="stop", usage=usage),
                b"data: [DONE]\n\n",
            ]
        )
    )
    events = await run_chat(rill)

    assert names(events) == ["meta", "delta", "delta", "usage", "done"]
    assert events[-2].data == usage
    assert text_of(events) == "Hi there"


async def test_last_usage_wins(rill: Rill) -> None:
    final = {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}
    rill.fake.script(
        Reply(
            chunks=[
                deepseek_chunk("Hi"),
                deepseek_chunk("", finish="stop", usage=USAGE),
                sse({"id": "x", "choices": [], "usage": final}),
                deepseek_chunk(None, usage=None),  # a later null does not erase it
                b"data: [DONE]\n\n",
            ]
        )
    )
    events = await run_chat(rill)

    assert [e.data for e in events if e.event == "usage"] == [final]
    assert names(events)[-2:] == ["usage", "done"]


# --- the server keeps serving after each kind of failure ------------------------------------------

FAILURES: list[tuple[str, Reply, str]] = [
    ("status_400", Reply(status=400, body=upstream_error_body("bad", "invalid_request_error")), "upstream_bad_request"),
    ("status_402", Reply(status=402, body=upstream_error_body("pay", "unknown_error")), "upstream_payment"),
    ("cut", Reply(chunks=[chunk("a")], end="cut"), "upstream_cut"),
    ("idle", Reply(chunks=[chunk("a")], end="hang"), "upstream_idle_timeout"),
    ("stream_error", Reply(chunks=[chunk("a"), sse({"error": "nope"})], end="hang"), "upstream_error"),
    ("bad_json", Reply(chunks=[chunk("a"), b"data: {\n\n"], end="hang"), "upstream_bad_data"),
    ("json_body", Reply(chunks=[b"{}"], content_type="application/json"), "upstream_bad_data"),
    (
        "overloaded",
        Reply(chunks=[chunk("a"), chunk(None, finish="insufficient_system_resource")]),
        "upstream_overloaded",
    ),
]


async def test_server_keeps_serving_after_each_kind_of_failure(start_rill: StartRill) -> None:
    """All the failures in a row on one server, each followed by a good chat, then a
    check that nothing is left open upstream."""
    rill = await start_rill(timeouts={"idle_read": 0.3}, upstream={"retries": 0})
    for name, reply, code in FAILURES:
        rill.fake.script(reply)
        events = await run_chat(rill)
        assert error_of(events)["code"] == code, name
        await assert_still_serves(rill)
    assert len(rill.fake.requests) == 2 * len(FAILURES)
    async with rill.session.get(rill.url / "healthz") as response:
        health = await response.json()
    assert health["live_generations"] == 0
    assert rill.fake.open == 0


@pytest.mark.parametrize(
    "text",
    [
        '{"choices":[{"delta":{"content":"a\\nb 世界 🎉"}}],"usage":{"total_tokens":3}}',
        '{"choices":[{"delta":{"content":"\\ud83d"}}]}',  # half an emoji: orjson refuses it
        '{"usage":{"total_tokens":NaN}}',  # not JSON, but json.loads takes it
        '{"a":1,"a":2}',
    ],
)
def test_chunks_are_read_as_json_loads_reads_them(text: str) -> None:
    assert repr(jsoncodec.loads(text)) == repr(json.loads(text))
