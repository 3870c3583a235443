"""A fake OpenAI-compatible upstream (a real aiohttp server on loopback) whose replies
each test scripts, plus a small SSE client for reading Rill's streams."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from server.relay.sse import SSEParser

# Items of Reply.chunks: bytes are written, numbers are seconds to sleep.
Chunk = bytes | float

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "raw-deflate": -zlib.MAX_WBITS}


def compressed(chunks: Iterable[Chunk], encoding: str = "gzip") -> Iterator[Chunk]:
    """The chunks compressed as one stream (gzip, deflate, or raw-deflate: deflate without
    its zlib header, as some servers send it), each flushed so it can be read on arrival.
    Send with headers={"Content-Encoding": "gzip" or "deflate"}. Lazy: a generator."""
    deflate = zlib.compressobj(6, zlib.DEFLATED, _WBITS[encoding])
    for item in chunks:
        if isinstance(item, bytes):
            yield deflate.compress(item) + deflate.flush(zlib.Z_SYNC_FLUSH)
        else:
            yield item
    yield deflate.flush()


def sse(payload: Any) -> bytes:
    """One upstream `data:` event."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def chunk(content: str | None = None, *, reasoning: str | None = None, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    return sse(
        {
            "id": "fake",
            "object": "chat.completion.chunk",
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def answer(
    tokens: Sequence[str],
    *,
    reasoning: Sequence[str] = (),
    finish: str = "stop",
    usage: dict[str, Any] | None = USAGE,
    delay: float = 0.0,
) -> list[Chunk]:
    """A complete, well-formed streamed answer."""
    out: list[Chunk] = [b": keep-alive\n\n", chunk("", reasoning="")]
    for piece in reasoning:
        if delay:
            out.append(delay)
        out.append(chunk(None, reasoning=piece))
    for token in tokens:
        if delay:
            out.append(delay)
        out.append(chunk(token))
    out.append(chunk("", finish=finish))
    if usage is not None:
        out.append(sse({"id": "fake", "choices": [], "usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return out


@dataclass
class Reply:
    """What the fake upstream does for one request."""

    chunks: list[Chunk] = field(default_factory=list)
    stream: Iterable[Chunk] = ()  # after chunks, made as it is sent (a generator: endless, or too big to keep)
    status: int = 200
    body: bytes = b""  # for non-200 replies
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/event-stream"
    end: str = "eof"  # eof | cut (drop the connection) | hang (stay open, silent)


@dataclass
class Seen:
    """One request the fake upstream received."""

    body: dict[str, Any]
    headers: dict[str, str]
    peer: Any = None  # the client's address and port: which connection the request came on
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    closed_at: float | None = None


class FakeUpstream:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.default = Reply(chunks=answer(["Hello", " world"]))
        self.requests: list[Seen] = []
        self.open = 0
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._handle)
        self.url = ""

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen = Seen(body=await request.json(), headers=dict(request.headers), peer=peer)
        self.requests.append(seen)
        reply = self.replies.pop(0) if self.replies else self.default
        self.open += 1
        loop = asyncio.get_running_loop()
        try:
            if reply.status != 200:
                return web.Response(
                    status=reply.status, body=reply.body, headers=reply.headers, content_type="application/json"
                )
            response = web.StreamResponse(headers=reply.headers)
            response.content_type = reply.content_type
            await response.prepare(request)
            for item in itertools.chain(reply.chunks, reply.stream):
                if isinstance(item, bytes):
                    await response.write(item)
                else:
                    await asyncio.sleep(item)
            if reply.end == "cut":
                assert request.transport is not None
                request.transport.close()  # the chunked body never gets its terminator
            elif reply.end == "hang":
                await asyncio.sleep(3600)
            else:
                await response.write_eof()
            return response
        finally:
            # The test server cancels this handler the moment the relay disconnects.
            self.open -= 1
            seen.closed_at = loop.time()
            seen.closed.set()


@dataclass
class ReadEvent:
    event: str
    data: Any  # parsed JSON
    id: str


class StreamReader:
    """Reads one Rill SSE stream, keeping raw bytes and parsed events."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.parser = SSEParser()
        self.raw = b""
        self.events: list[ReadEvent] = []
        self._queued: list[ReadEvent] = []

    async def next_event(self, timeout: float = 5.0) -> ReadEvent | None:
        """The next event, or None at the end of the stream."""
        async with asyncio.timeout(timeout):
            while True:
                if self._queued:
                    return self._queued.pop(0)
                piece = await self.response.content.readany()
                if not piece:
                    self._queued.extend(self._parse(self.parser.feed_eof()))
                    return self._queued.pop(0) if self._queued else None
                self.raw += piece
                self._queued.extend(self._parse(self.parser.feed(piece)))

    def _parse(self, events: Sequence[Any]) -> list[ReadEvent]:
        parsed = [ReadEvent(e.event, json.loads(e.data), e.id) for e in events]
        self.events.extend(parsed)
        return parsed

    async def read_all(self, timeout: float = 10.0) -> list[ReadEvent]:
        while await self.next_event(timeout) is not None:
            pass
        return self.events

    async def read_until(self, name: str, timeout: float = 5.0) -> ReadEvent:
        while True:
            event = await self.next_event(timeout)
            if event is None:
                raise AssertionError(f"stream ended before a {name!r} event; got {self.events}")
            if event.event == name:
                return event


def text_of(events: Sequence[ReadEvent], name: str = "delta") -> str:
    return "".join(e.data["text"] for e in events if e.event == name)


def terminal(events: Sequence[ReadEvent]) -> ReadEvent:
    ends = [e for e in events if e.event in ("done", "error")]
    assert len(ends) == 1, f"expected exactly one terminal event, got {ends}"
    assert events[-1] is ends[0], "the terminal event must be the last one"
    return ends[0]


async def open_live_streams(session: aiohttp.ClientSession, url: URL, count: int) -> list[StreamReader]:
    """Starts count generations at once and follows each until its first token arrives."""

    async def open_one(i: int) -> StreamReader:
        body = {"messages": [{"role": "user", "content": f"q{i}"}]}
        async with session.post(url / "api/chat", json=body) as response:
            assert response.status == 201, await response.text()
            generation_id = (await response.json())["id"]
        reader = StreamReader(await session.get(url / f"api/chat/{generation_id}/events"))
        await reader.read_until("delta", timeout=20)
        return reader

    return list(await asyncio.gather(*(open_one(i) for i in range(count))))


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Sink:
    """A BodySink (server/relay/bodytap.py) that keeps what it is given."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.ends: list[BaseException | None] = []
        self.ended = asyncio.Event()

    def body_data(self, data: bytes) -> None:
        self.pieces.append(data)

    def body_end(self, error: BaseException | None) -> None:
        self.ends.append(error)
        self.ended.set()
