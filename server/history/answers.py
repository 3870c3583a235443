"""The history's writer: an answer of a stored conversation is written into its message
as it streams, a batch at a time, and its ending with the reason and usage.

Nothing happens per token. A timer per answer reads what the generation has buffered
since the last write (every `save_interval` s) and writes the whole text so far; the end
of the answer wakes it for the last write. A write that fails because the database is
down, locked or full is retried with backoff, each retry taking the latest text, until
it lands: the text stays in memory meanwhile (the generation's buffer holds it anyway)
and the answer keeps streaming to its readers whatever the database does.
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
from server.http.errors import ApiError
from server.relay.generation import FINISH_CANCELLED, SHUTDOWN_ERROR, Event, Generation
from server.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

RETRY_FIRST = 0.5  # seconds before the first retry of a failed write; doubles each time
RETRY_MAX = 10.0
CLOSE_TIMEOUT = 5.0  # what close() gives the last writes at shutdown

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
    """One answer being written down: where it goes and what has been read of it."""

    __slots__ = (
        "content",
        "conversation",
        "final",
        "generation",
        "message",
        "owner",
        "read_upto",
        "reasoning",
        "saved",
        "saved_upto",
        "wake",
    )

    def __init__(
        self, generation: Generation, owner: str, conversation: str, message: str, content: str, reasoning: str
    ) -> None:
        self.generation = generation
        self.owner = owner
        self.conversation = conversation
        self.message = message
        self.content = content  # what is read so far (a continued answer starts with its earlier text)
        self.reasoning = reasoning
        self.read_upto = 0  # the generation's event id up to which content/reasoning are read
        self.saved = True  # whether the last write landed (the feed hears of changes)
        self.saved_upto = 0  # the event id the last write that landed had read up to
        self.final = False  # the ending is written
        self.wake = asyncio.Event()  # the answer has ended, or Rill is stopping

    def read(self) -> bool:
        """Takes the text buffered since the last read; True when there was any event."""
        generation = self.generation
        last = generation.last_event_id
        if last == self.read_upto:
            return False
        content, reasoning = generation.texts_after(self.read_upto)
        self.read_upto = last
        if content:
            self.content += content
        if reasoning:
            self.reasoning += reasoning
        return True


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
        self._titles = TitleMaker(config, budget, feed) if storage.auto_titles else None
        self._retry_first = retry_first
        self._retry_max = retry_max
        self._close_timeout = close_timeout
        self._store: Store | None = None
        self._session = session  # the app's, for titles (it opens after the store)
        self._answers: dict[str, _Answer] = {}  # by generation id
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = asyncio.Event()  # set by close(): backoff waits end early

    async def open(self, store: Store) -> None:
        """At start-up, once the store is open: answers that were streaming when the last
        process died are marked interrupted (their text up to the last write is kept)."""
        self._store = store
        if count := await store.mark_interrupted():
            log.warning("%d answers were cut off by the last stop: marked interrupted, their text kept", count)

    def __len__(self) -> int:
        return len(self._answers)

    def track(self, generation: Generation, *, owner: str, conversation: str, message: Mapping[str, Any]) -> None:
        """Writes `generation`'s answer into the stored answer `message` from now to its end.
        A continued answer's text so far (its content) comes first."""
        if generation.id in self._answers:
            return  # the same request again (client_id): already written down
        if self._closing:
            log.warning("answer %s started during shutdown: not written down", message["id"])
            return
        generation.keep_unread = self._keep_unread  # the history reads it, to the end
        answer = _Answer(
            generation, owner, conversation, str(message["id"]), str(message["content"]), str(message["reasoning"])
        )
        self._answers[generation.id] = answer
        generation.end_callbacks.append(lambda _: answer.wake.set())
        if generation.terminal is not None:
            answer.wake.set()
        self._spawn(self._keep(answer), f"answer-{generation.id}")

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """At shutdown (after the live answers have been ended): one last attempt at every
        write still pending, within close_timeout; what could not be saved is logged."""
        self._closing = True
        self._closed.set()
        for answer in self._answers.values():
            answer.wake.set()
        if self._titles is not None:
            self._titles.cancel()
        tasks = set(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._close_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for answer in self._answers.values():
            log.error(
                "answer %s of conversation %s: not saved at shutdown, the database did not take it: "
                "events %d to %d are lost",
                answer.message,
                answer.conversation,
                answer.saved_upto + 1,
                answer.generation.last_event_id,
            )
        self._answers.clear()

    # --- one answer -------------------------------------------------------------------

    async def _keep(self, answer: _Answer) -> None:
        generation = answer.generation
        try:
            while not answer.final:
                if generation.terminal is None and not self._closing:
                    try:
                        async with asyncio.timeout(self._interval):
                            await answer.wake.wait()
                    except TimeoutError:
                        pass
                if (answer.read() or generation.terminal is not None) and not await self._write(answer):
                    return  # closing, and the database did not take it: close() logs what is lost
                if self._closing and generation.terminal is None:
                    break  # started after on_shutdown ended the live ones: written as far as it got
        except _Gone:
            self._answers.pop(generation.id, None)
            return
        self._answers.pop(generation.id, None)
        if answer.final:
            await self._announce(answer)

    async def _write(self, answer: _Answer) -> bool:
        """Writes the answer's latest state, retrying until it lands (True), or until a try
        made while closing fails (False). Raises _Gone when the message no longer exists."""
        assert self._store is not None
        delay = self._retry_first
        generation = answer.generation
        while True:
            answer.read()  # a retry writes the latest text: a later write supersedes an earlier one
            terminal = generation.terminal
            ending: dict[str, Any] = {}
            if terminal is not None:
                end = ending_of(terminal)
                ending = {
                    "status": end.status,
                    "finish_reason": end.finish_reason,
                    "error": end.error,
                    "usage": generation.usage,
                }
            last_try = self._closing
            try:
                await self._store.save_answer(
                    answer.owner,
                    answer.conversation,
                    answer.message,
                    content=answer.content,
                    reasoning=answer.reasoning,
                    last_event_id=answer.read_upto,
                    **ending,
                )
            except StoreUnavailable as exc:
                if answer.saved:
                    answer.saved = False
                    log.warning(
                        "answer %s of conversation %s: not saved (%s), retrying",
                        answer.message,
                        answer.conversation,
                        exc,
                    )
                    self._publish_saved(answer)
                if last_try:
                    return False  # close() logs it
                try:
                    async with asyncio.timeout(delay):
                        await self._closed.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, self._retry_max)
                continue
            except ApiError as exc:
                # The conversation or message was deleted meanwhile: nothing to write into.
                log.info("answer %s of conversation %s: not saved: %s", answer.message, answer.conversation, exc.code)
                raise _Gone from None
            if not answer.saved:
                answer.saved = True
                log.info("answer %s of conversation %s: saved again", answer.message, answer.conversation)
                self._publish_saved(answer)
            answer.saved_upto = answer.read_upto
            answer.final = terminal is not None
            return True

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

    async def _announce(self, answer: _Answer) -> None:
        """The ended answer as stored goes on the feed (`message`, then `conversation`), and
        an untitled conversation gets its automatic title."""
        assert self._store is not None
        try:
            conversation = await self._store.get_conversation(answer.owner, answer.conversation)
        except StoreUnavailable:
            log.info("answer %s saved; the database went away before it could be announced", answer.message)
            return
        if conversation is None:
            return
        messages: list[Mapping[str, Any]] = conversation["messages"]
        stored = next((m for m in messages if m["id"] == answer.message), None)
        if stored is None:
            return
        self._feed.publish(answer.owner, "message", {"conversation": answer.conversation, "message": dict(stored)})
        self._feed.publish(answer.owner, "conversation", summary_of(conversation))
        if (
            self._titles is not None
            and stored["status"] == "done"
            and not conversation["title"]
            and conversation["title_source"] is None
            and not self._closing
        ):
            question = next((m for m in messages if m["id"] == stored["parent"]), None)
            self._titles.request(
                self._session(),
                self._store,
                answer.generation,
                owner=answer.owner,
                conversation=answer.conversation,
                question=str(question["content"]) if question is not None else "",
                answer=str(stored["content"]),
            )


def summary_of(conversation: Mapping[str, Any]) -> dict[str, Any]:
    """A Conversation as its list Summary: without its messages, with `streaming`."""
    summary = {key: value for key, value in conversation.items() if key != "messages"}
    summary["streaming"] = any(m["status"] == "streaming" for m in conversation["messages"])
    return summary


class _Gone(Exception):
    """The answer's message no longer exists."""
