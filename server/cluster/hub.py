"""Every answer this process's readers follow from other processes, read by one task with
one blocking XREAD over all their streams: a round trip per batch of new events for all
of them, not one per reader per token. New events go to each follower's buffer and its
reader is woken, as a generation wakes its local readers.

Once a second the hub also tells each answer's owner that a reader here still follows it
(so it is not abandoned as unread), and ends an answer whose owner is gone: a follower
that has caught up and hears nothing gets a `worker_lost` ending, which the hub appends
to the answer's stream so every reader, here or elsewhere, ends the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from server.relay.generation import Subscriber, wire_bytes

from . import names
from .names import Entries
from .remote import RemoteAnswer

log = logging.getLogger(__name__)


BLOCK_MS = 250  # longest blocking read: how soon a new follower's answer joins the read
# Seconds between two reads that found events at least: each read then brings the events
# of several of the owners' writes (mirror.FLUSH_EVERY), for a few ms more of latency.
READ_EVERY = 0.005
READ_COUNT = 1000  # entries per stream per read
HOUSEKEEPING_EVERY = 1.0  # seconds between "still reading" and owner checks (at most)
RETRY_SECONDS = 0.5  # after a failed read

WORKER_LOST = {
    "code": "worker_lost",
    "message": "The Rill process streaming this answer stopped. The text so far is kept; try again.",
    "retryable": True,
}


class Follower:
    """One reader's place in an answer of another process."""

    __slots__ = ("answer", "complete", "cursor", "failed", "pending", "push", "quiet", "subscriber")

    def __init__(self, answer: RemoteAnswer, cursor: int, subscriber: Subscriber) -> None:
        self.answer = answer
        self.cursor = cursor  # the last event id taken
        self.subscriber = subscriber
        self.pending: list[bytes] = []  # events taken, not yet written to the client
        self.complete = False  # the answer's last event is taken
        self.failed = False  # Redis failed: the reader ends, its client resumes (elsewhere)
        self.quiet = 0  # housekeeping rounds in a row with nothing new
        # While its reader waits with nothing pending: writes to its client at once if
        # that cannot block (OpenStream.write_now), as a generation pushes to local
        # readers; the reader's task is woken only when that fails, or at the end.
        self.push: Callable[[bytes], bool] | None = None

    def take(self, entries: Entries) -> None:
        taken: list[bytes] = []
        for _, fields in entries:
            events, terminal = names.events_in(fields, self.cursor)
            for event_id, wire in events:
                taken.append(wire)
                self.cursor = event_id
            self.complete = self.complete or terminal
        if not entries:
            return
        self.quiet = 0
        if taken and not self.pending and not self.complete and self._pushed(b"".join(taken)):
            return  # written: nothing for the reader's task to do
        self.pending += taken
        self.subscriber.notify()

    def _pushed(self, data: bytes) -> bool:
        push = self.push
        if push is None:
            return False
        try:
            return push(data)
        except (OSError, RuntimeError):
            # This runs in the hub's task: one reader's broken connection must not end the
            # reads for everyone. Its own task meets the error on its next write.
            return False

    def fail(self) -> None:
        self.failed = True
        self.subscriber.notify()


class RemoteHub:
    def __init__(self, redis: Redis, finished_ttl: float, resume_grace: float) -> None:
        self._redis = redis
        self._finished_ttl = max(1, round(finished_ttl))
        # Said well within the owner's grace (the processes of a cluster share a config).
        self._housekeeping_every = min(HOUSEKEEPING_EVERY, resume_grace / 3)
        self._followers: dict[str, set[Follower]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rill-cluster-hub")

    async def close(self) -> None:
        self.end_all()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    def end_all(self) -> None:
        """At shutdown: every reader here ends (its client resumes on another process)."""
        for followers in self._followers.values():
            for follower in followers:
                follower.fail()

    async def follow(self, answer: RemoteAnswer, after: int, subscriber: Subscriber) -> Follower:
        """A follower of `answer` from event `after`, given what Redis already holds at
        once (raises RedisError/OSError), then fed by the hub's reads."""
        follower = Follower(answer, after, subscriber)
        key = names.events_key(answer.id)
        while True:  # catch up now rather than at the hub's next read
            found = cast(
                list[tuple[bytes, Entries]],
                await self._redis.xread({key: names.entry_id(follower.cursor)}, count=READ_COUNT),
            )
            if not found or not found[0][1]:
                break
            follower.take(found[0][1])
            if follower.complete or len(found[0][1]) < READ_COUNT:
                break
        self._followers.setdefault(answer.id, set()).add(follower)
        self._wake.set()
        # The owner hears at once that its answer is read here: a reader that came through
        # another process must not find it abandoned for want of a local one.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.publish(names.control_channel(answer.process), names.READING + answer.id.encode())
        return follower

    def unfollow(self, follower: Follower) -> None:
        followers = self._followers.get(follower.answer.id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._followers[follower.answer.id]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        housekept = loop.time()
        while True:
            if not self._followers:
                self._wake.clear()
                await self._wake.wait()
            streams = {
                names.events_key(gid): names.entry_id(min(f.cursor for f in followers))
                for gid, followers in self._followers.items()
            }
            try:
                found = cast(
                    list[tuple[bytes, Entries]],
                    await self._redis.xread(streams, count=READ_COUNT, block=BLOCK_MS),  # type: ignore[arg-type]
                )
            except (RedisError, OSError) as error:
                log.warning(
                    "Redis: reading other processes' answers failed (%s); their readers resume", type(error).__name__
                )
                self.end_all()
                await asyncio.sleep(RETRY_SECONDS)
                continue
            prefix = len(names.events_key(""))
            for key, entries in found or ():
                for follower in tuple(self._followers.get(key.decode()[prefix:], ())):
                    follower.take(entries)
            if found:
                await asyncio.sleep(READ_EVERY)
            if loop.time() - housekept >= self._housekeeping_every:
                housekept = loop.time()
                await self._housekeeping()

    async def _housekeeping(self) -> None:
        """Tells each owner its answers are read here; ends those whose owner is gone."""
        answers = {gid: next(iter(followers)).answer for gid, followers in self._followers.items() if followers}
        if not answers:
            return
        processes = sorted({answer.process for answer in answers.values()})
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for gid, answer in answers.items():
                    pipe.publish(names.control_channel(answer.process), names.READING + gid.encode())
                for process in processes:
                    pipe.exists(names.process_key(process))
                results = await pipe.execute()
        except (RedisError, OSError):
            return  # the next read meets the trouble
        alive = dict(zip(processes, (bool(r) for r in results[len(answers) :]), strict=True))
        for gid, answer in answers.items():
            followers = self._followers.get(gid, set())
            caught_up = all(f.quiet >= 1 for f in followers)
            for follower in followers:
                follower.quiet += 1
            if not alive[answer.process] and caught_up and not any(f.complete for f in followers):
                await self._end_for_lost_owner(answer, max(f.cursor for f in followers))

    async def _end_for_lost_owner(self, answer: RemoteAnswer, last: int) -> None:
        """Appends a retryable `worker_lost` error after the last event, as the owner would
        have appended its terminal event. If an event came meanwhile, its id is taken and
        nothing is appended: the next read gets that event."""
        event_id = last + 1
        wire = wire_bytes(event_id, "error", json.dumps(WORKER_LOST, separators=(",", ":")))
        events_key, answer_key = names.events_key(answer.id), names.answer_key(answer.id)
        try:
            await self._redis.xadd(
                events_key,
                names.entry([(event_id, wire)], terminal=True),  # type: ignore[arg-type]
                id=names.entry_id(event_id),
            )
        except ResponseError:
            return  # not the last event any more
        except (RedisError, OSError):
            return
        log.warning("generation %s: its process %s is gone; ended with worker_lost", answer.id, answer.process)
        with contextlib.suppress(RedisError, OSError):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(answer_key, "end", event_id)
                pipe.expire(answer_key, self._finished_ttl)
                pipe.expire(events_key, self._finished_ttl)
                await pipe.execute()
