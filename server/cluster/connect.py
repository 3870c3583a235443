"""Opening shared mode's Redis connection: at start-up, a Redis that cannot be reached
stops Rill (exit 2, one line naming Redis) rather than running as a lone process that
other processes cannot see."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.config import ClusterConfig

from .errors import ClusterOpenError

CONNECT_TIMEOUT = 3.0  # seconds for the first PING, and for any connection attempt
# A read longer than the longest blocking XREAD (hub.BLOCK_MS) means a dead peer.
SOCKET_TIMEOUT = 10.0


def process_name() -> str:
    """This process among all of a cluster's: unique per start, readable in Redis."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def open_redis(config: ClusterConfig) -> Redis:
    """A client on the configured Redis, checked with a PING; ClusterOpenError (its message
    names Redis, never its password) when it cannot be reached."""
    client: Redis = Redis.from_url(
        config.redis_url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        health_check_interval=30,
    )
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await client.ping()
    except (RedisError, OSError, TimeoutError) as error:
        await client.aclose()
        reason = "no answer in time" if isinstance(error, TimeoutError) else _reason(error, config)
        raise ClusterOpenError(f"Redis at {config.shown_url} ({config.url_from}): {reason}") from None
    return client


def _reason(error: BaseException, config: ClusterConfig) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if config.password:
        text = text.replace(config.password, "***")
    return text
