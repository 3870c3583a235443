"""The reader's side of shared mode: an answer another process streams, followed from
its Redis stream (blocking reads from the reader's Last-Event-ID), and stopped by a
message to its owner."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.config import StreamConfig
from server.http.errors import ApiError
from server.relay.generation import Subscriber, event_from_wire, wire_bytes
from server.relay.streaming import HEARTBEAT, EventStream, OpenStream, OpenStreams, Outcome, retry_hint

from . import names

log = logging.getLogger(__name__)

# Replies as redis-py gives them without decode_responses: bytes throughout.
Entries = list[tuple[bytes, dict[bytes, bytes]]]

POLL_SECONDS = 1.0  # longest blocking read: how soon a closed tab or a heartbeat is seen
READ_COUNT = 1000  # entries per read: a reader far behind catches up in big writes
STOP_WAIT_SECONDS = 5.0
LOST_CHECK_SECONDS = 5.0  # how often a reader with nothing new checks the answer still exists

LOST = {
    "code": "generation_lost",
    "message": "This answer is no longer available: the process streaming it went away. Try again.",
    "retryable": True,
}


def unavailable() -> ApiError:
    return ApiError(
        503,
        "cluster_unavailable",
        "This answer is streamed by another Rill process, which cannot be reached right now. Try again in a moment.",
        headers={"Retry-After": "2"},
    )


@dataclass(frozen=True)
class RemoteAnswer:
    """An answer owned by another process, as its hash in Redis tells."""

    id: str
    owner: str | None
    process: str
    end: int | None  # its terminal event's id, once it has ended
    usage: dict[str, Any] | None


async def find(redis: Redis, generation_id: str) -> RemoteAnswer | None:
    try:
        about = cast(dict[bytes, bytes], await redis.hgetall(names.answer_key(generation_id)))
    except (RedisError, OSError) as error:
        log.warning("Redis: cannot look up generation %s (%s)", generation_id, type(error).__name__)
        raise unavailable() from None
    if not about or b"process" not in about:
        return None
    end = about.get(b"end")
    usage = about.get(b"usage")
    return RemoteAnswer(
        id=generation_id,
        owner=about.get(b"owner", b"").decode() or None,
        process=about[b"process"].decode(),
        end=int(end) if end is not None else None,
        usage=json.loads(usage) if usage is not None else None,
    )


async def last_event_id(redis: Redis, answer: RemoteAnswer) -> int:
    """The id of the answer's last event in Redis (0: none yet)."""
    if answer.end is not None:
        return answer.end
    try:
        last = cast(Entries, await redis.xrevrange(names.events_key(answer.id), count=1))
    except (RedisError, OSError):
        raise unavailable() from None
    return names.event_id(last[0][0]) if last else 0


async def serve_remote(
    request: web.Request,
    redis: Redis,
    answer: RemoteAnswer,
    *,
    after: int,
    streams: OpenStreams,
    config: StreamConfig,
    client_key: str,
    closing: Callable[[], bool],
) -> tuple[web.StreamResponse, Outcome]:
    """Writes the answer's events after `after` from Redis, then follows new ones until
    its terminal event; as serve() does for an answer of this process."""
    response = EventStream(ping_interval=math.inf, send_timeout=config.send_timeout)
    writer = await response.prepare(request)
    assert writer is not None
    async with response:
        subscriber = Subscriber()  # the monitor's heartbeats and closed-connection notices
        stream = OpenStream(request, subscriber, client_key, writer, after)
        streams.add(stream)
        try:
            outcome = await _follow(response, redis, answer, stream, config, closing)
            return response, outcome
        except ConnectionResetError:
            return response, Outcome.GONE
        except TimeoutError:
            if (transport := request.transport) is not None:
                transport.abort()
            log.info("generation %s: closed a stalled reader", answer.id)
            return response, Outcome.STALLED
        finally:
            streams.discard(stream)


async def _follow(
    response: EventStream,
    redis: Redis,
    answer: RemoteAnswer,
    stream: OpenStream,
    config: StreamConfig,
    closing: Callable[[], bool],
) -> Outcome:
    loop = asyncio.get_running_loop()
    key = names.events_key(answer.id)
    pending = retry_hint(config.retry_ms)
    quiet_since = loop.time()
    while True:
        try:
            found = cast(
                list[tuple[bytes, Entries]],
                await redis.xread(
                    {key: names.entry_id(stream.cursor)}, count=READ_COUNT, block=int(POLL_SECONDS * 1000)
                ),
            )
        except (RedisError, OSError) as error:
            # The client reconnects (EventSource does by itself) and resumes from its last id.
            log.warning("generation %s: Redis read failed (%s), its reader resumes", answer.id, type(error).__name__)
            return Outcome.GONE
        complete = False
        if found:
            quiet_since = loop.time()
            for entry, fields in found[0][1]:
                pending += fields[names.WIRE_FIELD]
                stream.cursor = names.event_id(entry)
                complete = complete or names.TERMINAL_FIELD in fields
        elif loop.time() - quiet_since >= LOST_CHECK_SECONDS:
            quiet_since = loop.time()
            if not await redis.exists(names.answer_key(answer.id)):
                pending += wire_bytes(stream.cursor + 1, "error", json.dumps(LOST))
                complete = True
        if pending:
            if not stream.write_now(pending):
                async with asyncio.timeout(config.send_timeout):
                    await response.write(pending)
            stream.last_write = loop.time()
            pending = b""
        if complete:
            return Outcome.COMPLETE
        subscriber = stream.subscriber
        if subscriber.gone or stream.connection_closed() or closing():
            return Outcome.GONE
        if subscriber.heartbeat_due:
            subscriber.heartbeat_due = False
            pending = HEARTBEAT


async def stop_remote(redis: Redis, answer: RemoteAnswer) -> dict[str, Any]:
    """Tells the owner to stop the answer and waits for its ending to reach Redis; the
    body DELETE gives for an answer of this process."""
    if answer.end is None:
        try:
            heard = await redis.publish(names.stop_channel(answer.process), answer.id)
        except (RedisError, OSError):
            raise unavailable() from None
        if not heard:
            raise unavailable()  # its process is not listening: gone, or reconnecting to Redis
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_WAIT_SECONDS
    ended = answer
    while ended.end is None:
        if loop.time() >= deadline:
            raise unavailable()
        await asyncio.sleep(0.01)
        found = await find(redis, answer.id)
        if found is None:
            raise ApiError(404, "generation_not_found", "No such generation (it may have expired).")
        ended = found
    try:
        entries = cast(Entries, await redis.xrange(names.events_key(answer.id), names.entry_id(ended.end), count=1))
    except (RedisError, OSError):
        raise unavailable() from None
    if not entries:
        raise ApiError(404, "generation_not_found", "No such generation (it may have expired).")
    event = event_from_wire(ended.end, entries[0][1][names.WIRE_FIELD])
    return {"id": answer.id, "ended": event.name, "result": json.loads(event.data), "usage": ended.usage}
