"""This process's part in a cluster: its name, its Redis client, the mirror of the answers
it owns, its heartbeat, and the listener for what other processes tell it."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.config import Config
from server.relay.registry import GenerationRegistry

from .connect import open_redis, process_name
from .control import ControlListener, ProcessBeat
from .errors import ClusterOpenError
from .mirror import EventMirror


class Cluster:
    """Made by open_cluster, kept as app[CLUSTER]."""

    def __init__(self, redis: Redis, config: Config, registry: GenerationRegistry) -> None:
        self.redis = redis
        self.process = process_name()
        self.mirror = EventMirror(redis, self.process, config)
        self.control = ControlListener(redis, self.process, registry)
        self.beat = ProcessBeat(redis, self.process)
        registry.on_start = self.mirror.track

    async def start(self) -> None:
        await self.beat.start()
        self.mirror.start()
        self.control.start()

    async def close(self) -> None:
        await self.control.close()
        await self.mirror.close()  # the last events of the answers the shutdown ended
        await self.beat.close()  # then readers elsewhere may end what is left at once
        await self.redis.aclose()


async def open_cluster(config: Config, registry: GenerationRegistry) -> Cluster:
    """Connected and started; ClusterOpenError when Redis cannot be reached."""
    cluster = Cluster(await open_redis(config.cluster), config, registry)
    try:
        await cluster.start()
    except (RedisError, OSError) as error:
        await cluster.redis.aclose()
        raise ClusterOpenError(f"Redis at {config.cluster.shown_url}: {type(error).__name__}") from None
    return cluster
