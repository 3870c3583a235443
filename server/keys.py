"""Every piece of shared application state, under a typed AppKey."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from .budget import DailyBudget
from .catalog import Catalog
from .config import Config
from .gate import Gate
from .metrics import Metrics
from .registry import GenerationRegistry
from .streaming import OpenStreams

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
