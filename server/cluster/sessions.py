"""Sign-outs shared by every process: a session signed out on one is refused on all.

Each process keeps checking cookies against its own set of revoked session ids (no
Redis round trip per request); a sign-out is written to Redis (a key that expires with
the cookie) and announced on a channel every process hears, and a process starting up
reads the ones already there."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.access.gate import Gate, Session

from . import names

log = logging.getLogger(__name__)

CHANNEL = f"{names.PREFIX}revoked"
LOAD_BATCH = 1000


def revoked_key(session_id: str) -> str:
    return f"{names.PREFIX}revoked:{session_id}"


class Revocations:
    def __init__(self, redis: Redis, gate: Gate) -> None:
        self._redis = redis
        self._gate = gate
        self._writing: set[asyncio.Task[None]] = set()
        gate.on_revoke = self._revoked_here

    async def load(self) -> int:
        """Takes in the sign-outs other processes made before this one started."""
        loaded = 0
        keys: list[bytes] = []
        async for key in self._redis.scan_iter(match=revoked_key("*"), count=LOAD_BATCH):
            keys.append(cast(bytes, key))
            if len(keys) >= LOAD_BATCH:
                loaded += await self._take(keys)
                keys = []
        if keys:
            loaded += await self._take(keys)
        return loaded

    async def _take(self, keys: list[bytes]) -> int:
        values = cast(list[bytes | None], await self._redis.mget(keys))
        prefix = len(revoked_key(""))
        revoked = [(key.decode()[prefix:], int(value)) for key, value in zip(keys, values, strict=True) if value]
        return self._gate.revoked_elsewhere(revoked, time.time())

    def heard(self, data: bytes) -> None:
        """A sign-out on another process: `<session id>:<expires>`."""
        session_id, _, expires = data.decode(errors="replace").rpartition(":")
        if session_id and expires.isdigit():
            self._gate.revoked_elsewhere([(session_id, int(expires))], time.time())

    async def close(self) -> None:
        if self._writing:
            await asyncio.wait(self._writing, timeout=2.0)

    def _revoked_here(self, session: Session) -> None:
        async def share() -> None:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(revoked_key(session.session_id), session.expires, exat=session.expires)
                    pipe.publish(CHANNEL, f"{session.session_id}:{session.expires}")
                    await pipe.execute()
            except (RedisError, OSError) as error:
                # Signed out here all the same; the other processes hear of it only if
                # the browser signs out again, so say so.
                log.error("Redis: a sign-out could not be shared with the other processes (%s)", type(error).__name__)

        task = asyncio.create_task(share())
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
