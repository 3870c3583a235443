"""Writing a generation's events to one client connection over SSE.

Each open connection is an OpenStream in the app-wide set, so the single monitor
task can send heartbeats and notice closed connections for all of them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from server.config import StreamConfig
from server.http.errors import ApiError
from server.relay.generation import Event, Generation, Subscriber

log = logging.getLogger(__name__)

# A comment line with no blank line of its own, written only between whole events. A
# blank line would end a "block": SSE decoders that keep the last event id (the openai
# SDK's, httpx-sse's) then yield an empty event for it, and `json.loads("")` fails.
HEARTBEAT = b": hb\r\n"


def retry_hint(retry_ms: int) -> bytes:
    """The reconnection delay as a field of the first event's block: alone (with its own
    blank line) those decoders would yield it as an empty event, like a heartbeat."""
    return b"retry: %d\r\n" % retry_ms


# The wire bytes of one event for an endpoint with its own format (b"": not sent there).
# None: the events' own wire bytes, written as they are.
EventEncoder = Callable[[Event], bytes]


class EventStream(EventSourceResponse):
    """aiohttp-sse's response without its ping loop: the single monitor task sends every
    stream's heartbeats, and a task asleep per stream costs ~1.3 KB of memory."""

    async def _ping(self) -> None:
        return  # the task aiohttp-sse starts for it ends at once


class Outcome(enum.Enum):
    COMPLETE = "complete"  # the terminal event was written
    GONE = "gone"  # the client closed the connection
    STALLED = "stalled"  # the client stopped reading; closed, it may resume by id


class OpenStream:
    """A live SSE connection; the monitor task reads `last_write` and `request`.

    `cursor` is the id of the last event written to it, by its own task or pushed by
    the generation's task (see Subscriber.push)."""

    __slots__ = (
        "_chunked",
        "_high_water",
        "_loop",
        "_protocol",
        "_transport",
        "_writer",
        "client_key",
        "cursor",
        "last_write",
        "request",
        "subscriber",
    )

    def __init__(
        self, request: web.Request, subscriber: Subscriber, client_key: str, writer: AbstractStreamWriter, cursor: int
    ) -> None:
        self.request = request
        self.subscriber = subscriber
        self.client_key = client_key
        self.cursor = cursor
        self._loop = asyncio.get_running_loop()
        self.last_write = self._loop.time()
        self._writer = writer
        self._chunked = bool(getattr(writer, "chunked", False))  # HTTP/1.1; HTTP/1.0 streams unframed
        self._transport = request.transport
        self._protocol = request.protocol
        self._high_water = self._transport.get_write_buffer_limits()[1] if self._transport is not None else 0

    def connection_closed(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def write_now(self, data: bytes) -> bool:
        """Writes `data` if that surely returns without waiting for the client; False, and
        nothing written, otherwise (the connection is closing, or its buffer is nearly full:
        the caller then awaits response.write under a timeout, which also reports errors).

        The bytes go to the transport as aiohttp's writer frames them (an HTTP/1.1 chunk),
        without a coroutine and a drain check per event. aiohttp's write only waits while
        the transport is paused (above its high-water mark), so no timeout is needed here.
        """
        transport = self._transport
        if transport is None or transport.is_closing() or self._protocol.writing_paused:
            return False
        if transport.get_write_buffer_size() + len(data) + 16 > self._high_water:
            return False
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        transport.write(data)
        self._writer.output_size += len(data)  # the access log's byte count
        self.last_write = self._loop.time()
        return True

    def push(self, event_id: int, wire: bytes) -> bool:
        """Subscriber.push: the generation's next event, written at once if this reader
        is caught up and its client can take it."""
        if event_id != self.cursor + 1:
            return False
        try:
            written = self.write_now(wire)
        except (OSError, RuntimeError):
            # This runs in the generation's task: one reader's broken connection must not
            # end the answer for everyone. Its own task meets the error on its next write.
            return False
        if written:
            self.cursor = event_id
        return written


class OpenStreams:
    """The set of live SSE connections, able to say when the last one has closed."""

    def __init__(self) -> None:
        self._streams: set[OpenStream] = set()
        self._per_client: Counter[str] = Counter()
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, stream: OpenStream) -> None:
        self._streams.add(stream)
        self._per_client[stream.client_key] += 1
        self._empty.clear()

    def discard(self, stream: OpenStream) -> None:
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        self._per_client[stream.client_key] -= 1
        if self._per_client[stream.client_key] <= 0:
            del self._per_client[stream.client_key]
        if not self._streams:
            self._empty.set()

    def count(self, client_key: str) -> int:
        return self._per_client[client_key]

    def __iter__(self) -> Iterator[OpenStream]:
        return iter(self._streams)

    def __len__(self) -> int:
        return len(self._streams)

    async def wait_empty(self) -> None:
        await self._empty.wait()


def check_stream_limit(streams: OpenStreams, reader: str, limit: int) -> None:
    if streams.count(reader) >= limit:
        raise ApiError(
            429,
            "too_many_streams",
            f"You already have {limit} answer streams open, the limit. Close some tabs and try again.",
            headers={"Retry-After": "5"},
        )


async def serve(
    request: web.Request,
    generation: Generation,
    *,
    after: int,
    streams: OpenStreams,
    config: StreamConfig,
    client_key: str,
    encode: EventEncoder | None = None,
) -> tuple[EventSourceResponse, Outcome]:
    """Send the SSE headers, write the events after id `after`, then follow live ones
    until the terminal event. Returns how the stream ended; a client that went away is
    an outcome, not an exception."""
    # The library's own ping task is replaced by one app-wide heartbeat (inf = never).
    response = EventStream(ping_interval=math.inf, send_timeout=config.send_timeout)
    writer = await response.prepare(request)
    assert writer is not None
    async with response:
        subscriber = generation.subscribe()
        stream = OpenStream(request, subscriber, client_key, writer, after)
        streams.add(stream)
        try:
            # The retry hint goes out in the same write as the first events, in their block.
            hint = retry_hint(config.retry_ms)
            if encode is None:
                following = _follow_wire(response, generation, stream, config, hint)
            else:
                following = _follow(response, generation, stream, config, encode, hint)
            return response, await ended_as(request, generation.id, following)
        finally:
            streams.discard(stream)
            generation.unsubscribe(subscriber)


async def ended_as(request: web.Request, generation_id: str, following: Awaitable[Outcome]) -> Outcome:
    """How a stream's following ended: a client that went away or stopped reading is an
    outcome, not an exception (a stalled one is dropped: it may resume by id)."""
    try:
        return await following
    except ConnectionResetError:
        return Outcome.GONE
    except TimeoutError:
        # The reader fell too far behind: drop it (aiohttp-sse may have already).
        if (transport := request.transport) is not None:
            transport.abort()
        log.info("generation %s: closed a stalled reader", generation_id)
        return Outcome.STALLED


class _Idle(enum.Enum):
    WAIT = "wait"  # nothing to do until the subscriber is notified
    LOOK_AGAIN = "look_again"  # a heartbeat was written: events may have come meanwhile


async def _between_events(
    response: EventSourceResponse, generation: Generation, stream: OpenStream, config: StreamConfig
) -> Outcome | _Idle:
    """With every event written: how the stream ends, or what to do next."""
    terminal = generation.terminal
    if terminal is not None and stream.cursor >= terminal.id:
        return Outcome.COMPLETE
    subscriber = stream.subscriber
    if subscriber.gone or stream.connection_closed():
        return Outcome.GONE
    if subscriber.heartbeat_due:
        subscriber.heartbeat_due = False
        async with asyncio.timeout(config.send_timeout):
            await response.write(HEARTBEAT)
        stream.last_write = asyncio.get_running_loop().time()
        return _Idle.LOOK_AGAIN
    return _Idle.WAIT


async def _follow_wire(
    response: EventSourceResponse,
    generation: Generation,
    stream: OpenStream,
    config: StreamConfig,
    prefix: bytes,
) -> Outcome:
    """Writes every pending event in one write, as the bytes the generation encoded once
    for all its readers. While it waits, new events are pushed to the client from the
    generation's task; it is woken only when a push could not be done, at the end, or
    for the monitor (heartbeat, closed connection)."""
    subscriber = stream.subscriber
    loop = asyncio.get_running_loop()
    pending = prefix
    while True:
        if stream.cursor < generation.last_event_id:
            after, stream.cursor = stream.cursor, generation.last_event_id
            pending += generation.wire_after(after)  # no name keeps it alive while waiting
        if pending:
            if not stream.write_now(pending):
                async with asyncio.timeout(config.send_timeout):  # as aiohttp-sse's send does
                    await response.write(pending)
                stream.last_write = loop.time()
            pending = b""
            continue  # more may have arrived while the write waited
        outcome = await _between_events(response, generation, stream, config)
        if isinstance(outcome, Outcome):
            return outcome
        if outcome is _Idle.WAIT:
            await subscriber.wait(stream.push)


async def _follow(
    response: EventSourceResponse,
    generation: Generation,
    stream: OpenStream,
    config: StreamConfig,
    encode: EventEncoder,
    prefix: bytes,
) -> Outcome:
    """The same loop for an endpoint with its own wire format: the pending events are
    encoded for it and written in one write."""
    subscriber = stream.subscriber
    loop = asyncio.get_running_loop()
    pending = prefix
    while True:
        events = generation.events_after(stream.cursor)
        if events:
            stream.cursor = events[-1].id
            pending += b"".join([encode(event) for event in events])
        if pending:
            async with asyncio.timeout(config.send_timeout):  # as aiohttp-sse's send does
                await response.write(pending)
            stream.last_write = loop.time()
            pending = b""
        if events:
            continue  # more may have arrived while the write waited
        outcome = await _between_events(response, generation, stream, config)
        if isinstance(outcome, Outcome):
            return outcome
        if outcome is _Idle.WAIT:
            await subscriber.wait()
