"""Shared mode ([cluster] redis_url): many Rill processes serving one set of answers
through Redis. The process that owns an answer (it holds the upstream request) mirrors
its events into a Redis stream; a process asked for an answer it does not hold reads
that stream, and sends Stop to the owner. Without a redis_url none of this is loaded.
Imported without redis-py: a lone process never loads it (the modules that use it are
imported by app.py in shared mode only)."""

from __future__ import annotations

from .errors import ClusterOpenError

__all__ = ["ClusterOpenError"]
