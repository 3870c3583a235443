"""Every piece of shared application state, under a typed AppKey."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from server.access.budget import DailyBudget
from server.access.gate import Gate
from server.config import Config
from server.history.feed import ChangeFeed
from server.ops.metrics import Metrics
from server.relay.catalog import Catalog
from server.relay.registry import GenerationRegistry
from server.relay.streaming import OpenStreams

if TYPE_CHECKING:
    # Imported only in shared mode (app.py): redis-py is not loaded by a lone process.
    from server.cluster.node import Cluster

    # Imported only with [storage] enabled (app.py): nor is SQLAlchemy without it.
    from server.history.answers import AnswerKeeper
    from server.store import Store

CONFIG = web.AppKey("config", Config)
CATALOG = web.AppKey("catalog", Catalog)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REGISTRY = web.AppKey("registry", GenerationRegistry)
OPEN_STREAMS = web.AppKey("open_streams", OpenStreams)
MONITOR_TASK = web.AppKey("monitor_task", asyncio.Task[None])
STARTED_AT = web.AppKey("started_at", float)
METRICS = web.AppKey("metrics", Metrics)
GATE = web.AppKey("gate", Gate)
BUDGET = web.AppKey("budget", DailyBudget)
STORE: web.AppKey[Store] = web.AppKey("store")  # only with [storage] enabled
FEED = web.AppKey("feed", ChangeFeed)  # each owner's changes, for GET /api/changes
ANSWERS: web.AppKey[AnswerKeeper] = web.AppKey("answers")  # writes stored conversations' answers; with STORE
CLUSTER: web.AppKey[Cluster] = web.AppKey("cluster")  # only with [cluster] redis_url
