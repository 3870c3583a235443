"""Every answer this process's readers follow from other processes, read by one task with
one blocking XREAD over their owners' feeds (names.FEED_ENDED): a round trip per write of
each owner, for all of its answers, not a read per answer, nor one per reader per token.
New events go to each follower's buffer and its reader is woken, as a generation wakes
its local readers; a follower that joins, or finds it missed something (a feed entry
lost with an owner's failed write, or trimmed before this process read it), catches up
from the answer's own stream.

Once a second the hub also tells each owner which of its answers are read here (so they
are not abandoned as unread), and ends an answer whose owner is gone: a follower that
has caught up and hears nothing gets a `worker_lost` ending, which the hub appends to
the answer's stream so every reader, here or elsewhere, ends the same way."""

from __future__ import annotations

import asyncio
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
# Seconds between two reads that found events of some of the owners followed, not all:
# the next read then brings the others' next writes too (each owner writes at most every
# [cluster] write_interval), for a few ms more of latency. With one owner, reads follow its
# writes.
READ_EVERY = 0.002
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

    __slots__ = (
        "answer",
        "backlog",
        "complete",
        "cursor",
        "failed",
        "pending",
        "push",
        "quiet",
        "stale",
        "subscriber",
    )

    def __init__(self, answer: RemoteAnswer, cursor: int, subscriber: Subscriber) -> None:
        self.answer = answer
        self.cursor = cursor  # the last event id taken
        self.subscriber = subscriber
        self.pending: list[bytes] = []  # events taken, not yet written to the client
        self.complete = False  # the answer's last event is taken
        self.failed = False  # Redis failed: the reader ends, its client resumes (elsewhere)
        self.quiet = 0  # housekeeping rounds in a row with nothing new
        # While it catches up from the answer's stream: what the feed brought meanwhile,
        # taken after that (what the stream already gave is skipped then).
        self.backlog: list[tuple[bytes, bool]] | None = None
        self.stale = False  # events are missing before what the feed brings: catch up
        # While its reader waits with nothing pending: writes to its client at once if
        # that cannot block (OpenStream.write_now), as a generation pushes to local
        # readers; the reader's task is woken only when that fails, or at the end.
        self.push: Callable[[bytes], bool] | None = None

    def take(self, run: bytes, terminal: bool) -> None:
        """A run of the answer's events from its owner's feed (names.split), the last of
        the answer if `terminal`; the events it has already are skipped."""
        if self.backlog is not None:
            self.backlog.append((run, terminal))
        elif not self.stale:
            first = names.first_id(run) if run else 0
            if first > self.cursor + 1:
                self.stale = True  # events are missing: the hub catches it up
            else:
                self._take(run, first, terminal)

    def take_entries(self, entries: Entries) -> None:
        """Entries of the answer's own stream (all of its events, in order)."""
        for _, fields in entries:
            run = fields.get(names.WIRE_FIELD, b"")
            self._take(run, names.first_id(run) if run else 0, names.TERMINAL_FIELD in fields)

    def _take(self, run: bytes, first: int, terminal: bool) -> None:
        """`first`: the run's first event id (parsed once by the caller)."""
        if run and first <= self.cursor:
            run = names.after(run, self.cursor)
        if not run and (not terminal or self.complete):
            return
        self.quiet = 0
        self.complete = self.complete or terminal
        if run:
            self.cursor = names.last_id(run)
            if not self.pending and not self.complete and self._pushed(run):
                return  # written: nothing for the reader's task to do
            self.pending.append(run)
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
        # Each owner followed here: the last of its feed's entries read (0: none yet),
        # and how many of its answers are followed.
        self._feeds: dict[str, int] = {}
        self._followed: dict[str, int] = {}
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
        followers = self._followers.setdefault(answer.id, set())
        if not followers:
            self._followed[answer.process] = self._followed.get(answer.process, 0) + 1
        followers.add(follower)
        try:
            # The owner hears at once that its answer is read here: a reader that came
            # through another process must not find it abandoned for want of a local one.
            await self._catch_up(follower, tell_owner=True)
        except BaseException:
            self.unfollow(follower)
            raise
        return follower

    def unfollow(self, follower: Follower) -> None:
        gid, process = follower.answer.id, follower.answer.process
        followers = self._followers.get(gid)
        if followers is None or follower not in followers:
            return
        followers.discard(follower)
        if followers:
            return
        del self._followers[gid]
        self._followed[process] -= 1
        if not self._followed[process]:
            del self._followed[process]
            self._feeds.pop(process, None)

    async def _catch_up(self, follower: Follower, *, tell_owner: bool = False) -> None:
        """Gives the follower what the answer's stream holds after its cursor. The owner's
        feed position is taken in the same transaction: the feed, read from there on (or
        from earlier), brings whatever the stream gets afterwards."""
        process = follower.answer.process
        events_key, feed_key = names.events_key(follower.answer.id), names.feed_key(process)
        while True:
            follower.backlog = []  # what the hub reads meanwhile, taken after the stream's
            follower.stale = False
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.xrevrange(feed_key, count=1)
                    pipe.xread({events_key: names.entry_id(follower.cursor)}, count=READ_COUNT)
                    if tell_owner:
                        reading = names.READING + follower.answer.id.encode()
                        pipe.publish(names.control_channel(process), reading)
                        tell_owner = False
                    feed_last, found, *_ = await pipe.execute()
                if follower.answer.id in self._followers:
                    feed_at = names.event_id(feed_last[0][0]) if feed_last else 0
                    # The earlier of two positions: a feed entry read twice is skipped.
                    self._feeds[process] = min(self._feeds.get(process, feed_at), feed_at)
                    self._wake.set()
                while found and found[0][1]:
                    entries = cast(Entries, found[0][1])
                    follower.take_entries(entries)
                    if follower.complete or len(entries) < READ_COUNT:
                        break
                    found = await self._redis.xread({events_key: names.entry_id(follower.cursor)}, count=READ_COUNT)
            finally:
                backlog, follower.backlog = follower.backlog or [], None
            for run, terminal in backlog:
                follower.take(run, terminal)
            if not follower.stale:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        housekept = loop.time()
        while True:
            if not self._feeds:
                self._wake.clear()
                await self._wake.wait()
                continue
            read_from = dict(self._feeds)
            feeds = {names.feed_key(process): names.entry_id(at) for process, at in read_from.items()}
            try:
                found = cast(
                    list[tuple[bytes, Entries]],
                    await self._redis.xread(feeds, count=READ_COUNT, block=BLOCK_MS),  # type: ignore[arg-type]
                )
                for key, entries in found or ():
                    process = key.decode()[len(names.feed_key("")) :]
                    await self._took(process, read_from[process], entries)
            except (RedisError, OSError) as error:
                log.warning(
                    "Redis: reading other processes' answers failed (%s); their readers resume", type(error).__name__
                )
                self.end_all()
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if found and len(found) < len(feeds):
                await asyncio.sleep(READ_EVERY)  # the other owners' next writes too, in one read
            if loop.time() - housekept >= self._housekeeping_every:
                housekept = loop.time()
                await self._housekeeping()

    async def _took(self, process: str, read_from: int, entries: Entries) -> None:
        """Gives each follower its answer's runs from entries of the owner's feed, read
        from entry `read_from` on."""
        at = self._feeds.get(process)
        if at is None or not entries:
            return  # nobody follows its answers any more
        first, last = names.event_id(entries[0][0]), names.event_id(entries[-1][0])
        # A follower's catch-up during the read may have set an earlier position: kept,
        # so the next read goes back there (its follower skips what it has).
        self._feeds[process] = min(at, last) if at < read_from else last
        if read_from and first != read_from + 1:
            # Writes missing from the feed (a failed write, or trimmed before this read):
            # every follower of this owner catches up from its answer's stream instead.
            log.info("Redis: %d writes of process %s missed; its answers read again", first - read_from - 1, process)
            await self._catch_up_all(lambda follower: follower.answer.process == process)
            return
        followed = self._followers
        stale = False
        for _, fields in entries:
            ended = fields.get(names.FEED_ENDED)
            ended_ids = set(ended.split()) if ended else ()
            for name, run in fields.items():
                followers = followed.get(name.decode()) if name != names.FEED_ENDED else None
                if followers:
                    terminal = name in ended_ids
                    for follower in tuple(followers):
                        follower.take(run, terminal)
                        stale = stale or follower.stale
        if stale:
            await self._catch_up_all(lambda follower: follower.stale)

    async def _catch_up_all(self, which: Callable[[Follower], bool]) -> None:
        for followers in tuple(self._followers.values()):
            for follower in tuple(followers):
                if which(follower) and not follower.complete:
                    await self._catch_up(follower)

    async def _housekeeping(self) -> None:
        """Tells each owner which of its answers are read here; ends those whose owner is
        gone."""
        answers = {gid: next(iter(followers)).answer for gid, followers in self._followers.items() if followers}
        if not answers:
            return
        by_owner: dict[str, list[bytes]] = {}
        for gid, answer in answers.items():
            by_owner.setdefault(answer.process, []).append(gid.encode())
        processes = sorted(by_owner)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for process in processes:
                    pipe.publish(names.control_channel(process), names.READING + b" ".join(by_owner[process]))
                for process in processes:
                    pipe.exists(names.process_key(process))
                results = await pipe.execute()
        except (RedisError, OSError):
            return  # the next read meets the trouble
        alive = dict(zip(processes, (bool(r) for r in results[len(processes) :]), strict=True))
        for gid, answer in answers.items():
            followers = self._followers.get(gid, set())
            caught_up = all(f.quiet >= 1 for f in followers)
            for follower in followers:
                follower.quiet += 1
            if not alive[answer.process] and caught_up and not any(f.complete for f in followers):
                await self._end_for_lost_owner(answer)

    async def _end_for_lost_owner(self, answer: RemoteAnswer) -> None:
        """Appends a retryable `worker_lost` error after the last event, as the owner would
        have appended its terminal event, and gives it to the answer's followers here. If
        an event came meanwhile, or another process appended the ending first, its id is
        taken and nothing is appended: the followers get what the stream holds."""
        try:
            await self._catch_up_all(lambda follower: follower.answer.id == answer.id)
            followers = self._followers.get(answer.id, set())
            if not followers or any(f.complete or f.quiet == 0 for f in followers):
                return  # the owner's last writes were not all read yet
            event_id = max(f.cursor for f in followers) + 1
            wire = wire_bytes(event_id, "error", json.dumps(WORKER_LOST, separators=(",", ":")))
            events_key, answer_key = names.events_key(answer.id), names.answer_key(answer.id)
            try:
                await self._redis.xadd(
                    events_key,
                    names.entry([(event_id, wire)], terminal=True),  # type: ignore[arg-type]
                    id=names.entry_id(event_id),
                )
            except ResponseError:
                pass  # not the last event any more: the catch-up below gets what is
            else:
                log.warning("generation %s: its process %s is gone; ended with worker_lost", answer.id, answer.process)
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hset(answer_key, "end", event_id)
                    pipe.expire(answer_key, self._finished_ttl)
                    pipe.expire(events_key, self._finished_ttl)
                    await pipe.execute()
            await self._catch_up_all(lambda follower: follower.answer.id == answer.id)
        except (RedisError, OSError):
            return  # the next read meets the trouble
