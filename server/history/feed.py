"""Each owner's changes (conversations added, renamed, deleted, answered) as numbered
events, kept in memory so an open page can follow them and resume after a drop.

One bounded ring per owner: ids are `<boot>.<n>`, n counting that owner's events only,
so an id says nothing about anyone else's activity. A reader whose id is from another
boot, or older than the ring, gets `reset` (refetch the list) instead of a gap.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.jsoncodec import dumps
from server.relay.generation import Subscriber

# Per owner: the events a reconnecting page may still ask for. A message event carries its
# whole text, so the ring is bounded in bytes as well as in events.
KEEP_EVENTS = 512
KEEP_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FeedEvent:
    number: int
    wire: bytes  # the event as it goes on the stream


@dataclass(slots=True)
class _Owner:
    events: deque[FeedEvent]
    subscribers: set[Subscriber]
    last: int = 0  # the number of the newest event
    size: int = 0  # bytes in `events`


class ChangeFeed:
    def __init__(self, *, keep_events: int = KEEP_EVENTS, keep_bytes: int = KEEP_BYTES) -> None:
        self.boot = secrets.token_hex(4)  # ids from an earlier process are told apart
        self._keep_events = keep_events
        self._keep_bytes = keep_bytes
        self._owners: dict[str, _Owner] = {}
        self.closed = False
        # Shared mode: told of each change made here, for the other processes' feeds.
        self.on_publish: Callable[[str, str, Mapping[str, Any]], None] | None = None

    def _owner(self, owner: str) -> _Owner:
        state = self._owners.get(owner)
        if state is None:
            state = self._owners[owner] = _Owner(deque(), set())
        return state

    def event_id(self, number: int) -> str:
        return f"{self.boot}.{number}"

    def publish(self, owner: str, name: str, data: Mapping[str, Any]) -> None:
        """Records one change of `owner`'s and wakes their open streams; cheap and sync."""
        self.publish_here(owner, name, data)
        if self.on_publish is not None:
            self.on_publish(owner, name, data)

    def publish_here(self, owner: str, name: str, data: Mapping[str, Any]) -> None:
        """publish() of a change another process made (shared mode): its streams here
        hear of it; ids stay this process's own (a page moving to another process
        refetches the list, as after a restart)."""
        state = self._owner(owner)
        state.last += 1
        wire = encode(self.event_id(state.last), name, data)
        state.events.append(FeedEvent(state.last, wire))
        state.size += len(wire)
        while state.events and (len(state.events) > self._keep_events or state.size > self._keep_bytes):
            state.size -= len(state.events.popleft().wire)
        for subscriber in state.subscribers:
            subscriber.notify()

    def latest(self, owner: str) -> int:
        state = self._owners.get(owner)
        return 0 if state is None else state.last

    def parse_id(self, owner: str, raw: str) -> int | None:
        """The event number a Last-Event-ID names, or None when it is not one this process
        gave this owner (another boot, a made-up number)."""
        boot, dot, number = raw.partition(".")
        if boot != self.boot or not dot or not (number.isascii() and number.isdigit()) or len(number) > 12:
            return None
        value = int(number)
        return value if value <= self.latest(owner) else None

    def after(self, owner: str, number: int) -> list[FeedEvent] | None:
        """The events after `number`; None when some of them are no longer kept."""
        state = self._owners.get(owner)
        if state is None or number >= state.last:
            return []
        events = state.events
        if not events or events[0].number > number + 1:
            return None
        skip = number + 1 - events[0].number
        return [events[i] for i in range(skip, len(events))]

    def subscribe(self, owner: str) -> Subscriber:
        subscriber = Subscriber()
        if self.closed:
            subscriber.gone = True
        self._owner(owner).subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, owner: str, subscriber: Subscriber) -> None:
        state = self._owners.get(owner)
        if state is not None:
            state.subscribers.discard(subscriber)

    def close(self) -> None:
        """At shutdown: every open stream ends (the page reconnects to the next process)."""
        self.closed = True
        for state in self._owners.values():
            for subscriber in state.subscribers:
                subscriber.mark_gone()


def encode(event_id: str, name: str, data: Mapping[str, Any]) -> bytes:
    # JSON escapes line breaks, so the data is one line, as aiohttp-sse would frame it.
    return b"id: %s\r\nevent: %s\r\ndata: %s\r\n\r\n" % (event_id.encode(), name.encode(), dumps(data))
