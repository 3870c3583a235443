"""The fake OpenAI-compatible upstream: `python -m bench.upstream --port N`.

The scenario travels in the request itself (the last user message is JSON), so Rill
relays it unchanged: {"tokens": 300, "interval": 0.033, "split": 0.1, "seed": 7}.
Each token is stamped with the time it is written. GET /stats tells how many requests
came and how many are still open (the abort and resume storms read it), and, for a
scenario with a "tag", when its request was closed before its end (time.monotonic(),
one clock for every process of the machine: the Stop latency bench reads it).

It shares a core with the load client and must stay far from saturating it at 30,000
tokens a second, so it speaks just enough HTTP/1.1 itself (keep-alive, Content-Length
request bodies, a chunked response) over asyncio protocols: a paced token is one timer
callback and one write, with no task, no aiohttp writer and no drain per token."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any, cast

from .loops import install_fast_loop
from .wire import openai_chunk, openai_finish, token_text

SPLIT_GAP = 0.001  # between the two halves of a split event: each its own TCP segment
BATCH = 16  # tokens written back to back by a stream that goes as fast as possible


class Upstream:
    def __init__(self) -> None:
        self.requests = 0
        self.open = 0
        self.closed: dict[str, float] = {}  # tag -> when its request was closed unfinished

    def handle(self, connection: Connection, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/stats":
            connection.respond_json({"requests": self.requests, "open": self.open, "closed": self.closed})
        elif method == "POST" and path == "/stats/reset":
            self.requests = 0
            connection.respond_json({"requests": 0, "open": self.open})
        elif method == "POST" and path == "/v1/chat/completions":
            scenario = json.loads(json.loads(body)["messages"][-1]["content"])
            self.requests += 1
            self.open += 1
            connection.answer = answer = Answer(self, connection, scenario)
            answer.begin()
        else:
            connection.respond_json({"error": f"no {method} {path}"}, status="404 Not Found")


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests one after another (keep-alive), no pipelining."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.close_after = False
        self.resumed: asyncio.Future[None] | None = None  # set while the client is not reading
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._next_request()

    def _next_request(self) -> None:
        if self.answer is not None or self.transport is None:
            return  # the next request waits for this answer to end
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        request_line, *lines = self._buffer[:head_end].decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        if "chunked" in headers.get("transfer-encoding", ""):
            self.close_after = True
            self.respond_json({"error": "send a Content-Length"}, status="411 Length Required")
            return
        end = head_end + 4 + int(headers.get("content-length", "0"))
        if len(self._buffer) < end:
            return
        body, self._buffer = self._buffer[head_end + 4 : end], self._buffer[end:]
        self.close_after = headers.get("connection", "").lower() == "close"
        self.upstream.handle(self, method, path.partition("?")[0], body)

    def respond_json(self, value: Any, status: str = "200 OK") -> None:
        body = json.dumps(value).encode()
        self.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status.encode(), len(body), body)
        )
        self.done()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_chunk(self, data: bytes) -> None:
        self.write(b"%x\r\n%s\r\n" % (len(data), data))

    def done(self) -> None:
        """The response is complete: close, or serve the next request on this connection."""
        self.answer = None
        if self.close_after and self.transport is not None:
            self.transport.close()
        else:
            self._next_request()

    def pause_writing(self) -> None:
        self.resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)
        self.resumed = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.resume_writing()
        if self.answer is not None:
            if self.answer.tag is not None and not self.answer.ended:
                self.upstream.closed[self.answer.tag] = time.monotonic()
            self.answer.end()  # the reader went away: that is what the abort storm looks at


class Answer:
    """One streamed answer. Paced tokens are timer callbacks at their due times (with a
    random phase, so that many streams do not tick in step); an answer as fast as
    possible is a task writing batches while the client keeps up."""

    def __init__(self, upstream: Upstream, connection: Connection, scenario: dict[str, Any]) -> None:
        self.upstream = upstream
        self.connection = connection
        self.tokens = int(scenario["tokens"])
        self.interval = float(scenario.get("interval", 0.0))
        self.split = float(scenario.get("split", 0.0))
        self.rng = random.Random(scenario.get("seed", 0))
        self.tag: str | None = scenario.get("tag")
        self.index = 0
        self.ended = False
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time() + self.rng.random() * self.interval
        self.task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        self.connection.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        if not self.tokens:
            self._finish()
        elif self.interval:
            self.loop.call_at(self.start, self._paced)
        else:
            self.task = asyncio.ensure_future(self._fast())

    def _next(self) -> tuple[bytes, int]:
        """The next token's chunk, stamped now, and where to split it (0: not split)."""
        data = openai_chunk(token_text(self.index, time.monotonic_ns()))
        self.index += 1
        cut = self.rng.randrange(1, len(data)) if self.split and self.rng.random() < self.split else 0
        return data, cut

    def _paced(self) -> None:
        """A timer callback per token. A split token's second half is due SPLIT_GAP later,
        well before the next token (the split scenario's interval is 10 ms)."""
        if self.ended:
            return
        data, cut = self._next()
        last = self.index == self.tokens
        if cut:
            self.connection.write_chunk(data[:cut])
            self.loop.call_later(SPLIT_GAP, self._rest, data[cut:], last)
        else:
            self._rest(data, last)

    async def _fast(self) -> None:
        while not self.ended and self.index < self.tokens:
            if (resumed := self.connection.resumed) is not None:
                await resumed  # the client's buffer is full: wait until it reads
            for _ in range(min(BATCH, self.tokens - self.index)):
                data, cut = self._next()
                if cut:
                    self.connection.write_chunk(data[:cut])
                    await asyncio.sleep(SPLIT_GAP)
                    data = data[cut:]
                    if self.gone():
                        return
                self.connection.write_chunk(data)
            await asyncio.sleep(0)  # let the other streams write too
        if not self.ended:
            self._finish()

    def _rest(self, data: bytes, last: bool) -> None:
        """A paced token's bytes (or the second half of them), then the next token's timer."""
        if self.ended:
            return
        self.connection.write_chunk(data)
        if last:
            self._finish()
        else:
            self.loop.call_at(self.start + self.index * self.interval, self._paced)

    def _finish(self) -> None:
        self.connection.write_chunk(openai_finish(self.tokens))
        self.connection.write(b"0\r\n\r\n")
        self.end()
        self.connection.done()

    def gone(self) -> bool:
        """Ended meanwhile (a method, so a check after an await is not taken as settled)."""
        return self.ended

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.upstream.open -= 1


async def listen(upstream: Upstream, port: int = 0) -> asyncio.Server:
    """Serves `upstream` on loopback (port 0: any free port, see server.sockets)."""
    return await asyncio.get_running_loop().create_server(lambda: Connection(upstream), "127.0.0.1", port)


async def serve(port: int) -> None:
    async with await listen(Upstream(), port) as server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    install_fast_loop()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
