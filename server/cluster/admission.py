"""Limits and idempotency that hold across processes: a client's answers streaming at
once and started per minute, counted in Redis by one script each time (atomic, so
requests to different processes at the same moment cannot both slip under a limit),
and a client_id claimed once for every process (one upstream request however many
processes receive the retry).

An answer counts as streaming while its process lives: a process killed without a
word stops counting at once, since the script checks each member's process key."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from server.config import LimitsConfig

from . import names

log = logging.getLogger(__name__)

ADMIT = """
local live, recent = KEYS[1], KEYS[2]
local now, max_live, max_recent, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local member, process_prefix, ttl = ARGV[5], ARGV[6], tonumber(ARGV[7])
local streaming = 0
for _, other in ipairs(redis.call('SMEMBERS', live)) do
  local process = string.match(other, '^(.*)/')
  if process and redis.call('EXISTS', process_prefix .. process) == 1 then
    streaming = streaming + 1
  else
    redis.call('SREM', live, other)
  end
end
if streaming >= max_live then
  return {1, 0}
end
redis.call('ZREMRANGEBYSCORE', recent, '-inf', now - window)
if redis.call('ZCARD', recent) >= max_recent then
  local oldest = redis.call('ZRANGE', recent, 0, 0, 'WITHSCORES')
  return {2, math.ceil((tonumber(oldest[2]) + window - now) / 1000)}
end
redis.call('ZADD', recent, now, member)
redis.call('PEXPIRE', recent, window)
redis.call('SADD', live, member)
redis.call('EXPIRE', live, ttl)
return {0, 0}
"""

# A wrong access token: counted unless the client is already locked out. A right one:
# only asked whether the client is. Returns the seconds to wait (0: go on).
SIGN_IN = """
local key, now, limit, window = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local failed, member = ARGV[4], ARGV[5]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return math.max(1, math.ceil((tonumber(oldest[2]) + window - now) / 1000))
end
if failed == '1' then
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window)
end
return 0
"""

RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

ADMITTED, TOO_MANY, RATE_LIMITED = 0, 1, 2
WINDOW_MS = 60_000  # generations_per_minute's window


def live_key(client: str) -> str:
    return f"{names.PREFIX}live:{client}"


def recent_key(client: str) -> str:
    return f"{names.PREFIX}recent:{client}"


def failures_key(client: str) -> str:
    return f"{names.PREFIX}sign-in-failures:{client}"


def claim_key(client_id: str) -> str:
    return f"{names.PREFIX}client-id:{client_id}"


def member(process: str, generation_id: str) -> str:
    return f"{process}/{generation_id}"


@dataclass(frozen=True)
class Claim:
    """What a client_id was first used for, by whichever process got it first."""

    generation_id: str
    fingerprint: str
    model: str

    def encoded(self) -> str:
        return json.dumps({"g": self.generation_id, "f": self.fingerprint, "m": self.model})


class Admission:
    def __init__(self, redis: Redis, process: str, limits: LimitsConfig, hold_seconds: int) -> None:
        self._redis = redis
        self._process = process
        self._limits = limits
        self._hold_seconds = hold_seconds  # the longest an answer can run, and some
        self._admit = redis.register_script(ADMIT)
        self._sign_in = redis.register_script(SIGN_IN)
        self._release_claim = redis.register_script(RELEASE_CLAIM)

    async def admit(self, client: str, generation_id: str, now_ms: int) -> tuple[int, int]:
        """(ADMITTED, 0) and the answer counted; or (TOO_MANY, 0) or (RATE_LIMITED,
        seconds to wait) and nothing counted. Raises RedisError/OSError."""
        keys = [live_key(client), recent_key(client)]
        args: list[str | int] = [
            now_ms,
            self._limits.max_concurrent_per_client,
            self._limits.generations_per_minute,
            WINDOW_MS,
            member(self._process, generation_id),
            names.process_key(""),
            self._hold_seconds,
        ]
        verdict, wait = cast(list[int], await self._admit(keys=keys, args=args))
        return int(verdict), int(wait)

    async def sign_in(self, client: str, failed: bool, limit: int, now_ms: int) -> int:
        """Seconds the client must wait (0: none); a failure is counted unless it must.
        Raises RedisError/OSError."""
        args: list[str | int] = [now_ms, limit, WINDOW_MS, "1" if failed else "0", f"{now_ms}-{uuid.uuid4().hex}"]
        return int(cast(int, await self._sign_in(keys=[failures_key(client)], args=args)))

    def forget(self, pipe: Any, client: str, generation_id: str) -> None:
        """Adds to a pipeline: the answer no longer streams (it ended, or never ran)."""
        pipe.srem(live_key(client), member(self._process, generation_id))

    async def claim(self, client_id: str, claim: Claim) -> Claim | None:
        """None: the client_id is now this answer's, for every process; else what it was
        already claimed for. Raises RedisError/OSError."""
        key = claim_key(client_id)
        for _ in range(3):
            if await self._redis.set(key, claim.encoded(), nx=True, ex=self._hold_seconds):
                return None
            found = cast(bytes | None, await self._redis.get(key))
            if found is not None:
                fields = json.loads(found)
                return Claim(str(fields["g"]), str(fields["f"]), str(fields["m"]))
            # Released between the two commands: try again.
        raise RuntimeError("client_id claim kept changing")  # three releases in a row: not plausible

    async def release_claim(self, client_id: str, claim: Claim) -> None:
        """Gives the client_id back when its answer could not start (a limit refused it)."""
        await self._release_claim(keys=[claim_key(client_id)], args=[claim.encoded()])
