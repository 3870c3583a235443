"""The one app-wide background task: heartbeats, closed-connection detection, eviction.

A single task instead of one per stream keeps the cost flat: each tick is a pass
over the open streams that only touches the ones that need something.
"""

from __future__ import annotations

import asyncio
import logging

from server.config import StreamConfig
from server.ops.metrics import Metrics
from server.relay.registry import GenerationRegistry
from server.relay.streaming import OpenStreams

log = logging.getLogger(__name__)


def tick(streams: OpenStreams, registry: GenerationRegistry, config: StreamConfig) -> None:
    now = asyncio.get_running_loop().time()
    for stream in streams:
        if stream.connection_closed():
            # Without this a closed tab would go unnoticed until the next token.
            stream.subscriber.mark_gone()
        elif now - stream.last_write >= config.heartbeat_interval:
            stream.subscriber.request_heartbeat()
    registry.evict()


async def run_monitor(
    streams: OpenStreams, registry: GenerationRegistry, config: StreamConfig, metrics: Metrics
) -> None:
    interval = min(config.liveness_interval, config.heartbeat_interval)
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        metrics.heartbeat_lag.observe(max(0.0, loop.time() - due))  # a busy loop delays every stream
        try:
            tick(streams, registry, config)
        except Exception:
            # One bad tick must not end heartbeats and closed-tab detection for good.
            log.exception("monitor tick failed")
