"""Helpers for the browser tests of stored conversations: a Rill with a SQLite store,
its HTTP API called directly, and export documents built by hand."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from .conftest import Rill, StartRill

TITLES = "#conversations .conversation-open"
USER_BODIES = ".message.user .message-body"
ANSWER_BODIES = ".message.assistant .message-body"


async def stored_rill(start_rill: StartRill, tmp_path: Path, *, auto_titles: bool = False, **sections: Any) -> Rill:
    """A Rill keeping conversations in a SQLite file under tmp_path (titles off unless asked:
    the title request would take one of the fake upstream's scripted replies)."""
    storage = {"enabled": True, "url": f"sqlite:///{tmp_path / 'rill.db'}", "auto_titles": auto_titles}
    return await start_rill(storage=storage | sections.pop("storage", {}), **sections)


async def api(rill: Rill, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call to Rill's JSON API: (status, parsed body or None)."""
    where, _, query = path.lstrip("/").partition("?")
    url = (rill.url / where).with_query(query) if query else rill.url / where
    async with rill.session.request(method, url, json=body) as response:
        payload = await response.json() if response.content_type == "application/json" else None
        return response.status, payload


async def conversations(rill: Rill) -> list[dict[str, Any]]:
    status, body = await api(rill, "GET", "api/conversations")
    assert status == 200, body
    result: list[dict[str, Any]] = body["conversations"]
    return result


async def conversation(rill: Rill, cid: str) -> dict[str, Any]:
    status, body = await api(rill, "GET", f"api/conversations/{cid}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def settled_conversation(rill: Rill, cid: str) -> dict[str, Any]:
    """The conversation once no answer in it is streaming (the page sees an answer end a
    moment before the server's writer stores its text and ending)."""
    async with asyncio.timeout(10):
        while True:
            stored = await conversation(rill, cid)
            if all(m["status"] != "streaming" for m in stored["messages"]):
                return stored
            await asyncio.sleep(0.1)


def message(mid: str, parent: str | None, role: str, content: str, created: int) -> dict[str, Any]:
    return {
        "id": mid,
        "parent": parent,
        "role": role,
        "content": content,
        "reasoning": "",
        "status": "done",
        "model": "fake-chat" if role == "assistant" else None,
        "finish_reason": "stop" if role == "assistant" else None,
        "error": None,
        "usage": None,
        "generation": None,
        "last_event_id": 0,
        "created": created,
        "updated": created,
    }


def stored_conversation(
    cid: str, title: str, messages: list[dict[str, Any]], *, active: str | None = None
) -> dict[str, Any]:
    created = min((m["created"] for m in messages), default=int(time.time() * 1000))
    updated = max((m["updated"] for m in messages), default=created)
    return {
        "id": cid,
        "title": title,
        "title_source": "user" if title else None,
        "system": "",
        "model": "fake-chat",
        "active": active or (messages[-1]["id"] if messages else None),
        "created": created,
        "updated": updated,
        "messages": messages,
    }


def export_document(*conversations: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "rill.conversations",
        "version": 1,
        "exported": int(time.time() * 1000),
        "conversations": list(conversations),
    }


async def import_document(rill: Rill, document: dict[str, Any]) -> dict[str, Any]:
    status, body = await api(rill, "POST", "api/import", document)
    assert status in (200, 201), body
    assert isinstance(body, dict)
    return body
