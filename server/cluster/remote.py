"""The reader's side of shared mode: an answer another process streams, followed from
its Redis stream (blocking reads from the reader's Last-Event-ID), and stopped by a
message to its owner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

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
READING_EVERY = 1.0  # seconds between a reader's "still reading" to the owner (at most)

WORKER_LOST = {
    "code": "worker_lost",
    "message": "The Rill process streaming this answer stopped. The text so far is kept; try again.",
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
    # Said well within the owner's grace (the processes of a cluster share a config).
    reading_every = min(READING_EVERY, config.resume_grace / 3)
    block_ms = max(10, int(min(POLL_SECONDS, reading_every) * 1000))  # 0 would block for good
    said_reading = -math.inf
    while True:
        if loop.time() - said_reading >= reading_every:
            said_reading = loop.time()
            await _say_reading(redis, answer)
        try:
            found = cast(
                list[tuple[bytes, Entries]],
                await redis.xread({key: names.entry_id(stream.cursor)}, count=READ_COUNT, block=block_ms),
            )
        except (RedisError, OSError) as error:
            # The client reconnects (EventSource does by itself) and resumes from its last id.
            log.warning("generation %s: Redis read failed (%s), its reader resumes", answer.id, type(error).__name__)
            return Outcome.GONE
        complete = False
        if found:
            for entry, fields in found[0][1]:
                pending += fields[names.WIRE_FIELD]
                stream.cursor = names.event_id(entry)
                complete = complete or names.TERMINAL_FIELD in fields
        elif not await _owner_alive(redis, answer):
            # Caught up, and the owner is gone: its answer ends here, for every reader.
            await _end_for_lost_owner(redis, answer, stream.cursor, max(1, round(config.finished_ttl)))
            continue
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


async def _say_reading(redis: Redis, answer: RemoteAnswer) -> None:
    """Tells the owner a reader here follows its answer: not to be abandoned as unread."""
    with contextlib.suppress(RedisError, OSError):  # the read itself meets the trouble
        await redis.publish(names.control_channel(answer.process), names.READING + answer.id.encode())


async def _owner_alive(redis: Redis, answer: RemoteAnswer) -> bool:
    try:
        return bool(await redis.exists(names.process_key(answer.process)))
    except (RedisError, OSError):
        return True  # Redis trouble is not the owner's death: the next read meets it


async def _end_for_lost_owner(redis: Redis, answer: RemoteAnswer, last: int, ttl: int) -> None:
    """Appends a retryable `worker_lost` error after the last event, as the owner would
    have appended its terminal event: readers on every process end alike, and a resume
    later gets the same ending. If an event came meanwhile, the id is taken and nothing
    is appended: the next read gets that event."""
    event_id = last + 1
    wire = wire_bytes(event_id, "error", json.dumps(WORKER_LOST, separators=(",", ":")))
    events_key, answer_key = names.events_key(answer.id), names.answer_key(answer.id)
    try:
        await redis.xadd(events_key, {names.WIRE_FIELD: wire, names.TERMINAL_FIELD: b"1"}, id=names.entry_id(event_id))
    except ResponseError:
        return  # not the last event any more
    except (RedisError, OSError):
        return
    log.warning("generation %s: its process %s is gone; ended with worker_lost", answer.id, answer.process)
    with contextlib.suppress(RedisError, OSError):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hset(answer_key, "end", event_id)
            pipe.expire(answer_key, ttl)
            pipe.expire(events_key, ttl)
            await pipe.execute()


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
        entries = cast(Entries, await redis.xrange(names.events_key(answer.id), names.entry_id(ended.end), count=1))
    except (RedisError, OSError):
        raise unavailable() from None
    if not entries:
        raise ApiError(404, "generation_not_found", "No such generation (it may have expired).")
    event = event_from_wire(ended.end, entries[0][1][names.WIRE_FIELD])
    return {"id": answer.id, "ended": event.name, "result": json.loads(event.data), "usage": ended.usage}
