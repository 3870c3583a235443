"""The one app-wide background task: heartbeats, closed-connection detection, eviction.

A single task instead of one per stream keeps the cost flat: each tick is a pass
over the open streams that only touches the ones that need something.
"""

from __future__ import annotations

import asyncio
import logging

from .config import StreamConfig
from .registry import GenerationRegistry
from .streaming import OpenStreams

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


async def run_monitor(streams: OpenStreams, registry: GenerationRegistry, config: StreamConfig) -> None:
    interval = min(config.liveness_interval, config.heartbeat_interval)
    while True:
        await asyncio.sleep(interval)
        try:
            tick(streams, registry, config)
        except Exception:
            # One bad tick must not end heartbeats and closed-tab detection for good.
            log.exception("monitor tick failed")
