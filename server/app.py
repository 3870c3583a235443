"""The application factory and its lifecycle: one ClientSession, the demo upstream,
the monitor task, and a clean ending for every stream at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp_jinja2
import jinja2
from aiohttp import web

from server.access.budget import DailyBudget
from server.access.gate import Gate
from server.access.middleware import access_middleware, add_cors_headers
from server.config import Config, StorageConfig
from server.history.feed import ChangeFeed
from server.http.accesslog import PathOnlyAccessLogger
from server.http.connections import connection_middleware
from server.http.errors import error_middleware
from server.http.routes import setup_routes
from server.http.security import add_security_headers
from server.keys import (
    ANSWERS,
    BUDGET,
    CATALOG,
    CLUSTER,
    CONFIG,
    FEED,
    GATE,
    METRICS,
    MONITOR_TASK,
    OPEN_STREAMS,
    REGISTRY,
    SESSION,
    STARTED_AT,
    STORE,
)
from server.ops.logs import add_request_id_header, request_id_middleware
from server.ops.metrics import Metrics
from server.ops.monitor import run_monitor
from server.relay.catalog import build_catalog
from server.relay.demo import DemoServer
from server.relay.generation import SHUTDOWN_ERROR, Generation
from server.relay.registry import GenerationRegistry
from server.relay.streaming import OpenStreams
from server.relay.upstream import client_timeout

if TYPE_CHECKING:
    from server.store import StoreLimits

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "web" / "templates"


def create_app(config: Config) -> web.Application:
    """Build the app from its config; nothing starts until the app does."""
    app = web.Application(
        # connection_middleware inside error_middleware: its 408 is rendered like any error.
        middlewares=[request_id_middleware, error_middleware, connection_middleware, access_middleware],
        client_max_size=config.limits.max_body_bytes,
    )
    app[CONFIG] = config
    app[GATE] = Gate(config.access)
    metrics = app[METRICS] = Metrics()
    budget = app[BUDGET] = DailyBudget(config.access.daily_token_budget, config.access.state_dir)

    def generation_ended(generation: Generation) -> None:
        metrics.generation_ended(generation)
        budget.generation_ended(generation)

    app[REGISTRY] = GenerationRegistry(config, on_end=generation_ended)
    app[OPEN_STREAMS] = OpenStreams()
    if config.storage.enabled:
        from server.history.answers import AnswerKeeper  # the store and SQLAlchemy: only with [storage] on

        feed = app[FEED] = ChangeFeed()
        app[ANSWERS] = AnswerKeeper(config, feed, budget, lambda: app[SESSION])
    metrics.live_generations.set_function(lambda: len(app[REGISTRY].live()))
    metrics.subscribers.set_function(lambda: len(app[OPEN_STREAMS]))
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(default=True),
    )
    setup_routes(app)
    app.on_response_prepare.append(add_security_headers)
    app.on_response_prepare.append(add_request_id_header)
    app.on_response_prepare.append(add_cors_headers)
    # First in, last out: answers still being written get the database until the end,
    # and Redis gets the last events of the answers a shutdown ends.
    app.cleanup_ctx.append(_cluster)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_http_client)
    app.cleanup_ctx.append(_catalog)
    app.cleanup_ctx.append(_monitor)
    app.on_shutdown.append(_end_streams)
    return app


def runner_options(config: Config) -> dict[str, Any]:
    """Server settings shared by __main__ and the tests: both run an AppRunner with them
    and listen through httpserver.RillSite."""
    return {
        "shutdown_timeout": config.server.shutdown_timeout,
        "keepalive_timeout": config.server.keepalive_timeout,  # AppRunner's own default is 3,630 s
        "access_log_class": PathOnlyAccessLogger,
        # Handlers are not cancelled on disconnect; the monitor task notices closed
        # connections instead, so a half-finished POST never leaves a partial state.
        "handler_cancellation": False,
        # Request bodies are decoded by bodies.read_body, where a bad one is a clean 400.
        "auto_decompress": False,
    }


def stop_accepting(app: web.Application) -> None:
    """The first step of a stop: /readyz answers 503 and new answers are refused (503
    shutting_down, which clients retry), while everything else is still served."""
    app[REGISTRY].accepting = False


def store_limits(storage: StorageConfig) -> StoreLimits:
    from server.store import StoreLimits

    return StoreLimits(
        max_conversations=storage.max_conversations,
        max_messages=storage.max_messages,
        max_bytes=storage.max_bytes,
        max_message_chars=storage.max_message_chars,
    )


async def _cluster(app: web.Application) -> AsyncIterator[None]:
    """Shared mode: connects to Redis (ClusterOpenError stops start-up) and shares this
    process's answers from then on."""
    config = app[CONFIG]
    if not config.cluster.enabled:
        yield
        return
    from server.cluster.node import open_cluster  # redis-py only where it is used

    cluster = app[CLUSTER] = await open_cluster(config, app[REGISTRY], app[GATE], app[BUDGET], app.get(FEED))
    shown = f"{config.cluster.shown_url} ({config.cluster.url_from})"
    log.info("shared mode: Redis at %s, this process is %s", shown, cluster.process)
    try:
        yield
    finally:
        await cluster.close()


async def _storage(app: web.Application) -> AsyncIterator[None]:
    """Opens (and migrates) the conversations' database; StoreOpenError stops start-up."""
    storage = app[CONFIG].storage
    if not storage.enabled:
        yield
        return
    from server.store import open_store

    store = await open_store(storage.url, store_limits(storage))
    app[STORE] = store
    log.info("conversations: %s database at %s (%s)", store.backend, storage.shown_url, storage.url_from)
    try:
        await app[ANSWERS].open(store)  # answers cut off by the last stop: interrupted
        yield
        await app[ANSWERS].close()  # every answer's last write first
    finally:
        await store.close()


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    # One session for the process; limit=0: concurrency is capped by our own limits.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    # auto_decompress=False: a compressed upstream body is inflated a piece at a time (inflate.py).
    # No cookie jar: the session serves every user, and a cookie a model API set for one
    # answer must not go out with everyone else's (nor cost a jar lookup per request).
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=client_timeout(app[CONFIG]),
        trust_env=False,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        app[SESSION] = session
        yield


async def _catalog(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[STARTED_AT] = asyncio.get_running_loop().time()
    if config.providers[0].usable:
        app[CATALOG] = build_catalog(config, None)
        yield
        return
    demo = DemoServer(config.demo)
    url = await demo.start()
    app[CATALOG] = build_catalog(config, url)
    log.warning(
        "no API key in %s: answering from the offline demo (%s)",
        config.providers[0].api_key_env or "the environment",
        url,
    )
    try:
        yield
    finally:
        await demo.close()


async def _monitor(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        run_monitor(app[OPEN_STREAMS], app[REGISTRY], app[CONFIG].stream, app[METRICS]), name="rill-monitor"
    )
    app[MONITOR_TASK] = task
    yield
    task.cancel()
    await asyncio.wait({task})  # waits without re-raising the task's own cancellation


async def _end_streams(app: web.Application) -> None:
    """Refuse new work, end every live generation with `server_shutdown`, close its
    upstream request, and give open streams the time to write that last event."""
    registry = app[REGISTRY]
    registry.accepting = False
    if CLUSTER in app:
        app[CLUSTER].hub.end_all()  # readers of other processes' answers end (they resume elsewhere)
    if FEED in app:
        app[FEED].close()  # change streams never end by themselves
    live = registry.live()
    for generation in live:
        generation.fail(str(SHUTDOWN_ERROR["code"]), str(SHUTDOWN_ERROR["message"]), retryable=True)
    if open_upstream := registry.upstream_open():
        for generation in open_upstream:
            generation.close_upstream()
        await asyncio.wait([asyncio.ensure_future(g.wait_closed()) for g in open_upstream])
    streams = app[OPEN_STREAMS]
    try:
        async with asyncio.timeout(app[CONFIG].server.shutdown_timeout / 2):
            await streams.wait_empty()
    except TimeoutError:
        log.warning("shutdown: %d streams did not finish in time", len(streams))
    log.info("shutdown: ended %d generations, %d streams still open", len(live), len(streams))
