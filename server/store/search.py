"""Placeholder until helper S2's search lands (branch h-s2 replaces this file)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection


async def search(connection: AsyncConnection, backend: str, owner: str, query: str, limit: int) -> list[dict[str, Any]]:
    return []
