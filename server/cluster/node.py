"""This process's part in a cluster: its name, its Redis client, the mirror of the answers
it owns and the listener for Stop sent from elsewhere."""

from __future__ import annotations

from redis.asyncio import Redis

from server.config import Config
from server.relay.registry import GenerationRegistry

from .connect import open_redis, process_name
from .mirror import EventMirror, StopListener


class Cluster:
    """Made by open_cluster, kept as app[CLUSTER]."""

    def __init__(self, redis: Redis, config: Config, registry: GenerationRegistry) -> None:
        self.redis = redis
        self.process = process_name()
        self.mirror = EventMirror(redis, self.process, config)
        self.stops = StopListener(redis, self.process, registry)
        registry.on_start = self.mirror.track

    def start(self) -> None:
        self.mirror.start()
        self.stops.start()

    async def close(self) -> None:
        await self.stops.close()
        await self.mirror.close()
        await self.redis.aclose()


async def open_cluster(config: Config, registry: GenerationRegistry) -> Cluster:
    """Connected and started; ClusterOpenError when Redis cannot be reached."""
    cluster = Cluster(await open_redis(config.cluster), config, registry)
    cluster.start()
    return cluster
