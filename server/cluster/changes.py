"""Conversations' changes shared by every process: a page following its owner's change
feed on one process hears of the changes made through any other (another device, a
load balancer's choice) within milliseconds.

Each process sends its changes on one channel, in order, from one task; each process
adds the others' changes to its own feed (whose event ids stay its own)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.history.feed import ChangeFeed
from server.jsoncodec import dumps, loads

from . import names

log = logging.getLogger(__name__)

CHANNEL = f"{names.PREFIX}changes"
MAX_QUEUED = 10_000  # changes kept for Redis while it is down; older ones are dropped
ERROR_LOG_EVERY = 60.0


class SharedChanges:
    def __init__(self, redis: Redis, process: str, feed: ChangeFeed) -> None:
        self._redis = redis
        self._process = process
        self._feed = feed
        self._queue: list[bytes] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._logged_at = -ERROR_LOG_EVERY
        feed.on_publish = self._made_here

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rill-cluster-changes")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    def heard(self, data: bytes) -> None:
        """A change made through another process."""
        change = loads(data)
        if change.get("p") != self._process:
            self._feed.publish_here(str(change["o"]), str(change["n"]), change["d"])

    def _made_here(self, owner: str, name: str, data: Mapping[str, Any]) -> None:
        self._queue.append(dumps({"p": self._process, "o": owner, "n": name, "d": data}))
        if len(self._queue) > MAX_QUEUED:
            del self._queue[: len(self._queue) - MAX_QUEUED]
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for change in batch:
                        pipe.publish(CHANNEL, change)
                    await pipe.execute()
            except (RedisError, OSError) as error:
                self._queue[:0] = batch  # in order, ahead of the newer ones
                now = time.monotonic()
                if now - self._logged_at >= ERROR_LOG_EVERY:
                    self._logged_at = now
                    log.error(
                        "Redis: changes to conversations are not reaching other processes (%s)", type(error).__name__
                    )
                await asyncio.sleep(1.0)
                self._wake.set()
