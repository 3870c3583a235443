"""The bench's own processes (fake upstream, load client) use uvloop when it is
installed, so they stay far from being the bottleneck. The servers measured choose
their own loop."""

from __future__ import annotations

import asyncio


def install_fast_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
