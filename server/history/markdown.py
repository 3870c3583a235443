"""A stored conversation as Markdown: the active branch, as the page's export button
writes it (web/static/js/export.js), with the page's English labels."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from server.history.context import branch

TITLE_MAX_CHARS = 60  # the page's store.js: a title made from the first question


def title_of(conversation: Mapping[str, Any]) -> str:
    title = str(conversation.get("title") or "")
    if title:
        return title
    first = next((m for m in conversation["messages"] if m["role"] == "user"), None)
    if first is None:
        return ""
    lines = first["content"].strip().split("\n")
    line = re.sub(r"\s+", " ", lines[0])
    return f"{line[: TITLE_MAX_CHARS - 1]}…" if len(line) > TITLE_MAX_CHARS else line


def conversation_markdown(conversation: Mapping[str, Any], model_label: Callable[[str], str]) -> str:
    lines = [f"# {title_of(conversation) or 'New chat'}", ""]
    system = str(conversation.get("system") or "").strip()
    if system:
        lines += [f"> **System prompt:** {system}", ""]
    for message in branch(conversation["messages"], conversation.get("active")):
        if message["role"] == "user":
            lines += ["## You", "", message["content"], ""]
        elif message["role"] == "assistant" and (message["content"] or message.get("error")):
            model = model_label(message["model"]) if message.get("model") else ""
            lines += [f"## Assistant{f' ({model})' if model else ''}", ""]
            if message["content"]:
                lines += [message["content"], ""]
            if error := message.get("error"):
                lines += [f"> {error.get('message') or error.get('code')}", ""]
    return "\n".join(lines).rstrip() + "\n"


def export_filename(title: str, extension: str) -> str:
    """Keeps letters of any script, drops what file systems dislike (as export.js does)."""
    base = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', " ", title or "conversation").strip()[:80]
    return f"{base or 'conversation'}.{extension}"
