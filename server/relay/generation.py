"""A generation: one upstream request, the buffer of its events, and its subscribers.

The buffer is the single source of truth. Each subscriber keeps only a cursor into
it, so a slow reader costs no memory and never holds up the upstream or other
readers, and a reconnecting client resumes from any event id without a second
request to the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from json.encoder import encode_basestring as _encode_string
from json.encoder import encode_basestring_ascii as _encode_string_ascii
from typing import Any

import aiohttp

from server.config import Config
from server.relay.upstream import ChatRequest, UpstreamError, stream_chat

log = logging.getLogger(__name__)

# What a buffered event costs beyond its stored bytes: its start offset (4 bytes) and a
# share of the buffer's growth room.
EVENT_OVERHEAD_BYTES = 5

# How an event is stored, told by its first byte. Nearly all are pieces of text, kept as
# their text's JSON string literal only (a third of their wire bytes): a delta's as it is
# (`"`), a reasoning piece's after an `r`. Any other event is kept as its wire bytes (`i`).
_QUOTE = ord('"')
_REASONING_MARK = ord("r")
# Text events as aiohttp-sse's send(data, id=, event=) frames them (see wire_bytes).
_DELTA_WIRE = b'id: %d\r\nevent: delta\r\ndata: {"text":%b}\r\n\r\n'
_REASONING_WIRE = b'id: %d\r\nevent: reasoning\r\ndata: {"text":%b}\r\n\r\n'

# The buffer is deflated a piece at a time as it fills, and its last piece when the answer
# ends: text shrinks 2-3x for ~5-10 us per KB, once; a reader catching up inflates only
# the pieces it needs, ~2 us per KB. Raw deflate with a window of a piece and a small
# state: setting up zlib's default one costs more than compressing a piece.
_PIECE_BYTES = 4096
_DEFLATE_WBITS = -12


def _deflate(data: bytes | bytearray) -> bytes:
    deflate = zlib.compressobj(1, zlib.DEFLATED, _DEFLATE_WBITS, 5)
    return deflate.compress(data) + deflate.flush()


def _inflate(data: bytes) -> bytes:
    return zlib.decompress(data, _DEFLATE_WBITS)


FINISH_CANCELLED = "cancelled"
SHUTDOWN_ERROR: Mapping[str, Any] = {
    "code": "server_shutdown",
    "message": "Rill is shutting down or restarting. Try again in a moment.",
    "retryable": True,
}


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    name: str
    data: str  # JSON text, one line: JSON escapes every line break


def _json(value: Mapping[str, Any]) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (an upstream may split an emoji's escaped pair across two
        # chunks) cannot be UTF-8: escaped, the JSON still holds exactly the same text.
        text = json.dumps(value, separators=(",", ":"))
    return text


# What of the upstream's usage object is passed on: counts, by short names, one level of
# detail (DeepSeek's prompt_tokens_details). Anything else an upstream sends there (text,
# deep or huge objects) is not ours to relay to every reader and keep for resumes.
_USAGE_MAX_FIELDS = 32
_USAGE_NAME_MAX = 64


def usage_figures(usage: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, value in usage.items():
        if len(figures) >= _USAGE_MAX_FIELDS:
            break
        if not isinstance(name, str) or not 0 < len(name) <= _USAGE_NAME_MAX:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            figures[name] = value
        elif isinstance(value, Mapping) and depth == 0 and (detail := usage_figures(value, depth + 1)):
            figures[name] = detail
    return figures


def wire_bytes(event_id: int, name: str, data: str) -> bytes:
    """The event as aiohttp-sse's send(data, id=, event=) frames it: id, event, one data
    line (the JSON has no line break), blank line. Built once, written to every reader."""
    return f"id: {event_id}\r\nevent: {name}\r\ndata: {data}\r\n\r\n".encode()


def event_from_wire(event_id: int, wire: bytes) -> Event:
    _, _, rest = wire.partition(b"\r\nevent: ")
    name, _, rest = rest.partition(b"\r\ndata: ")
    return Event(event_id, name.decode(), rest[:-4].decode())


def _joined(literals: list[bytes | bytearray]) -> str:
    """The texts of JSON string literals, joined."""
    if not literals:
        return ""
    texts: list[str] = json.loads(b"[" + b",".join(literals) + b"]")
    return "".join(texts)


# Writes the next event (its id, its wire bytes) to a reader straight away if it can
# do so without waiting; False when it cannot (the reader's task must then be woken).
Push = Callable[[int, bytes], bool]


class Subscriber:
    """A reader of a generation; woken whenever something happens that it must act on.

    Cheaper than an asyncio.Event per reader: one future, made only while it waits.
    The reader checks for work before it waits and nothing runs in between, so a
    notification is never missed. While it waits it may offer a `push`: new events
    then go to its client from the generation's own task, with no wake-up at all.
    """

    __slots__ = ("_loop", "_waiter", "gone", "heartbeat_due", "push")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self.push: Push | None = None
        self.gone = False  # the client's connection is closed
        self.heartbeat_due = False

    def notify(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, push: Push | None = None) -> None:
        """Until the next notify() (the caller has checked that nothing is pending)."""
        waiter = self._waiter = self._loop.create_future()
        self.push = push
        try:
            await waiter
        finally:
            self._waiter = None
            self.push = None

    def mark_gone(self) -> None:
        self.gone = True
        self.notify()

    def request_heartbeat(self) -> None:
        self.heartbeat_due = True
        self.notify()


class Generation:
    """Owns the upstream request; every piece of the answer becomes a numbered Event."""

    def __init__(
        self,
        *,
        generation_id: str,
        request: ChatRequest,
        config: Config,
        client_key: str,
        client_id: str | None,
        fingerprint: str,
        on_end: Callable[[Generation], None],
        owner: str | None = None,
        keep_unread: bool = False,
    ) -> None:
        self.id = generation_id
        self.request = request
        self.client_key = client_key
        self.owner = owner  # the access token's name; only its holder may follow or stop it
        self.client_id = client_id
        self.fingerprint = fingerprint
        self.created_at = time.time()
        self.ended_at: float | None = None  # loop time
        self.started_at: float | None = None  # loop time of the upstream request
        self.first_token_after: float | None = None  # seconds from started_at to the first token
        # Every event back to back (a bytes object per event would cost ~45 bytes more
        # each): deflated pieces, then the piece being filled (None once the answer has
        # ended), and where event id i + 1 starts in their plain bytes.
        self._pieces: list[bytes] = []
        self._piece_starts = array("I")
        self._deflated_bytes = 0
        self._buffer: bytearray | None = bytearray()
        self._buffer_start = 0
        self._starts = array("I")
        self.tokens = 0  # delta and reasoning events
        self.terminal: Event | None = None
        self.usage: dict[str, Any] | None = None
        self.subscribers: set[Subscriber] = set()
        # Runs to its end with no reader (an answer the history writes down is read by
        # the history itself); Stop, max_tokens and the budget still bound it.
        self.keep_unread = keep_unread
        self._config = config
        self._on_end = on_end
        # Told once the answer has ended, after the registry (the history's writer).
        self.end_callbacks: list[Callable[[Generation], None]] = []
        # Shared mode: told every event's id and wire bytes as it is buffered (the copy
        # in Redis that other processes read, server/cluster/mirror.py).
        self.mirror: Callable[[Generation, int, bytes], None] | None = None
        # Shared mode: when a reader on another process last said it reads (loop time).
        self.read_elsewhere_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    # --- lifecycle ---------------------------------------------------------------

    def start(self, session: aiohttp.ClientSession) -> None:
        provider, model = self.request.provider, self.request.model
        self._append(
            "meta",
            {
                "generation": self.id,
                "model": model.id,
                "label": model.label,
                "provider": provider.name,
                "demo": provider.demo,
                "reasoning": model.reasoning,
                "created": round(self.created_at, 3),
            },
        )
        self.started_at = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(session), name=f"generation-{self.id}")
        self._task.add_done_callback(self._upstream_closed)
        self._arm_grace_timer()  # nobody subscribed yet: the grace period starts now

    @property
    def launched(self) -> bool:
        return self.started_at is not None

    def _upstream_closed(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            try:
                task.result()
            except asyncio.CancelledError as exc:
                # The task keeps this exception; its traceback keeps stream_chat's frame,
                # whose asyncio.timeout keeps the task: a cycle only a full collection
                # frees, every stopped or abandoned answer's upstream response and
                # buffers in it. Full collections are rare here (__main__): break it.
                exc.__traceback__ = None

    async def _run(self, session: aiohttp.ClientSession) -> None:
        try:
            finish_reason = await stream_chat(session, self.request, self, self._config)
        except UpstreamError as exc:
            # The frame that raised it may hold it (a retry loop's `error`), and it holds
            # that frame (its traceback): a cycle, with the upstream response in it.
            exc.__traceback__ = None
            log.info("generation %s failed upstream: %s (HTTP %s)", self.id, exc.code, exc.status or "-")
            if self.terminal is None:  # else complete already: only settling its connection failed
                data: dict[str, Any] = {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
                if exc.retry_after is not None:
                    data["retry_after"] = exc.retry_after  # the upstream's Retry-After: when a retry may work
                self._end("error", data)
        except asyncio.CancelledError:
            # stop() ends the generation before cancelling us; anything else cancelling
            # us (the loop closing) still leaves readers a truthful ending.
            if self.terminal is None:
                self._end("error", SHUTDOWN_ERROR)
            raise
        except Exception:
            log.exception("generation %s crashed", self.id)
            if self.terminal is None:
                self._end(
                    "error",
                    {"code": "internal_error", "message": "Something went wrong inside Rill.", "retryable": True},
                )
        else:
            self.on_finish(finish_reason)
        finally:
            # The conversation (up to the message limits) was needed to send the request
            # and, for the budget, when the answer ended: not for the minutes it is kept.
            self.request = replace(self.request, messages=())

    def stop(self) -> None:
        """The user pressed Stop: end with `cancelled` and close the upstream now."""
        if self.terminal is None:
            self._end("done", {"finish_reason": FINISH_CANCELLED})
        self.close_upstream()

    def fail(self, code: str, message: str, *, retryable: bool) -> None:
        """End with an error we decided on (shutdown, abandonment) and close the upstream."""
        if self.terminal is None:
            self._end("error", {"code": code, "message": message, "retryable": retryable})
        self.close_upstream()

    async def wait_closed(self) -> None:
        """Until the upstream request is closed (returns at once if it already is)."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    @property
    def live(self) -> bool:
        return self.terminal is None

    @property
    def upstream_open(self) -> bool:
        return self._task is not None and not self._task.done()

    def close_upstream(self) -> None:
        """Cancels the upstream request, or the wait for a finished body's last bytes."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _end(self, name: str, data: Mapping[str, Any]) -> None:
        if self.usage is not None:
            self._append("usage", self.usage)
        self.terminal = self._append(name, data)
        if self._buffer:
            self._seal()  # complete: kept only for resumes and late readers
        self._buffer = None
        for subscriber in self.subscribers:
            subscriber.notify()  # even those the terminal event was pushed to: they are done
        self.ended_at = asyncio.get_running_loop().time()
        self._disarm_grace_timer()
        log.info("generation %s ended: %s %s", self.id, name, data.get("finish_reason") or data.get("code"))
        self._on_end(self)
        for callback in self.end_callbacks:
            callback(self)

    # --- the upstream's sink --------------------------------------------------------

    def on_reasoning(self, text: str) -> None:
        self._append_text(text, reasoning=True)

    def on_content(self, text: str) -> None:
        self._append_text(text, reasoning=False)

    def on_finish(self, finish_reason: str) -> None:
        if self.terminal is None:
            self._end("done", {"finish_reason": finish_reason})

    def on_usage(self, usage: Mapping[str, Any]) -> None:
        self.usage = usage_figures(usage)  # the last figures win: some APIs repeat them per chunk

    # --- the buffer -------------------------------------------------------------------

    def _append(self, name: str, data: Mapping[str, Any]) -> Event:
        event = Event(len(self._starts) + 1, name, _json(data))
        wire = wire_bytes(event.id, name, event.data)
        self._push(wire, wire)
        return event

    def _append_text(self, text: str, *, reasoning: bool) -> None:
        """A piece of the answer: `_append(name, {"text": text})` for a fraction of the cost."""
        if self.terminal is not None:
            return  # stopped or failed meanwhile: the upstream's last bytes are dropped
        if self.first_token_after is None and self.started_at is not None:
            self.first_token_after = asyncio.get_running_loop().time() - self.started_at
        self.tokens += 1
        try:
            literal = _encode_string(text).encode()
        except UnicodeEncodeError:  # a lone surrogate: see _json
            literal = _encode_string_ascii(text).encode()
        # Caught-up readers get the wire bytes now; the buffer keeps only the literal.
        event_id = len(self._starts) + 1
        if reasoning:
            self._push(_REASONING_WIRE % (event_id, literal), b"r" + literal)
        else:
            self._push(_DELTA_WIRE % (event_id, literal), literal)

    def _push(self, wire: bytes, stored: bytes) -> None:
        buffer = self._buffer
        assert buffer is not None, "no event after the terminal one"
        self._starts.append(self._buffer_start + len(buffer))
        buffer += stored
        event_id = len(self._starts)
        for subscriber in self.subscribers:
            push = subscriber.push
            if push is None or not push(event_id, wire):
                subscriber.notify()
        if self.mirror is not None:
            self.mirror(self, event_id, wire)
        if len(buffer) >= _PIECE_BYTES:
            self._seal()

    def _seal(self) -> None:
        """Deflates the piece being filled and starts a new one."""
        buffer = self._buffer
        assert buffer is not None
        piece = _deflate(buffer)
        self._pieces.append(piece)
        self._piece_starts.append(self._buffer_start)
        self._buffer_start += len(buffer)
        self._deflated_bytes += len(piece)
        self._buffer = bytearray()

    @property
    def size_bytes(self) -> int:
        """The memory the buffer holds (the registry's cap counts it)."""
        plain = len(self._buffer) if self._buffer is not None else 0
        return self._deflated_bytes + plain + EVENT_OVERHEAD_BYTES * len(self._starts)

    def _plain_from(self, offset: int) -> tuple[int, bytes | bytearray]:
        """The events' plain bytes from the piece holding `offset` on, and where they start."""
        if offset >= self._buffer_start:
            return self._buffer_start, self._buffer or b""
        first = bisect_right(self._piece_starts, offset) - 1
        plain: list[bytes | bytearray] = [_inflate(piece) for piece in self._pieces[first:]]
        if self._buffer:
            plain.append(self._buffer)
        return self._piece_starts[first], b"".join(plain)

    def _wire(self, plain: bytes | bytearray, base: int, index: int) -> bytes:
        """The wire bytes of event id `index + 1`, rebuilt from plain bytes starting at `base`."""
        starts = self._starts
        end = starts[index + 1] - base if index + 1 < len(starts) else len(plain)
        start = starts[index] - base
        first = plain[start]
        if first == _QUOTE:
            return _DELTA_WIRE % (index + 1, plain[start:end])
        if first == _REASONING_MARK:
            return _REASONING_WIRE % (index + 1, plain[start + 1 : end])
        return bytes(plain[start:end])

    def wire_after(self, event_id: int) -> bytes:
        """The wire bytes of every event after `event_id`, in order, in one piece."""
        if event_id >= len(self._starts):
            return b""
        # ids are 1-based and contiguous: event id i + 1 is at index i
        base, plain = self._plain_from(self._starts[event_id])
        return b"".join([self._wire(plain, base, index) for index in range(event_id, len(self._starts))])

    def wire_events_after(self, event_id: int) -> list[tuple[int, bytes]]:
        """Each event after `event_id` as (its id, its wire bytes): what a reader got."""
        if event_id >= len(self._starts):
            return []
        base, plain = self._plain_from(self._starts[event_id])
        return [(index + 1, self._wire(plain, base, index)) for index in range(event_id, len(self._starts))]

    def events_after(self, event_id: int) -> list[Event]:
        if event_id >= len(self._starts):
            return []
        base, plain = self._plain_from(self._starts[event_id])
        indexes = range(event_id, len(self._starts))
        return [event_from_wire(index + 1, self._wire(plain, base, index)) for index in indexes]

    def texts_after(self, event_id: int) -> tuple[str, str]:
        """The answer's text and reasoning in the events after `event_id`: what the
        history's writer saves, read a batch at a time (one JSON decode per batch)."""
        starts = self._starts
        count = len(starts)
        if event_id >= count:
            return "", ""
        base, plain = self._plain_from(starts[event_id])
        content: list[bytes | bytearray] = []
        reasoning: list[bytes | bytearray] = []
        for index in range(event_id, count):
            start = starts[index] - base
            end = starts[index + 1] - base if index + 1 < count else len(plain)
            first = plain[start]
            if first == _QUOTE:
                content.append(plain[start:end])
            elif first == _REASONING_MARK:
                reasoning.append(plain[start + 1 : end])
        return _joined(content), _joined(reasoning)

    @property
    def events(self) -> list[Event]:
        return self.events_after(0)

    @property
    def last_event_id(self) -> int:
        return len(self._starts)

    # --- subscribers and the grace period ----------------------------------------------

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber()
        self.subscribers.add(subscriber)
        self._disarm_grace_timer()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        if not self.subscribers and self.terminal is None:
            self._arm_grace_timer()

    def _arm_grace_timer(self) -> None:
        self._disarm_grace_timer()
        if self.keep_unread:
            return
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self._config.stream.resume_grace, self._abandon)

    def _disarm_grace_timer(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def read_elsewhere(self) -> None:
        """A reader on another process follows this answer (it says so every second)."""
        self.read_elsewhere_at = asyncio.get_running_loop().time()

    def _abandon(self) -> None:
        self._grace_timer = None
        if self.subscribers or self.terminal is not None or self.keep_unread:
            return
        if self.read_elsewhere_at is not None:
            loop = asyncio.get_running_loop()
            quiet = loop.time() - self.read_elsewhere_at
            if quiet < self._config.stream.resume_grace:
                # Read through another process: abandoned only a full grace after that stops.
                self._grace_timer = loop.call_later(self._config.stream.resume_grace - quiet, self._abandon)
                return
        log.info("generation %s abandoned: no reader for %g s", self.id, self._config.stream.resume_grace)
        self.fail(
            "abandoned",
            f"Nobody was reading this answer for {self._config.stream.resume_grace:g} s, so Rill "
            "stopped it to save tokens. The text so far is kept.",
            retryable=True,
        )
