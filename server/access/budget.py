"""The optional daily token budget per access token. The ledger survives restarts
when Rill has a state directory (systemd's StateDirectory= gives it one)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from server.http.errors import ApiError
from server.ops.state import load_state, save_state
from server.relay.generation import Generation
from server.relay.upstream import ChatRequest

log = logging.getLogger(__name__)

LEDGER_FILE = "usage.json"
# A generous guess of tokens per UTF-8 byte: English runs about 4 bytes a token and
# Chinese about 3, so a third over-counts English rather than under-count Chinese.
_BYTES_PER_TOKEN = 3


def prompt_tokens_estimate(messages: Sequence[Mapping[str, str]]) -> int:
    return math.ceil(
        sum(len(m.get("content", "").encode("utf-8", "surrogatepass")) for m in messages) / _BYTES_PER_TOKEN
    )


def tokens_used(generation: Generation) -> int:
    """What the provider billed for a generation, or an estimate when it never said
    (a Stop or a cut stream ends before the usage chunk)."""
    usage = generation.usage or {}
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    return prompt_tokens_estimate(generation.request.messages) + generation.tokens  # a piece of text each


def capped(chat: ChatRequest, ceiling: int, answer: int) -> ChatRequest:
    """The request with its answer capped at `answer` tokens when that is less than asked."""
    return replace(chat, max_tokens=answer) if answer < (chat.max_tokens or ceiling) else chat


def _exhausted(message: str, retry_after: int) -> ApiError:
    return ApiError(429, "budget_exhausted", message, headers={"Retry-After": str(retry_after)})


class SharedLedger(Protocol):
    """Shared mode's ledger (server/cluster/budget.py): the same budget over every process."""

    async def reserve(
        self, budget: DailyBudget, name: str, chat: ChatRequest, ceiling: int, hold_id: str
    ) -> ChatRequest:
        """plan() and hold() in one atomic step over every process."""

    def release(self, hold_id: str, name: str) -> None: ...

    def charge(self, hold_id: str, name: str, tokens: int) -> None:
        """The hold goes and `tokens` are charged."""


class DailyBudget:
    """Model tokens (prompt + answer) each access token may use per UTC day."""

    def __init__(
        self, limit: int, state_dir: Path | None, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.limit = limit  # 0: no budget
        self._path = state_dir / LEDGER_FILE if state_dir is not None else None
        self._clock = clock
        self._day = ""
        self._used: dict[str, int] = {}
        # What answers still running may cost: their prompt plus their max_tokens.
        self._holds: dict[str, tuple[str, int]] = {}  # generation id -> (token name, tokens)
        self.shared: SharedLedger | None = None  # shared mode: the ledger lives in Redis
        if self.enabled:
            self._load()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def remaining(self, name: str) -> int:
        self._roll()
        return max(0, self.limit - self._used.get(name, 0))

    def used(self, name: str) -> int:
        self._roll()
        return self._used.get(name, 0)

    def seconds_to_reset(self) -> int:
        now = self._clock()
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
        return max(1, math.ceil((midnight - now).total_seconds()))

    def held(self, name: str) -> int:
        return sum(tokens for holder, tokens in self._holds.values() if holder == name)

    @property
    def day(self) -> str:
        return self._clock().date().isoformat()

    async def reserve(self, name: str, chat: ChatRequest, ceiling: int, hold_id: str) -> ChatRequest:
        """The request capped to what is left of today's budget, that much held under
        `hold_id` until release() or its charge (ApiError 429 when nothing is left)."""
        if self.shared is not None:
            return await self.shared.reserve(self, name, chat, ceiling, hold_id)
        chat, tokens = self.plan(name, chat, ceiling)
        self.hold(hold_id, name, tokens)
        return chat

    def plan(self, name: str, chat: ChatRequest, ceiling: int) -> tuple[ChatRequest, int]:
        """The request capped to what is left of today's budget, and what to hold for it.

        What is left counts the answers still running at their worst (prompt + max_tokens),
        so answers started together cannot pass the budget either."""
        spent_left = self.remaining(name)
        left = spent_left - self.held(name)
        prompt = prompt_tokens_estimate(chat.messages)
        if left - prompt >= 1:
            answer = min(chat.max_tokens or ceiling, left - prompt)
            return capped(chat, ceiling, answer), prompt + answer
        raise self.refusal(spent_left, prompt)

    def refusal_unavailable(self) -> ApiError:
        """Shared mode with Redis unreachable: spending is not left unchecked."""
        return ApiError(
            503,
            "budget_unavailable",
            "The daily token budget cannot be checked right now. Try again in a moment.",
            headers={"Retry-After": "2"},
        )

    def refusal(self, spent_left: int, prompt: int) -> ApiError:
        """Why an answer of a `prompt`-token request cannot start with `spent_left` tokens
        left today (the answers running may hold the rest)."""
        reset = self.seconds_to_reset()
        when = f"00:00 UTC, in {reset // 3600} h {reset % 3600 // 60} min"
        if spent_left <= 0:
            return _exhausted(
                f"This access token has used its {self.limit} tokens for today. The budget renews at {when}.", reset
            )
        if spent_left - prompt >= 1:
            return _exhausted(
                "The answers this access token has running may use the rest of today's budget. "
                "Wait for one to finish, or stop one.",
                5,
            )
        return _exhausted(
            f"This conversation needs about {prompt} tokens, more than the {spent_left} left of today's budget. "
            f"Start a shorter one, or wait until {when}.",
            reset,
        )

    def hold(self, generation_id: str, name: str, tokens: int) -> None:
        self._holds[generation_id] = (name, tokens)

    def release(self, hold_id: str, name: str | None = None) -> None:
        """A hold whose request never ran: nothing to charge."""
        self._holds.pop(hold_id, None)
        if self.shared is not None and name is not None:
            self.shared.release(hold_id, name)

    def generation_ended(self, generation: Generation) -> None:
        if self.enabled and generation.owner is not None:
            self.settle(generation.id, generation.owner, tokens_used(generation))
        else:
            self._holds.pop(generation.id, None)

    def settle(self, hold_id: str, name: str | None, tokens: int) -> None:
        """A request has ended (an answer, an automatic title): its hold goes, what it
        used is charged."""
        self._holds.pop(hold_id, None)
        if not self.enabled or name is None:
            return
        if self.shared is not None:
            self.shared.charge(hold_id, name, tokens)
        else:
            self.charge(name, tokens)

    def charge(self, name: str, tokens: int) -> None:
        self._roll()
        self._used[name] = self._used.get(name, 0) + tokens
        self._save()

    def _roll(self) -> None:
        day = self._clock().date().isoformat()
        if day != self._day:
            self._day, self._used = day, {}

    def _load(self) -> None:
        ledger = load_state(self._path, _parse_ledger)
        if ledger is None:
            return
        self._day, self._used = ledger
        self._roll()  # a ledger from an earlier day counts for nothing

    def _save(self) -> None:
        save_state(self._path, {"day": self._day, "used": self._used})


def _parse_ledger(ledger: Any) -> tuple[str, dict[str, int]]:
    day, used = ledger["day"], ledger["used"]
    valid = isinstance(used, dict) and all(isinstance(k, str) and type(v) is int for k, v in used.items())
    if not isinstance(day, str) or not valid:
        raise ValueError("not a day and the tokens used per access token")
    return day, dict(used)
