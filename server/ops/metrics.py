"""Prometheus metrics (prometheus-client) on GET /metrics. One registry per app, so
several apps (the tests) never share counters. Nothing here runs per token: a
generation is counted once, when it ends."""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.relay.generation import Generation

# How each ending counts as a cancellation (a generation that ended before its answer).
_CANCELLED = {"cancelled": "stop", "abandoned": "abandoned", "server_shutdown": "shutdown"}
# Finish reasons counted under their own label; any other (the upstream's own words,
# passed on verbatim in `done`) is counted as `other`, so no upstream can add series.
_OUTCOMES = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call", "cancelled"})


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.live_generations = Gauge(
            "rill_live_generations", "Generations whose upstream request is in progress.", registry=registry
        )
        self.subscribers = Gauge(
            "rill_subscribers", "Event streams open to clients (readers of generations).", registry=registry
        )
        self.generations = Counter(
            "rill_generations",
            "Generations ended, by outcome (finish reason, or error).",
            ["outcome"],
            registry=registry,
        )
        self.first_token = Histogram(
            "rill_upstream_first_token_seconds",
            "Time from the upstream request to its first token (answer or reasoning).",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120),
            registry=registry,
        )
        self.tokens = Counter(
            "rill_tokens_relayed", "Pieces of answer and reasoning relayed from upstream.", registry=registry
        )
        self.upstream_errors = Counter(
            "rill_upstream_errors", "Generations that ended with an error, by code.", ["code"], registry=registry
        )
        self.resumes = Counter("rill_resumes", "Event streams resumed from a Last-Event-ID.", registry=registry)
        self.cancellations = Counter(
            "rill_cancellations",
            "Generations ended before their answer: stop (DELETE), abandoned (nobody reading), shutdown.",
            ["reason"],
            registry=registry,
        )
        self.token_checks = Counter(
            "rill_access_token_checks",
            "Access tokens checked (sign-in or Bearer), by outcome: ok, bad_token, limited.",
            ["outcome"],
            registry=registry,
        )
        self.heartbeat_lag = Histogram(
            "rill_heartbeat_lag_seconds",
            "How late the monitor task (heartbeats, closed-tab detection) ran: event loop lag.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )

    def generation_ended(self, generation: Generation) -> None:
        terminal = generation.terminal
        assert terminal is not None
        data = json.loads(terminal.data)
        if terminal.name == "done":
            reason = data.get("finish_reason", "stop")
            self.generations.labels(outcome=reason if reason in _OUTCOMES else "other").inc()
            cancelled = _CANCELLED.get(reason)
        else:
            code = data.get("code", "internal_error")
            self.generations.labels(outcome="error").inc()
            cancelled = _CANCELLED.get(code)
            if cancelled is None:
                self.upstream_errors.labels(code=code).inc()
        if cancelled is not None:
            self.cancellations.labels(reason=cancelled).inc()
        if generation.first_token_after is not None:
            self.first_token.observe(generation.first_token_after)
        self.tokens.inc(generation.tokens)

    def response(self) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
