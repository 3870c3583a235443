"""The daily token budget over every process: what each access token used today, and
what its answers still running may use, in Redis. Planning an answer and holding its
worst case is one script (atomic), so answers started at once on different processes
cannot pass the budget together; a hold of a process that is gone stops counting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.access.budget import DailyBudget, capped, prompt_tokens_estimate
from server.relay.upstream import ChatRequest

from . import names

log = logging.getLogger(__name__)

DAY_TTL = 2 * 86400  # a day's ledger outlives the day, for whoever still reads it late

RESERVE = """
local used_key, holds_key = KEYS[1], KEYS[2]
local name, limit, prompt, wanted = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local hold_id, process, process_prefix, ttl = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local spent_left = limit - tonumber(redis.call('HGET', used_key, name) or '0')
local left = spent_left
local holds = redis.call('HGETALL', holds_key)
for i = 1, #holds, 2 do
  local owner, tokens = string.match(holds[i + 1], '^(.*)|(%d+)$')
  if owner and redis.call('EXISTS', process_prefix .. owner) == 1 then
    left = left - tonumber(tokens)
  else
    redis.call('HDEL', holds_key, holds[i])
  end
end
if left - prompt >= 1 then
  local answer = math.min(wanted, left - prompt)
  redis.call('HSET', holds_key, hold_id, process .. '|' .. (prompt + answer))
  redis.call('EXPIRE', holds_key, ttl)
  return {0, answer, spent_left}
end
return {1, 0, spent_left}
"""


def used_key(day: str) -> str:
    return f"{names.PREFIX}budget:{day}"


def holds_key(name: str) -> str:
    return f"{names.PREFIX}budget-holds:{name}"


class SharedBudget:
    """budget.SharedLedger in Redis."""

    def __init__(self, redis: Redis, process: str, budget: DailyBudget, hold_seconds: int) -> None:
        self._redis = redis
        self._process = process
        self._budget = budget
        self._hold_seconds = hold_seconds
        self._reserve = redis.register_script(RESERVE)
        self._writing: set[asyncio.Task[None]] = set()

    async def reserve(
        self, budget: DailyBudget, name: str, chat: ChatRequest, ceiling: int, hold_id: str
    ) -> ChatRequest:
        prompt = prompt_tokens_estimate(chat.messages)
        wanted = chat.max_tokens or ceiling
        args: list[str | int] = [
            name,
            budget.limit,
            prompt,
            wanted,
            hold_id,
            self._process,
            names.process_key(""),
            self._hold_seconds,
        ]
        try:
            found = await self._reserve(keys=[used_key(budget.day), holds_key(name)], args=args)
        except (RedisError, OSError) as error:
            # Spending must not go unchecked: refused, retryable, until Redis is back.
            log.warning("Redis: the daily budget cannot be checked (%s)", type(error).__name__)
            raise budget.refusal_unavailable() from None
        verdict, answer, spent_left = (int(value) for value in cast(list[int], found))
        if verdict != 0:
            raise budget.refusal(spent_left, prompt)
        return capped(chat, ceiling, answer)

    def release(self, hold_id: str, name: str) -> None:
        self._later(self._write(hold_id, name, 0))

    def charge(self, hold_id: str, name: str, tokens: int) -> None:
        self._later(self._write(hold_id, name, tokens))

    async def flush(self) -> None:
        """Until the charges and releases made so far are written (or 2 s have passed)."""
        if self._writing:
            await asyncio.wait(self._writing, timeout=2.0)

    async def _write(self, hold_id: str, name: str, tokens: int) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if tokens:
                    key = used_key(self._budget.day)
                    pipe.hincrby(key, name, tokens)
                    pipe.expire(key, DAY_TTL)
                pipe.hdel(holds_key(name), hold_id)
                await pipe.execute()
        except (RedisError, OSError) as error:
            # The hold goes with this process anyway; the tokens are not charged.
            reason = type(error).__name__
            log.error("Redis: %d tokens of access token %s could not be charged (%s)", tokens, name, reason)

    def _later(self, write: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(write)
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
