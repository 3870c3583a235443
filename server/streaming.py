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
from aiohttp_sse import EventSourceResponse

from .config import StreamConfig
from .errors import ApiError
from .generation import Event, Generation, Subscriber

log = logging.getLogger(__name__)

HEARTBEAT = b": hb\r\n\r\n"

# Writes one event in the wire format of a particular endpoint (None: the events'
# own wire bytes, written as they are, as many as are pending in one write).
EventWriter = Callable[[EventSourceResponse, Event], Awaitable[None]]


class Outcome(enum.Enum):
    COMPLETE = "complete"  # the terminal event was written
    GONE = "gone"  # the client closed the connection
    STALLED = "stalled"  # the client stopped reading; closed, it may resume by id


class OpenStream:
    """A live SSE connection; the monitor task reads `last_write` and `request`."""

    __slots__ = ("_high_water", "client_key", "last_write", "request", "subscriber")

    def __init__(self, request: web.Request, subscriber: Subscriber, client_key: str) -> None:
        self.request = request
        self.subscriber = subscriber
        self.client_key = client_key
        self.last_write = asyncio.get_running_loop().time()
        transport = request.transport
        self._high_water = transport.get_write_buffer_limits()[1] if transport is not None else 0

    def connection_closed(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def write_may_wait(self, size: int) -> bool:
        """False when writing `size` bytes surely returns without waiting for the client.

        aiohttp's write only waits while the transport is paused (its buffer above the
        high-water mark), so a write that cannot get it there needs no timeout. The
        chunk header and trailer add a few bytes to `size`.
        """
        transport = self.request.transport
        if transport is None:
            return False  # the write fails at once
        return self.request.protocol.writing_paused or (
            transport.get_write_buffer_size() + size + 16 > self._high_water
        )


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
    write_event: EventWriter | None = None,
    retry_hint: bool = True,
) -> tuple[EventSourceResponse, Outcome]:
    """Send the SSE headers, write the events after id `after`, then follow live ones
    until the terminal event. Returns how the stream ended; a client that went away is
    an outcome, not an exception."""
    # The library's own ping task is replaced by one app-wide heartbeat (inf = never).
    response = EventSourceResponse(ping_interval=math.inf, send_timeout=config.send_timeout)
    await response.prepare(request)
    async with response:
        subscriber = generation.subscribe()
        stream = OpenStream(request, subscriber, client_key)
        streams.add(stream)
        try:
            # The retry hint goes out in the same write as the first events.
            hint = f"retry: {config.retry_ms}\r\n\r\n".encode() if retry_hint else b""
            if write_event is None:
                outcome = await _follow_wire(response, generation, stream, after, config, hint)
            else:
                if hint:
                    await response.write(hint)
                outcome = await _follow(response, generation, stream, after, config, write_event)
            return response, outcome
        except ConnectionResetError:
            return response, Outcome.GONE
        except TimeoutError:
            # The reader fell too far behind: drop it (aiohttp-sse may have already).
            if (transport := request.transport) is not None:
                transport.abort()
            log.info("generation %s: closed a stalled reader", generation.id)
            return response, Outcome.STALLED
        finally:
            streams.discard(stream)
            generation.unsubscribe(subscriber)


async def _follow_wire(
    response: EventSourceResponse,
    generation: Generation,
    stream: OpenStream,
    cursor: int,
    config: StreamConfig,
    prefix: bytes,
) -> Outcome:
    """Writes every pending event in one write, as the bytes the generation encoded once
    for all its readers; waits for a notification only when there is nothing to do."""
    subscriber = stream.subscriber
    loop = asyncio.get_running_loop()
    pending = prefix
    while True:
        if cursor < generation.last_event_id:
            wires = generation.wire_after(cursor)
            cursor += len(wires)
            pending = pending + b"".join(wires) if pending else b"".join(wires)
        if pending:
            await _write(response, stream, pending, config.send_timeout)
            pending = b""
            stream.last_write = loop.time()
            continue  # more may have arrived while the write waited
        terminal = generation.terminal
        if terminal is not None and cursor >= terminal.id:
            return Outcome.COMPLETE
        if subscriber.gone or stream.connection_closed():
            return Outcome.GONE
        if subscriber.heartbeat_due:
            subscriber.heartbeat_due = False
            async with asyncio.timeout(config.send_timeout):
                await response.write(HEARTBEAT)
            stream.last_write = loop.time()
            continue
        await subscriber.wait()


async def _write(response: EventSourceResponse, stream: OpenStream, data: bytes, send_timeout: float) -> None:
    """response.write bounded by `send_timeout` (a client that stopped reading), as aiohttp-sse's
    send does; the timer is only set when the write could wait at all."""
    if stream.write_may_wait(len(data)):
        async with asyncio.timeout(send_timeout):
            await response.write(data)
    else:
        await response.write(data)


async def _follow(
    response: EventSourceResponse,
    generation: Generation,
    stream: OpenStream,
    cursor: int,
    config: StreamConfig,
    write_event: EventWriter,
) -> Outcome:
    """The same loop for an endpoint with its own wire format, one event at a time."""
    subscriber = stream.subscriber
    loop = asyncio.get_running_loop()
    while True:
        pending = generation.events_after(cursor)
        for event in pending:
            await write_event(response, event)
            cursor = event.id
        if pending:
            stream.last_write = loop.time()
            continue  # more may have arrived while the writes waited
        terminal = generation.terminal
        if terminal is not None and cursor >= terminal.id:
            return Outcome.COMPLETE
        if subscriber.gone or stream.connection_closed():
            return Outcome.GONE
        if subscriber.heartbeat_due:
            subscriber.heartbeat_due = False
            async with asyncio.timeout(config.send_timeout):
                await response.write(HEARTBEAT)
            stream.last_write = loop.time()
            continue
        await subscriber.wait()
