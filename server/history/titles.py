"""Automatic titles: once the first answer of an untitled conversation is done, one small
request to the same model names it. Counted in the daily budget; a failure only logs
(the conversation stays untitled)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp

from server.access.budget import DailyBudget, prompt_tokens_estimate
from server.config import Config, ModelConfig, ProviderConfig
from server.http.errors import ApiError
from server.relay.generation import Generation
from server.relay.upstream import ChatRequest, UpstreamError, stream_chat
from server.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

TITLE_MAX_TOKENS = 24
TITLE_MAX_CHARS = 60
# What of the first question and answer the model is shown: enough to tell the topic.
EXCERPT_CHARS = 1500

_INSTRUCTION_EN = (
    "Write a short title (at most 6 words) for the conversation below, in the language of the user's "
    "message. Reply with the title only: no quotes, no final full stop."
)
_INSTRUCTION_ZH = "为下面的对话写一个简短的标题（不超过12个字）。只回答标题本身，不要引号，不要句号。"
# Han characters with no kana: the conversation is in Chinese.
_HAN = re.compile(r"[\u4e00-\u9fff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_LABEL = re.compile(r"^\s*(title|标题|標題)\s*[:：]\s*", re.IGNORECASE)
_WRAPPING = " \t\"'`*#“”‘’「」『』《》【】"


class Publisher(Protocol):
    def publish(self, owner: str, name: str, data: dict[str, Any]) -> None: ...


def instruction_for(text: str) -> str:
    return _INSTRUCTION_ZH if _HAN.search(text) and not _KANA.search(text) else _INSTRUCTION_EN


def clean_title(text: str) -> str:
    """The model's reply as a title: its first line with words, no label, quotes or
    markup around it, at most TITLE_MAX_CHARS characters; "" when nothing is left."""
    for line in text.splitlines():
        line = "".join(ch if ch.isprintable() else " " if ch.isspace() else "" for ch in line)
        line = _LABEL.sub("", line.strip(_WRAPPING)).strip(_WRAPPING).rstrip("。.").strip(_WRAPPING)
        line = " ".join(line.split())
        if not line:
            continue
        if len(line) > TITLE_MAX_CHARS:
            cut = line[:TITLE_MAX_CHARS]
            space = cut.rfind(" ")
            line = (cut[:space] if space > TITLE_MAX_CHARS // 2 else cut).rstrip(" ,;:，；：")
        return line
    return ""


class _Collect:
    """A ChatSink that keeps the reply's text and usage (reasoning is dropped)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.pieces = 0
        self.usage: Mapping[str, Any] | None = None

    def on_reasoning(self, text: str) -> None:
        self.pieces += 1

    def on_content(self, text: str) -> None:
        self.pieces += 1
        self.text.append(text)

    def on_usage(self, usage: Mapping[str, Any]) -> None:
        self.usage = usage

    def on_finish(self, finish_reason: str) -> None:
        pass


class TitleMaker:
    def __init__(self, config: Config, budget: DailyBudget, feed: Publisher) -> None:
        self._config = config
        self._budget = budget
        self._feed = feed
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}  # (owner, conversation) -> its request

    def request(
        self,
        session: aiohttp.ClientSession,
        store: Store,
        generation: Generation,
        *,
        owner: str,
        conversation: str,
        message: str,
        answer: str,
    ) -> None:
        """Names the conversation in the background (one request at a time per conversation)
        from the answer `message` and its question."""
        key = (owner, conversation)
        if key in self._running:
            return
        model = (generation.request.provider, generation.request.model)
        task = asyncio.create_task(
            self._name(session, store, model, generation.owner, owner, conversation, message, answer),
            name=f"title-{conversation}",
        )
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    def cancel(self) -> None:
        for task in self._running.values():
            task.cancel()

    async def _name(
        self,
        session: aiohttp.ClientSession,
        store: Store,
        model: tuple[ProviderConfig, ModelConfig],
        principal: str | None,
        owner: str,
        conversation: str,
        message: str,
        answer: str,
    ) -> None:
        try:
            path = await store.path(owner, conversation, message)
        except (StoreUnavailable, ApiError):
            log.info("conversation %s: no automatic title, its question could not be read", conversation)
            return
        question = str(path[-2]["content"]) if len(path) >= 2 else ""
        instruction = instruction_for(question + answer)
        chat = ChatRequest(
            provider=model[0],
            model=model[1],
            messages=(
                {"role": "system", "content": instruction},
                {"role": "user", "content": question[:EXCERPT_CHARS]},
                {"role": "assistant", "content": answer[:EXCERPT_CHARS]},
                {"role": "user", "content": instruction},
            ),
            max_tokens=TITLE_MAX_TOKENS,
        )
        budget = self._budget
        hold_id = f"title-{uuid.uuid4().hex}"
        if principal is not None and budget.enabled:
            try:
                chat = await budget.reserve(principal, chat, TITLE_MAX_TOKENS, hold_id)
            except ApiError:
                log.info("conversation %s: no automatic title, the token's budget is used up", conversation)
                return
        sink = _Collect()
        try:
            await stream_chat(session, chat, sink, self._config)
        except UpstreamError as exc:
            log.info("conversation %s: no automatic title: %s", conversation, exc.code)
        except Exception:  # a background nicety: whatever went wrong, only logged
            log.exception("conversation %s: the automatic title failed", conversation)
        finally:
            budget.settle(hold_id, principal, _tokens(chat, sink))
        title = clean_title("".join(sink.text))
        if not title:
            log.info("conversation %s: no automatic title, the model's reply had none", conversation)
            return
        try:
            current = await store.get_conversation(owner, conversation)
            if current is None or current["title"] or current["title_source"] is not None:
                return  # deleted, or the user named it meanwhile
            summary = await store.update_conversation(owner, conversation, {"title": title, "title_source": "auto"})
        except StoreUnavailable:
            log.info("conversation %s: automatic title not saved: the database is unavailable", conversation)
            return
        if summary is not None:
            log.info("conversation %s: automatic title saved", conversation)
            self._feed.publish(owner, "conversation", summary)


def _tokens(chat: ChatRequest, sink: _Collect) -> int:
    """What the title request used: the provider's count, or an estimate when it said none
    (nothing when no answer came at all: a refused request is not billed)."""
    total = (sink.usage or {}).get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    return prompt_tokens_estimate(chat.messages) + sink.pieces if sink.pieces else 0
