"""The reader's side of shared mode: an answer another process streams, found by its
hash in Redis, written to a reader from its Redis stream (from the reader's
Last-Event-ID on, then as the process's hub reads new events), and stopped by a message
to its owner."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.config import StreamConfig
from server.http.errors import ApiError
from server.http.validation import past_last_event
from server.relay.generation import Subscriber, event_from_wire
from server.relay.streaming import (
    HEARTBEAT,
    EventEncoder,
    EventStream,
    OpenStream,
    OpenStreams,
    Outcome,
    ended_as,
    retry_hint,
)

from . import names
from .names import Entries

if TYPE_CHECKING:
    from .hub import Follower, RemoteHub

log = logging.getLogger(__name__)


STOP_WAIT_SECONDS = 5.0
CATCH_UP_SECONDS = 0.5  # how long a Last-Event-ID past Redis's last event may wait for it


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
    client_key: str  # who started it (GET /stream resumes only for the same client)
    fingerprint: str  # what was asked (and, for GET /stream, through which URL)


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
        client_key=about.get(b"client", b"").decode(),
        fingerprint=about.get(b"fingerprint", b"").decode(),
    )


async def last_event(redis: Redis, answer: RemoteAnswer) -> tuple[int, bool]:
    """(the id of the answer's last event in Redis, 0 for none yet; whether it is the
    answer's last), told by the stream itself: its hash's `end` may lag a moment."""
    if answer.end is not None:
        return answer.end, True
    try:
        last = cast(Entries, await redis.xrevrange(names.events_key(answer.id), count=1))
    except (RedisError, OSError):
        raise unavailable() from None
    if not last:
        return 0, False
    return names.event_id(last[0][0]), names.TERMINAL_FIELD in last[0][1]


async def all_delivered(redis: Redis, answer: RemoteAnswer, after: int) -> bool:
    """views_api.all_delivered for an answer of another process: whether a client with
    every event up to `after` has the whole answer; an id past the last event is refused."""
    last, ended = await _up_to(redis, answer, after)
    if after > last:
        raise past_last_event(after)
    return ended and after >= last


async def _up_to(redis: Redis, answer: RemoteAnswer, after: int) -> tuple[int, bool]:
    """last_event(), waiting a moment for Redis to hold event `after` when it does not
    yet: a reader that had it from the owner may come back here sooner than the owner's
    next write ([cluster] write_interval)."""
    if after == 0 and answer.end is None:
        return 0, False  # from the start: nothing to check (the follower reads what there is)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CATCH_UP_SECONDS
    last, ended = await last_event(redis, answer)
    while after > last and not ended and loop.time() < deadline:
        await asyncio.sleep(0.01)
        last, ended = await last_event(redis, answer)
    return last, ended


async def serve_remote(
    request: web.Request,
    hub: RemoteHub,
    answer: RemoteAnswer,
    *,
    after: int,
    streams: OpenStreams,
    config: StreamConfig,
    client_key: str,
    encode: EventEncoder | None = None,
) -> tuple[web.StreamResponse, Outcome]:
    """Writes the answer's events after `after` from Redis, then follows new ones (from
    the process's hub) until its terminal event; as serve() does for a local answer
    (with `encode`, in an endpoint's own format)."""
    response = EventStream(ping_interval=math.inf, send_timeout=config.send_timeout)
    writer = await response.prepare(request)
    assert writer is not None
    async with response:
        subscriber = Subscriber()  # woken by the hub, and by the monitor (heartbeats, a closed tab)
        stream = OpenStream(request, subscriber, client_key, writer, after)
        streams.add(stream)
        follower = None
        try:
            follower = await hub.follow(answer, after, subscriber)
            following = _follow(response, follower, stream, config, encode)
            return response, await ended_as(request, answer.id, following)
        except (RedisError, OSError) as error:
            log.warning("generation %s: Redis read failed (%s), its reader resumes", answer.id, type(error).__name__)
            return response, Outcome.GONE
        finally:
            if follower is not None:
                hub.unfollow(follower)
            streams.discard(stream)


async def _follow(
    response: EventStream, follower: Follower, stream: OpenStream, config: StreamConfig, encode: EventEncoder | None
) -> Outcome:
    loop = asyncio.get_running_loop()
    subscriber = stream.subscriber
    pending = retry_hint(config.retry_ms)
    while True:
        if follower.pending:
            runs = b"".join(follower.pending)
            if encode is not None:
                runs = b"".join([encode(event_from_wire(*event)) for event in names.split(runs)])
            pending += runs
            follower.pending.clear()
            stream.cursor = follower.cursor
        if pending:
            if not stream.write_now(pending):
                async with asyncio.timeout(config.send_timeout):
                    await response.write(pending)
            stream.last_write = loop.time()
            pending = b""
            continue  # more may have come while the write waited
        if follower.complete:
            return Outcome.COMPLETE
        if follower.failed or subscriber.gone or stream.connection_closed():
            return Outcome.GONE
        if subscriber.heartbeat_due:
            subscriber.heartbeat_due = False
            pending = HEARTBEAT
            continue
        if encode is None:
            follower.push = stream.write_now  # the hub writes new events itself while we wait
        try:
            await subscriber.wait()
        finally:
            follower.push = None
        stream.cursor = follower.cursor if not follower.pending else stream.cursor


async def stop_remote(redis: Redis, answer: RemoteAnswer) -> dict[str, Any]:
    """Tells the owner to stop the answer and waits for its ending to reach Redis; the
    body DELETE gives for an answer of this process."""
    if answer.end is None:
        try:
            heard = await redis.publish(names.control_channel(answer.process), names.STOP + answer.id.encode())
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
        last = cast(Entries, await redis.xrevrange(names.events_key(answer.id), count=1))
    except (RedisError, OSError):
        raise unavailable() from None
    wire = dict(names.events_in(last[0][1], ended.end - 1)[0]).get(ended.end) if last else None
    if wire is None:
        raise ApiError(404, "generation_not_found", "No such generation (it may have expired).")
    event = event_from_wire(ended.end, wire)
    return {"id": answer.id, "ended": event.name, "result": json.loads(event.data), "usage": ended.usage}
