"""This process's part in a cluster: its name, its Redis client, the mirror of the answers
it owns, its heartbeat, and the listener for what other processes tell it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.access.budget import DailyBudget
from server.access.gate import Gate
from server.config import Config
from server.history.feed import ChangeFeed
from server.relay.generation import Generation
from server.relay.registry import GenerationRegistry, rate_limited, too_many_generations

from .admission import ADMITTED, TOO_MANY, Admission, Claim
from .budget import SharedBudget
from .changes import CHANNEL as CHANGES_CHANNEL
from .changes import SharedChanges
from .connect import CONNECT_TIMEOUT, open_redis, process_name
from .control import ControlListener, ProcessBeat
from .errors import ClusterOpenError
from .hub import RemoteHub
from .mirror import EventMirror
from .sessions import CHANNEL as REVOKED_CHANNEL
from .sessions import Revocations

log = logging.getLogger(__name__)

WARN_EVERY = 60.0  # seconds between two warnings that Redis is unavailable


class Cluster:
    """Made by open_cluster, kept as app[CLUSTER]."""

    def __init__(
        self,
        redis: Redis,
        config: Config,
        registry: GenerationRegistry,
        gate: Gate,
        budget: DailyBudget,
        feed: ChangeFeed | None,
    ) -> None:
        self.redis = redis
        self.process = process_name()
        self._limits = config.limits
        self._failed_sign_ins = config.access.failed_sign_ins_per_minute
        hold = round(config.timeouts.max_generation + config.stream.finished_ttl) + 60
        self.admission = Admission(redis, self.process, config.limits, hold)
        self.budget = SharedBudget(redis, self.process, budget, hold)
        budget.shared = self.budget
        self.mirror = EventMirror(redis, self.process, config, ended=self._forget_in)
        self.hub = RemoteHub(redis, config.stream.finished_ttl, config.stream.resume_grace)
        self.revocations = Revocations(redis, gate)
        self.changes = SharedChanges(redis, self.process, feed) if feed is not None else None
        everyone: dict[str, Callable[[bytes], None]] = {REVOKED_CHANNEL: self.revocations.heard}
        if self.changes is not None:
            everyone[CHANGES_CHANNEL] = self.changes.heard
        self.control = ControlListener(redis, self.process, registry, everyone)
        self.beat = ProcessBeat(redis, self.process)
        self._forgetting: set[asyncio.Task[None]] = set()
        self._warned_at = -math.inf
        registry.on_start = self.mirror.track
        registry.on_discard = self._discarded

    async def start(self) -> None:
        await self.beat.start()
        self.mirror.start()
        self.hub.start()
        if self.changes is not None:
            self.changes.start()
        self.control.start()
        # Listening first, then reading what is there: no sign-out falls in between.
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await self.control.listening.wait()
        loaded = await self.revocations.load()
        if loaded:
            log.info("shared mode: %d sign-outs of other processes taken in", loaded)

    async def admit(self, client: str, generation_id: str) -> None:
        """Counts a new answer against the client's limits on every process (ApiError 429
        when over). With Redis failing, this process's own limits still apply."""
        try:
            verdict, wait = await self.admission.admit(client, generation_id, round(time.time() * 1000))
        except (RedisError, OSError) as error:
            self._warn(f"limits are counted per process until Redis is back ({type(error).__name__})")
            return
        if verdict == TOO_MANY:
            raise too_many_generations(self._limits.max_concurrent_per_client)
        if verdict != ADMITTED:
            raise rate_limited(self._limits.generations_per_minute, wait)

    def forget_admitted(self, client: str, generation_id: str) -> None:
        """An answer admitted but never made (a check after admit() refused it)."""
        self._forget_soon(client, generation_id)

    async def sign_in_wait(self, client: str, *, failed: bool) -> int | None:
        """Seconds a client must wait before its access token is looked at again (0:
        none), over every process, counting a wrong one; None when Redis cannot tell."""
        try:
            return await self.admission.sign_in(client, failed, self._failed_sign_ins, round(time.time() * 1000))
        except (RedisError, OSError) as error:
            self._warn(f"wrong access tokens are counted per process until Redis is back ({type(error).__name__})")
            return None

    async def claim(self, client_id: str, claim: Claim) -> Claim | None:
        """None: the client_id is this answer's on every process; else the earlier claim.
        With Redis failing, None: the process's own registry still finds repeats here."""
        try:
            return await self.admission.claim(client_id, claim)
        except (RedisError, OSError) as error:
            self._warn(f"client_id repeats are found per process until Redis is back ({type(error).__name__})")
            return None

    async def release_claim(self, client_id: str, claim: Claim) -> None:
        with contextlib.suppress(RedisError, OSError):  # else it expires
            await self.admission.release_claim(client_id, claim)

    def _forget_in(self, pipe: Any, generation: Generation) -> None:
        self.admission.forget(pipe, generation.client_key, generation.id)

    def _discarded(self, generation: Generation) -> None:
        self._forget_soon(generation.client_key, generation.id)

    def _forget_soon(self, client: str, generation_id: str) -> None:
        async def forget() -> None:
            with contextlib.suppress(RedisError, OSError):  # else it stops counting when this process ends
                async with self.redis.pipeline(transaction=False) as pipe:
                    self.admission.forget(pipe, client, generation_id)
                    await pipe.execute()

        task = asyncio.create_task(forget())
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("Redis unavailable: %s", message)

    async def close(self) -> None:
        if self._forgetting:
            await asyncio.wait(self._forgetting, timeout=2.0)
        await self.hub.close()
        await self.control.close()
        await self.revocations.close()
        if self.changes is not None:
            await self.changes.close()
        await self.mirror.close()  # the last events of the answers the shutdown ended
        await self.budget.flush()  # and what they used
        await self.beat.close()  # then readers elsewhere may end what is left at once
        await self.redis.aclose()


async def open_cluster(
    config: Config, registry: GenerationRegistry, gate: Gate, budget: DailyBudget, feed: ChangeFeed | None
) -> Cluster:
    """Connected and started; ClusterOpenError when Redis cannot be reached."""
    cluster = Cluster(await open_redis(config.cluster), config, registry, gate, budget, feed)
    try:
        await cluster.start()
    except (RedisError, OSError, TimeoutError) as error:
        await cluster.close()
        raise ClusterOpenError(f"Redis at {config.cluster.shown_url}: {type(error).__name__}") from None
    return cluster
