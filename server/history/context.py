"""What the model is sent for a stored conversation: its system prompt, then the active
branch's messages from the root, as the page built it from its own copy before."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The page's Continue button sent these words as the user's turn; the server sends them
# now (in English: the model understands them whatever the page's language).
CONTINUE_PROMPT = "Continue exactly where your previous answer stopped. Do not repeat anything you already wrote."


def branch(messages: Iterable[Mapping[str, Any]], leaf: str | None) -> list[dict[str, Any]]:
    """The messages from the root down to `leaf` (none for None), following parent links."""
    by_id = {str(m["id"]): dict(m) for m in messages}
    path: list[dict[str, Any]] = []
    seen: set[str] = set()
    current = leaf
    while current is not None and current in by_id and current not in seen:  # a cycle ends the walk
        seen.add(current)
        message = by_id[current]
        path.append(message)
        current = message.get("parent")
    path.reverse()
    return path


def model_messages(system: str, path: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Role/content pairs for the model: answers without text (a failed one) are left out."""
    messages: list[dict[str, str]] = []
    if system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for message in path:
        role, content = message["role"], message["content"]
        if role == "user" or (role == "assistant" and content):
            messages.append({"role": role, "content": content})
    return merge_same_role(messages)


def merge_same_role(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Joins neighbours with the same role (left by a failed answer): some APIs refuse them."""
    merged: list[dict[str, str]] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if previous is not None and previous["role"] == message["role"] and message["role"] != "system":
            previous["content"] = f"{previous['content']}\n\n{message['content']}"
        else:
            merged.append(dict(message))
    return merged
