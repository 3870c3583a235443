"""The history's writer: an answer of a stored conversation is written into its message
as it streams, a batch at a time, and its ending with the reason and usage.

Nothing happens per token. One task writes for every answer: every `save_interval` s it
reads what each generation has buffered since its last write and writes all of them in
one transaction (one statement per table); an answer that ends is written within
END_GATHER s, together with any others ending then. A write that fails because the
database is down, locked or full is retried with backoff, each retry taking the latest
text, until it lands: the text stays in memory meanwhile (the generation's buffer holds
it anyway) and the answers keep streaming to their readers whatever the database does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from server.access.budget import DailyBudget
from server.config import Config
from server.history.titles import TitleMaker
from server.relay.generation import FINISH_CANCELLED, SHUTDOWN_ERROR, Event, Generation
from server.store import AnswerWrite, Saved, Store, StoreUnavailable
from server.store.shapes import text_bytes

log = logging.getLogger(__name__)

RETRY_FIRST = 0.5  # seconds before the first retry of a failed write; doubles each time
RETRY_MAX = 10.0
CLOSE_TIMEOUT = 5.0  # what close() gives the last writes at shutdown
WRITE_TIMEOUT = 20.0
END_GATHER = 0.05  # an ended answer waits this long for others ending at once: one write

# The finish reasons with a status of their own; any other (tool_calls, an unknown one)
# is a complete answer: done, its reason kept.
_STATUS_BY_FINISH = {"stop": "done", FINISH_CANCELLED: "stopped", "length": "length", "content_filter": "filtered"}
# Errors that are no failure of the answer itself.
_STATUS_BY_ERROR = {"abandoned": "abandoned", str(SHUTDOWN_ERROR["code"]): "interrupted"}


class Publisher(Protocol):
    """The owner's change feed (server/history/feed.py)."""

    def publish(self, owner: str, name: str, data: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Ending:
    status: str
    finish_reason: str | None
    error: dict[str, Any] | None


def ending_of(terminal: Event) -> Ending:
    """How an answer that ended with `terminal` is stored."""
    data = json.loads(terminal.data)
    if terminal.name == "done":
        reason = str(data.get("finish_reason") or "stop")
        return Ending(_STATUS_BY_FINISH.get(reason, "done"), reason, None)
    code = str(data.get("code") or "internal_error")
    error = {"code": code, "message": str(data.get("message") or ""), "retryable": bool(data.get("retryable"))}
    return Ending(_STATUS_BY_ERROR.get(code, "error"), None, error)


class _Answer:
    """One answer being written down: where it goes, what is read of it, what landed."""

    __slots__ = (
        "content",
        "conversation",
        "final",
        "generation",
        "keys",
        "message",
        "owner",
        "read_upto",
        "reasoning",
        "saved",
        "saved_bytes",
        "saved_upto",
        "unsaved",
    )

    def __init__(
        self,
        generation: Generation,
        owner: str,
        conversation: str,
        message: Mapping[str, Any],
        keys: tuple[int, int] | None,
    ) -> None:
        self.generation = generation
        self.owner = owner
        self.conversation = conversation
        self.message = str(message["id"])
        # What is read so far: a continued answer starts with its earlier text.
        self.content = str(message["content"])
        self.reasoning = str(message["reasoning"])
        self.read_upto = 0  # the generation's event id up to which content/reasoning are read
        self.unsaved = False  # text read since the last write that landed
        self.saved = True  # whether the last write landed (the feed hears of changes)
        self.saved_upto = 0  # the event id the last write that landed had read up to
        self.saved_bytes = text_bytes(self.content, self.reasoning)
        self.keys = keys  # the store's row keys (conversation, message), once known
        self.final = False  # the ending is written

    def read(self) -> None:
        """Takes the text buffered since the last read."""
        generation = self.generation
        last = generation.last_event_id
        if last == self.read_upto:
            return
        content, reasoning = generation.texts_after(self.read_upto)
        self.read_upto = last
        if content or reasoning:
            self.content += content
            self.reasoning += reasoning
            self.unsaved = True

    def write(self) -> AnswerWrite:
        write = AnswerWrite(
            owner=self.owner,
            conversation=self.conversation,
            message=self.message,
            content=self.content,
            reasoning=self.reasoning,
            last_event_id=self.read_upto,
            saved_bytes=self.saved_bytes,
            keys=self.keys,
        )
        terminal = self.generation.terminal
        if terminal is not None:
            end = ending_of(terminal)
            write.status, write.finish_reason, write.error = end.status, end.finish_reason, end.error
            write.usage = self.generation.usage
        return write


class AnswerKeeper:
    """Writes the answers of stored conversations into their messages (AppKey ANSWERS)."""

    def __init__(
        self,
        config: Config,
        feed: Publisher,
        budget: DailyBudget,
        session: Callable[[], aiohttp.ClientSession],
        *,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        storage = config.storage
        self._interval = storage.save_interval
        self._keep_unread = storage.keep_unread
        self._feed = feed
        self._session = session  # the app's, for titles (it opens after the store)
        self._titles = TitleMaker(config, budget, feed) if storage.auto_titles else None
        self._retry_first = retry_first
        self._retry_max = retry_max
        self._close_timeout = close_timeout
        self._store: Store | None = None
        self._answers: dict[str, _Answer] = {}  # by generation id
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # an answer has ended, or Rill is stopping
        self._closed = asyncio.Event()  # set by close(): a backoff wait ends early
        self._closing = False

    async def open(self, store: Store) -> None:
        """At start-up, once the store is open: answers that were streaming when the last
        process died are marked interrupted (their text up to the last write is kept)."""
        self._store = store
        if count := await store.mark_interrupted():
            log.warning("%d answers were cut off by the last stop: marked interrupted, their text kept", count)
        self._task = asyncio.create_task(self._run(store), name="answer-writer")

    def __len__(self) -> int:
        return len(self._answers)

    def track(
        self,
        generation: Generation,
        *,
        owner: str,
        conversation: str,
        message: Mapping[str, Any],
        keys: tuple[int, int] | None = None,
    ) -> None:
        """Writes `generation`'s answer into the stored answer `message` from now to its
        end. A continued answer's text so far (the message's content) comes first. `keys`:
        its conversation's and its own row keys when known (spares the first write a lookup)."""
        if generation.id in self._answers:
            return  # the same request again (client_id): already written down
        if self._closing or self._task is None:
            log.warning("answer %s started while the writer is stopped: not written down", message["id"])
            return
        generation.keep_unread = self._keep_unread  # the history reads it, to the end
        self._answers[generation.id] = _Answer(generation, owner, conversation, message, keys)
        generation.end_callbacks.append(self._ended)
        if generation.terminal is not None:
            self._ended(generation)

    def _ended(self, _generation: Generation) -> None:
        self._wake.set()

    async def close(self) -> None:
        """At shutdown (after the live answers have been ended): one last attempt at every
        write still pending, within close_timeout; what could not be saved is logged."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        if self._titles is not None:
            self._titles.cancel()
        task = self._task
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=self._close_timeout)
            if pending:
                task.cancel()
                await asyncio.wait(pending)
        for answer in self._answers.values():
            if answer.unsaved or (answer.generation.terminal is not None and not answer.final):
                log.error(
                    "answer %s of conversation %s: not saved at shutdown, the database did not take it: "
                    "events %d to %d are lost",
                    answer.message,
                    answer.conversation,
                    answer.saved_upto + 1,
                    answer.generation.last_event_id,
                )
        self._answers.clear()

    # --- the writer ------------------------------------------------------------------

    async def _run(self, store: Store) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self._interval
        delay = self._retry_first
        failing = False
        while True:
            if not self._closing:
                wait = next_tick - loop.time()
                # While failing, only the backoff (or close) ends the wait: endings wait too.
                woken = self._closed if failing else self._wake
                if wait > 0:
                    try:
                        async with asyncio.timeout(wait):
                            await woken.wait()
                    except TimeoutError:
                        pass
                    else:
                        if not self._closing:
                            await asyncio.sleep(END_GATHER)  # others ending at once join this write
            self._wake.clear()
            closing = self._closing
            tick = closing or loop.time() >= next_tick
            if tick:
                next_tick = loop.time() + self._interval
            batch = self._collect(everything=tick)
            if batch:
                try:
                    async with asyncio.timeout(WRITE_TIMEOUT):  # a write that hangs is retried too
                        saved = await store.save_answers([write for _, write in batch])
                except Exception as exc:
                    if not isinstance(exc, StoreUnavailable):
                        # Not a known outage (a driver error the store does not translate):
                        # the text is still kept and retried, never dropped.
                        log.exception("answer writer: the write failed unexpectedly; retrying")
                    self._failed(batch, exc)
                    if closing:
                        return  # close() logs what is lost
                    failing = True
                    next_tick = loop.time() + delay
                    delay = min(delay * 2, self._retry_max)
                    continue
                failing = False
                delay = self._retry_first
                self._landed(batch, saved)
            if closing:
                return

    def _collect(self, *, everything: bool) -> list[tuple[_Answer, AnswerWrite]]:
        """The answers to write now: every ended one, and at a tick every one with new text."""
        batch = []
        for answer in self._answers.values():
            ended = answer.generation.terminal is not None
            if not (ended or everything):
                continue
            answer.read()
            if answer.unsaved or (ended and not answer.final):
                batch.append((answer, answer.write()))
        return batch

    def _failed(self, batch: list[tuple[_Answer, AnswerWrite]], exc: Exception) -> None:
        for answer, _ in batch:
            if answer.saved:
                answer.saved = False
                log.warning(
                    "answer %s of conversation %s: not saved (%s), retrying",
                    answer.message,
                    answer.conversation,
                    type(exc).__name__,
                )
                self._publish_saved(answer)

    def _landed(self, batch: list[tuple[_Answer, AnswerWrite]], saved: Saved) -> None:
        gone = {id(write) for write in saved.gone}
        for answer, write in batch:
            if id(write) in gone:
                # The conversation was deleted meanwhile: nothing to write into any more.
                log.info("answer %s of conversation %s: deleted while streaming", answer.message, answer.conversation)
                self._answers.pop(answer.generation.id, None)
                continue
            answer.keys = write.keys
            answer.saved_upto = write.last_event_id
            answer.saved_bytes = write.bytes
            answer.unsaved = answer.read_upto != write.last_event_id
            if not answer.saved:
                answer.saved = True
                log.info("answer %s of conversation %s: saved again", answer.message, answer.conversation)
                self._publish_saved(answer)
            if write.status != "streaming":
                answer.final = True
                self._answers.pop(answer.generation.id, None)
                self._announce(answer, write, saved)

    def _publish_saved(self, answer: _Answer) -> None:
        self._feed.publish(
            answer.owner,
            "saved",
            {
                "conversation": answer.conversation,
                "message": answer.message,
                "last_event_id": answer.read_upto,
                "saved": answer.saved,
            },
        )

    def _announce(self, answer: _Answer, write: AnswerWrite, saved: Saved) -> None:
        """The ended answer as stored goes on the feed (`message`, then `conversation`), and
        an untitled conversation gets its automatic title."""
        assert write.keys is not None
        stored = saved.messages.get(write.keys[1])
        summary = saved.summaries.get(write.keys[0])
        if stored is None or summary is None:
            return
        self._feed.publish(answer.owner, "message", {"conversation": answer.conversation, "message": stored})
        self._feed.publish(answer.owner, "conversation", summary)
        if (
            self._titles is not None
            and self._store is not None
            and stored["status"] == "done"
            and not summary["title"]
            and summary["title_source"] is None
            and not self._closing
        ):
            self._titles.request(
                self._session(),
                self._store,
                answer.generation,
                owner=answer.owner,
                conversation=answer.conversation,
                message=answer.message,
                answer=str(stored["content"]),
            )
