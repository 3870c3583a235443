"""What keeps an owner and the readers on other processes in touch: the owner's
heartbeat (a key that expires unless renewed, so readers elsewhere can tell a dead
owner from a quiet answer), and the messages other processes send it: Stop, and
"someone here still reads this answer" (so it is not abandoned as unread)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.relay.registry import GenerationRegistry

from . import names

log = logging.getLogger(__name__)

RETRY_FIRST = 0.1  # seconds before trying Redis again, doubled up to RETRY_MAX
RETRY_MAX = 5.0


class ProcessBeat:
    """Renews this process's key while it runs; deletes it when it stops (after its
    answers' last events are written), so readers elsewhere end them at once."""

    def __init__(self, redis: Redis, process: str) -> None:
        self._redis = redis
        self._key = names.process_key(process)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._redis.set(self._key, b"1", ex=names.PROCESS_TTL)  # before any answer is announced
        self._task = asyncio.create_task(self._run(), name="rill-cluster-beat")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            await self._redis.delete(self._key)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(names.PROCESS_BEAT)
            try:
                await self._redis.set(self._key, b"1", ex=names.PROCESS_TTL)
            except (RedisError, OSError) as error:
                log.debug("Redis: heartbeat not renewed (%s)", type(error).__name__)


class ControlListener:
    """Hears, for this process's answers, Stop sent by whichever process got the DELETE,
    and the heartbeats of readers following them from other processes; and, on the
    channels of `others`, what every process hears (sign-outs)."""

    def __init__(
        self,
        redis: Redis,
        process: str,
        registry: GenerationRegistry,
        others: Mapping[str, Callable[[bytes], None]] | None = None,
    ) -> None:
        self._redis = redis
        self._channel = names.control_channel(process)
        self._registry = registry
        self._others = {channel.encode(): heard for channel, heard in (others or {}).items()}
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rill-cluster-control")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel, *self._others)
                    self.listening.set()
                    delay = RETRY_FIRST
                    async for message in pubsub.listen():
                        data, heard = message.get("data"), self._others.get(message.get("channel"))
                        if heard is None:
                            self._heard(data)
                        elif isinstance(data, bytes):
                            heard(data)
            except (RedisError, OSError) as error:
                self.listening.clear()
                reason = type(error).__name__
                log.warning("Redis: not hearing other processes (%s); again in %.1f s", reason, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _heard(self, data: Any) -> None:
        if not isinstance(data, bytes):
            return
        kind, _, about = data.partition(b":")
        if kind + b":" == names.READING:
            for generation_id in about.split():
                generation = self._registry.get(generation_id.decode(errors="replace"))
                if generation is not None and generation.live:
                    generation.read_elsewhere()
        elif kind + b":" == names.STOP:
            generation = self._registry.get(about.decode(errors="replace"))
            if generation is not None and generation.live:
                log.info("generation %s stopped from another process", generation.id)
                generation.stop()
