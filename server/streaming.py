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

# Writes one event in the wire format of a particular endpoint.
EventWriter = Callable[[EventSourceResponse, Event], Awaitable[None]]


class Outcome(enum.Enum):
    COMPLETE = "complete"  # the terminal event was written
    GONE = "gone"  # the client closed the connection
    STALLED = "stalled"  # the client stopped reading; closed, it may resume by id


class OpenStream:
    """A live SSE connection; the monitor task reads `last_write` and `request`."""

    __slots__ = ("client_key", "last_write", "request", "subscriber")

    def __init__(self, request: web.Request, subscriber: Subscriber, client_key: str) -> None:
        self.request = request
        self.subscriber = subscriber
        self.client_key = client_key
        self.last_write = asyncio.get_running_loop().time()

    def connection_closed(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()


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


async def write_json_event(response: EventSourceResponse, event: Event) -> None:
    await response.send(event.data, id=str(event.id), event=event.name)


async def serve(
    request: web.Request,
    generation: Generation,
    *,
    after: int,
    streams: OpenStreams,
    config: StreamConfig,
    client_key: str,
    write_event: EventWriter = write_json_event,
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
            if retry_hint:
                await response.write(f"retry: {config.retry_ms}\r\n\r\n".encode())
            return response, await _follow(response, generation, stream, after, config, write_event)
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


async def _follow(
    response: EventSourceResponse,
    generation: Generation,
    stream: OpenStream,
    cursor: int,
    config: StreamConfig,
    write_event: EventWriter,
) -> Outcome:
    subscriber = stream.subscriber
    loop = asyncio.get_running_loop()
    while True:
        subscriber.wake.clear()
        pending = generation.events_after(cursor)
        for event in pending:
            await write_event(response, event)
            cursor = event.id
        if pending:
            stream.last_write = loop.time()
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
        await subscriber.wake.wait()
