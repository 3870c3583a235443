"""The owner's side of shared mode: every event of the answers this process streams is
appended to the answer's Redis stream (where a resume on any process finds it) and to
this process's feed (where readers on other processes follow all its answers at once).

Writes are few and cheap: at most one every [cluster] write_interval, one script call appending every
answer's new events (an entry per answer, and one feed entry for them all), in one
pipelined round trip with whatever else changed (a new answer's hash, an ended one's).
A redis-py command costs far more CPU than a token's relay, so one per token, or one per
answer per write, would multiply the cost of an answer.

Local readers are still written to directly (generation.py); the mirror only queues
each event's bytes as they are buffered and one task writes them out."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from server.config import Config
from server.relay.generation import Generation

from . import names

log = logging.getLogger(__name__)

Batch = dict[Generation, list[tuple[int, bytes]]]  # each answer's new events: (id, SSE bytes)

RETRY_FIRST = 0.1  # seconds before writing again after Redis failed, doubled up to RETRY_MAX
RETRY_MAX = 5.0
ERROR_LOG_EVERY = 60.0  # seconds: a Redis outage is logged once a minute, not once a write
ANNOUNCE_WAIT = 2.0  # seconds a request waits for its answer to be known in Redis
ENTRY_EVENTS = 500  # events in one stream entry at most (a catch-up after an outage)

# Appends a write's events: KEYS[1], the owner's feed; ARGV, the feed entry's id, its
# length bound, its lifetime (ms), the answers' stream key prefix, then the write itself:
# per answer, a line "<answer id> <last event id> <1 if it holds the answer's last event,
# else 0> <bytes>" and that many bytes, its run of events. One argument for it all: a
# redis-py argument costs far more to send than Lua takes to cut it (the answers'
# stream keys are built here, so shared mode needs one Redis, not a Redis Cluster).
# An id a stream already has (a write retried after an outage) is refused without
# failing the rest; readers skip the events they have, should a feed entry repeat some.
APPEND = """
local batch, prefix = ARGV[5], ARGV[4]
local runs, order, ended = {}, {}, {}
local at, size = 1, #batch
while at <= size do
  local eol = string.find(batch, '\\n', at, true)
  local gid, id, terminal, length = string.match(string.sub(batch, at, eol - 1), '^(%S+) (%d+) (%d) (%d+)$')
  local run = string.sub(batch, eol + 1, eol + length)
  at = eol + length + 1
  if terminal == '1' then
    redis.pcall('XADD', prefix .. gid, '0-' .. id, 'w', run, 't', '1')
    ended[#ended + 1] = gid
  else
    redis.pcall('XADD', prefix .. gid, '0-' .. id, 'w', run)
  end
  if runs[gid] then
    runs[gid] = runs[gid] .. run
  else
    runs[gid] = run
    order[#order + 1] = gid
  end
end
local command = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], ARGV[1]}
for _, gid in ipairs(order) do
  command[#command + 1] = gid
  command[#command + 1] = runs[gid]
end
if #ended > 0 then
  command[#command + 1] = 't'
  command[#command + 1] = table.concat(ended, ' ')
end
redis.pcall(unpack(command))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return #order
"""
WRITE_ANSWERS = 1000  # answers in one script call at most (Lua's unpack() is bounded)
# The feed keeps about this many writes (10 s at the default write_interval): a reader
# further behind reads the answers' own streams instead (hub.py).
FEED_LENGTH = 1000
FEED_TTL_MS = 60_000  # a feed outlives its process by this much
# Events kept for Redis while it is down; past this the answers in them stop being
# shared (they stream on here), so a long outage costs bounded memory.
MAX_PENDING_EVENTS = 100_000


class EventMirror:
    def __init__(
        self, redis: Redis, process: str, config: Config, ended: Callable[[Any, Generation], None] | None = None
    ) -> None:
        self.redis = redis
        self.process = process
        self._ended = ended  # adds to the pipeline what else an answer's end changes in Redis
        self._finished_ttl = max(1, round(config.stream.finished_ttl))
        # Seconds between two writes at most ([cluster] write_interval): what a reader on
        # another process may wait longer than one here, for far fewer writes under load.
        self._write_interval = config.cluster.write_interval
        # While live, an answer's keys outlive its longest possible run, so the owner
        # dying leaves nothing behind for good.
        self._live_ttl = self._finished_ttl + max(1, round(config.timeouts.max_generation))
        self._pending: dict[Generation, list[tuple[int, bytes]]] = {}
        # Answers with events mirrored and an end not yet written: what a resync after a
        # Redis outage writes again.
        self._mirrored: dict[str, Generation] = {}
        self._resync = False  # Redis failed: what it holds may be behind, or gone (a restart)
        self._announced: set[str] = set()  # answers whose hash is written (and not ended)
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever the writer has nothing left to do
        self._idle.set()
        self._writing = False
        self._task: asyncio.Task[None] | None = None
        # Called by its SHA, loaded once (and again after a Redis restart forgot it):
        # redis-py's Script in a pipeline asks SCRIPT EXISTS first on every write.
        self._append_sha: str | None = None
        self._feed = names.feed_key(process)
        self._sequence = 0  # of the feed's entries
        self._failing_since: float | None = None
        self._logged_at = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rill-cluster-mirror")

    def track(self, generation: Generation) -> None:
        """GenerationRegistry.on_start: mirror this answer from its first event on."""
        generation.mirror = self._queue

    async def announced(self, generation: Generation) -> None:
        """Until other processes can find the answer (its hash is in Redis), so a reader
        sent elsewhere right after the 201 finds it; bounded, since the answer streams
        here whatever Redis does."""
        if generation.id in self._announced or generation.mirror is None or not generation.launched:
            return
        if self._failing_since is not None:
            return  # Redis is down: no wait (other processes answer 503 until it is back)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(generation.id, []).append(waiter)
        try:
            async with asyncio.timeout(ANNOUNCE_WAIT):
                await waiter
        except TimeoutError:
            log.warning("generation %s: not yet known to other processes (Redis is slow or down)", generation.id)
            waiters = self._waiting.get(generation.id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiting.pop(generation.id, None)

    async def flush(self) -> None:
        """Until everything queued so far is written, or Redis is failing (shutdown)."""
        while (self._pending or self._writing) and self._failing_since is None:
            self._idle.clear()
            self._wake.set()
            await self._idle.wait()

    async def close(self) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self.flush()  # the answers ended by the shutdown: their last events
        except TimeoutError:
            log.warning("shutdown: the last events of %d answers were not written to Redis", len(self._pending))
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    # --- the writer ------------------------------------------------------------------

    def _queue(self, generation: Generation, event_id: int, wire: bytes) -> None:
        pending = self._pending.get(generation)
        if pending is None:
            pending = self._pending[generation] = []
            self._mirrored[generation.id] = generation
            self._wake.set()
        pending.append((event_id, wire))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST
        flushed = -math.inf
        while True:
            await self._wake.wait()
            if (wait := flushed + self._write_interval - loop.time()) > 0:
                await asyncio.sleep(wait)  # what comes meanwhile goes in the same write
            flushed = loop.time()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            if not batch:
                self._idle.set()
                continue
            self._writing = True
            try:
                if self._resync:
                    batch = await self._resynced(batch)
                await self._write(batch)
            except (RedisError, OSError) as error:
                # Kept, ahead of what came meanwhile. What did land is not doubled by
                # the next try: an entry id Redis has is refused, and readers skip the
                # events of an entry they already have.
                for generation, events in self._pending.items():
                    batch.setdefault(generation, []).extend(events)
                self._pending = batch
                self._failed(error)
                self._idle.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()
                continue
            finally:
                self._writing = False
            delay = RETRY_FIRST
            if self._failing_since is not None:
                log.info("Redis is back: answers are shared again (%.1f s)", time.monotonic() - self._failing_since)
                self._failing_since = None
            if not self._pending:
                self._idle.set()

    async def _write(self, batch: Batch) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._append_events(pipe, batch)
            announcing, ended = self._about_answers(pipe, batch)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, NoScriptError):
                self._append_sha = None  # Redis restarted: loaded again on the next try
            if isinstance(result, Exception):
                raise result
        for gid in announcing:
            self._announced.add(gid)
            for waiter in self._waiting.pop(gid, ()):
                if not waiter.done():
                    waiter.set_result(None)
        for gid in ended:
            self._announced.discard(gid)
            self._mirrored.pop(gid, None)

    async def _append_events(self, pipe: Any, batch: Batch) -> None:
        """Queues the script calls that append every answer's new events."""
        answers = [(generation, events) for generation, events in batch.items() if events]
        for start in range(0, len(answers), WRITE_ANSWERS):
            parts: list[bytes] = []
            for generation, events in answers[start : start + WRITE_ANSWERS]:
                gid = generation.id.encode()
                terminal = generation.terminal
                # The answer's new events in one entry (a long catch-up after an outage,
                # in a few); readers skip the events they have, should an entry repeat some.
                for first in range(0, len(events), ENTRY_EVENTS):
                    chunk = events[first : first + ENTRY_EVENTS]
                    last = chunk[-1][0]
                    run = chunk[0][1] if len(chunk) == 1 else b"".join(wire for _, wire in chunk)
                    ends = terminal is not None and last == terminal.id
                    parts += (b"%s %d %d %d\n" % (gid, last, ends, len(run)), run)
            self._sequence += 1  # every try a new one: a reader sees a lost write as a gap
            if self._append_sha is None:
                self._append_sha = str(await self.redis.script_load(APPEND))
            pipe.evalsha(
                self._append_sha,
                1,
                self._feed,
                names.entry_id(self._sequence),
                FEED_LENGTH,
                FEED_TTL_MS,
                names.events_key(""),
                b"".join(parts),
            )

    def _about_answers(
        self, pipe: Any, batch: dict[Generation, list[tuple[int, bytes]]]
    ) -> tuple[list[str], list[str]]:
        """Queues the hash of each answer new to Redis and the ending of each that ended:
        (those announced, those ended)."""
        announcing: list[str] = []
        ended: list[str] = []
        for generation, events in batch.items():
            gid = generation.id
            events_key, answer_key = names.events_key(gid), names.answer_key(gid)
            terminal = generation.terminal
            if gid not in self._announced:
                pipe.hset(answer_key, mapping=self._about(generation))
                pipe.expire(answer_key, self._live_ttl)
                pipe.expire(events_key, self._live_ttl)
                announcing.append(gid)
            if terminal is not None and (not events or events[-1][0] >= terminal.id):
                end: dict[str, Any] = {"end": terminal.id}
                if generation.usage is not None:
                    end["usage"] = json.dumps(generation.usage)
                pipe.hset(answer_key, mapping=end)
                if self._ended is not None:
                    self._ended(pipe, generation)
                pipe.expire(events_key, self._finished_ttl)
                pipe.expire(answer_key, self._finished_ttl)
                ended.append(gid)
        return announcing, ended

    async def _resynced(
        self, batch: dict[Generation, list[tuple[int, bytes]]]
    ) -> dict[Generation, list[tuple[int, bytes]]]:
        """After Redis failed, what it holds of each mirrored answer may be behind (a
        write lost with the connection) or gone (a restart without persistence): each
        answer's events from Redis's last one on, from the generation's own buffer, and
        its hash again. Readers elsewhere then see a whole answer."""
        generations = list(self._mirrored.values())
        async with self.redis.pipeline(transaction=False) as pipe:
            for generation in generations:
                pipe.xrevrange(names.events_key(generation.id), count=1)
            found = await pipe.execute()
        resynced = dict(batch)
        for generation, last_entries in zip(generations, found, strict=True):
            last = names.event_id(last_entries[0][0]) if last_entries else 0
            self._announced.discard(generation.id)  # its hash and expiries written again too
            resynced[generation] = generation.wire_events_after(last)
        self._resync = False
        log.info("Redis: %d answers written again after the outage", len(generations))
        return resynced

    def _about(self, generation: Generation) -> dict[str, Any]:
        return {
            "process": self.process,
            "owner": generation.owner or "",
            "client": generation.client_key,
            "fingerprint": generation.fingerprint or "",
            "model": generation.request.model.id,
            "created": round(generation.created_at, 3),
        }

    def _failed(self, error: BaseException) -> None:
        self._resync = True
        for waiters in self._waiting.values():  # their requests go on without Redis
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiting.clear()
        if sum(len(events) for events in self._pending.values()) > MAX_PENDING_EVENTS:
            for generation in self._pending:
                generation.mirror = None
                self._announced.discard(generation.id)
                self._mirrored.pop(generation.id, None)
            log.error("Redis down too long: %d answers are no longer shared with other processes", len(self._pending))
            self._pending = {}
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._logged_at >= ERROR_LOG_EVERY:
            self._logged_at = now
            log.error(
                "Redis write failed (%s: %s): answers stream on here; other processes cannot follow them for now",
                type(error).__name__,
                " ".join(str(error).split())[:200],
            )
