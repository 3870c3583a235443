"""Writing one owner's change feed to a client over SSE (`GET /api/changes`).

The stream joins the app-wide set of open streams, so the monitor task sends its
heartbeats and notices its closed connection like any answer stream's, and it counts
toward the client's stream limit."""

from __future__ import annotations

import asyncio
import logging
import math

from aiohttp import web

from server.config import StreamConfig
from server.history.feed import ChangeFeed, encode
from server.relay.streaming import HEARTBEAT, EventStream, OpenStream, OpenStreams, retry_hint

log = logging.getLogger(__name__)


async def follow_changes(
    request: web.Request,
    feed: ChangeFeed,
    owner: str,
    *,
    after: int | None,
    streams: OpenStreams,
    config: StreamConfig,
    client_key: str,
) -> web.StreamResponse:
    """Sends the owner's events after number `after` (None: a `reset` first), then live
    ones until the client leaves or the server stops."""
    response = EventStream(ping_interval=math.inf, send_timeout=config.send_timeout)
    writer = await response.prepare(request)
    assert writer is not None
    loop = asyncio.get_running_loop()
    async with response:
        subscriber = feed.subscribe(owner)
        stream = OpenStream(request, subscriber, client_key, writer, 0)
        streams.add(stream)
        try:
            cursor = feed.latest(owner)
            if after is None:
                # Unknown or too old: the page refetches the list, then follows from here.
                pending = retry_hint(config.retry_ms) + encode(feed.event_id(cursor), "reset", {})
            else:
                # The id alone (no data, nothing dispatched) tells EventSource where it is.
                pending = retry_hint(config.retry_ms) + b"id: %s\r\n\r\n" % feed.event_id(after).encode()
                cursor = after
            while True:
                events = feed.after(owner, cursor)
                if events is None:  # fell behind the ring
                    cursor = feed.latest(owner)
                    pending += encode(feed.event_id(cursor), "reset", {})
                elif events:
                    cursor = events[-1].number
                    pending += b"".join(event.wire for event in events)
                if pending:
                    async with asyncio.timeout(config.send_timeout):
                        await response.write(pending)
                    stream.last_write = loop.time()
                    pending = b""
                    continue  # more may have come while the write waited
                if subscriber.gone or stream.connection_closed():
                    break
                if subscriber.heartbeat_due:
                    subscriber.heartbeat_due = False
                    pending = HEARTBEAT
                    continue
                await subscriber.wait()
        except (ConnectionResetError, TimeoutError):
            if (transport := request.transport) is not None:
                transport.abort()
        finally:
            streams.discard(stream)
            feed.unsubscribe(owner, subscriber)
    return response
