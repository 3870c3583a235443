"""What the fake upstream writes and the load client reads: stamped tokens in the
OpenAI streaming format, and a small SSE line parser of the bench's own (so a bug in
Rill's parser cannot hide itself from the measurement)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

# Every token carries its index and the CLOCK_MONOTONIC time the upstream wrote it (ns);
# CLOCK_MONOTONIC is one clock for every process on the machine.
TOKEN = re.compile(r"\[(\d+):(\d+)\] ")


def token_text(index: int, stamp_ns: int) -> str:
    return f"[{index}:{stamp_ns}] "


TOKEN_BYTES = re.compile(rb"\[(\d+):(\d+)\] ")
EVENT_ID = re.compile(rb"^id: ?(\d+)\r?$", re.MULTILINE)
LONGEST_TOKEN = 48  # bytes: "[index:stamp] " with room to spare

_CHUNK_HEAD = b'data: {"id":"bench","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"'
_CHUNK_TAIL = b'"}}]}\n\n'


def openai_chunk(text: str) -> bytes:
    """One streamed chunk; built by hand (the text never needs JSON escapes) to keep
    the fake upstream cheap enough for 30,000 tokens a second."""
    return _CHUNK_HEAD + text.encode() + _CHUNK_TAIL


def openai_finish(tokens: int) -> bytes:
    done = {"id": "bench", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {
        "id": "bench",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5},
    }
    return (
        b"data: "
        + json.dumps(done).encode()
        + b"\n\n"
        + b"data: "
        + json.dumps(usage).encode()
        + b"\n\ndata: [DONE]\n\n"
    )


@dataclass
class SSEEvent:
    name: str
    data: str
    id: str | None


class SSELines:
    """Incremental SSE parsing: feed bytes, get complete events (split anywhere)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._name = "message"
        self._id: str | None = None

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode()
            if not line:
                if self._data:
                    yield SSEEvent(self._name, "\n".join(self._data), self._id)
                self._data, self._name = [], "message"
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._name = value
            elif field == "id":
                self._id = value
