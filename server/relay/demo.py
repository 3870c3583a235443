"""The offline demo: an OpenAI-compatible streaming endpoint served on loopback.

The relay reaches it over real HTTP through the same ClientSession and parser as a
real model API, so demo mode exercises every part of Rill except the model itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from yarl import URL

from server.config import DemoConfig

DEMO_NOTICE = (
    "> **Demo mode.** This answer comes from Rill's built-in offline demo, not from a "
    "real model. Set `DEEPSEEK_API_KEY` (or point `RILL_UPSTREAM_URL` at a local model) "
    "and restart Rill to talk to a real one.\n\n"
)

_ANSWERS = (
    """## Streaming, token by token

You asked: *{question}*

Rill relays each token the moment it arrives. Here is what happens:

1. Your browser `POST`s the conversation to `/api/chat`.
2. Rill opens **one** request to the model and buffers every event.
3. The page reads `/api/chat/<id>/events` with `EventSource`.
   - A reload resumes from `Last-Event-ID`.
   - Nobody pays twice 🎉

```python
async def relay(events):
    async for event in events:
        await send(event)  # no buffering
```

| Piece | Job |
|-------|-----|
| `sse.py` | parse the upstream stream |
| `generation.py` | own one answer |
| `streaming.py` | write it to you |

流式输出：模型每生成一个词，浏览器就立刻看到它。😀
Multi-line text stays intact,
even across line breaks.
""",
    """# A tiny guide to SSE

You asked: *{question}*

Server-sent events are plain text over HTTP:

- each event has an `id:` and `data:` lines,
- a blank line ends the event,
- comments start with a colon.

```text
id: 7
event: delta
data: {{"text":"hello"}}
```

| Field | Meaning |
|-------|---------|
| `id` | where to resume |
| `retry` | how long to wait before reconnecting |

你好，世界！🌏 Emoji and 中文 survive every split: 👩‍💻🚀
Line one,
line two.
""",
)

_REASONING = (
    "The user wants to see how streaming works. I should show a heading, a list, some "
    "code and a table so the renderer has something to do. 先想一想怎么解释……"
    "A short, friendly answer is best.\n"
)

_TOKEN = re.compile(r"[\u3400-\u9fff\uff00-\uffef]{1,2}|\s*[^\s\u3400-\u9fff\uff00-\uffef]+|\s+")


def tokenize(text: str) -> list[str]:
    """Split text into word-sized pieces (CJK two characters at a time), losing nothing."""
    return _TOKEN.findall(text)


def compose_answer(messages: list[dict[str, Any]]) -> str:
    question = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            question = " ".join(str(message.get("content", "")).split())
            break
    if len(question) > 120:
        question = question[:119] + "…"
    question = question.replace("*", "").replace("_", "") or "nothing yet"
    answer = _ANSWERS[sum(map(ord, question)) % len(_ANSWERS)]
    return DEMO_NOTICE + answer.format(question=question)


def _chunk(completion_id: str, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def _paced(tokens: list[str], per_second: float) -> AsyncIterator[str]:
    delay = 1.0 / per_second
    for token in tokens:
        await asyncio.sleep(delay * random.uniform(0.6, 1.4))  # a human-like, uneven pace
        yield token


class DemoUpstream:
    def __init__(self, config: DemoConfig) -> None:
        self._config = config

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(
                {"error": {"message": "body is not JSON", "type": "invalid_request_error"}},
                status=400,
            )
        model = str(body.get("model", "rill-demo"))
        max_tokens = body.get("max_tokens")
        limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
        messages = body.get("messages") or []
        reasoning = model.endswith("reasoner")

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        completion_id = f"demo-{uuid.uuid4().hex[:12]}"
        await response.write(b": keep-alive\n\n")
        await response.write(_chunk(completion_id, model, {"role": "assistant", "content": ""}))

        used = 0
        reasoning_used = 0
        finish = "stop"
        if reasoning:
            async for token in _paced(tokenize(_REASONING), self._config.reasoning_tokens_per_second):
                await response.write(_chunk(completion_id, model, {"content": None, "reasoning_content": token}))
                reasoning_used += 1
        async for token in _paced(tokenize(compose_answer(messages)), self._config.tokens_per_second):
            if limit is not None and used + reasoning_used >= limit:
                finish = "length"
                break
            await response.write(_chunk(completion_id, model, {"content": token}))
            used += 1

        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) // 4 + 1
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": used + reasoning_used,
            "total_tokens": prompt_tokens + used + reasoning_used,
            "completion_tokens_details": {"reasoning_tokens": reasoning_used},
        }
        await response.write(_chunk(completion_id, model, {"content": ""}, finish))
        final = {"id": completion_id, "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response


def create_demo_app(config: DemoConfig) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", DemoUpstream(config).chat_completions)
    return app


class DemoServer:
    """Runs the demo app on an ephemeral loopback port for the lifetime of the main app."""

    def __init__(self, config: DemoConfig) -> None:
        self._runner = web.AppRunner(create_demo_app(config), access_log=None, handler_cancellation=True)

    async def start(self) -> URL:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return URL.build(scheme="http", host=host, port=port, path="/v1")

    async def close(self) -> None:
        await self._runner.cleanup()
