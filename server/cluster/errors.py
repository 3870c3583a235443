"""Shared mode's errors, importable without redis-py."""

from __future__ import annotations


class ClusterOpenError(Exception):
    """Shared mode is configured and its Redis cannot be used: Rill must not start."""
