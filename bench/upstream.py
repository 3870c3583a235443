"""The fake OpenAI-compatible upstream: `python -m bench.upstream --port N`.

The scenario travels in the request itself (the last user message is JSON), so Rill
relays it unchanged: {"tokens": 300, "interval": 0.033, "split": 0.1, "seed": 7}.
Each token is stamped with the time it is written. GET /stats tells how many requests
came and how many are still open (the abort and resume storms read it)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from aiohttp import web

from .loops import install_fast_loop
from .wire import openai_chunk, openai_finish, token_text


class Upstream:
    def __init__(self) -> None:
        self.requests = 0
        self.open = 0
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.completions)
        self.app.router.add_get("/stats", self.stats)
        self.app.router.add_post("/stats/reset", self.reset)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "open": self.open})

    async def reset(self, request: web.Request) -> web.Response:
        self.requests = 0
        return web.json_response({"requests": 0, "open": self.open})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        scenario = json.loads(body["messages"][-1]["content"])
        tokens, interval = int(scenario["tokens"]), float(scenario.get("interval", 0.0))
        split = float(scenario.get("split", 0.0))
        rng = random.Random(scenario.get("seed", 0))
        self.requests += 1
        self.open += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            loop = asyncio.get_running_loop()
            # A random phase, so that many streams do not tick in step.
            start = loop.time() + (rng.random() * interval if interval else 0.0)
            for index in range(tokens):
                if interval:
                    delay = start + index * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                data = openai_chunk(token_text(index, time.monotonic_ns()))
                if split and rng.random() < split:
                    cut = rng.randrange(1, len(data))
                    await response.write(data[:cut])
                    await asyncio.sleep(0.001)  # its own TCP segment: the reader sees half an event
                    await response.write(data[cut:])
                else:
                    await response.write(data)
                    if not interval and index % 16 == 15:
                        await asyncio.sleep(0)  # as fast as possible, but let the other streams write too
            await response.write(openai_finish(tokens))
            await response.write_eof()
        except ConnectionError:
            pass  # the reader went away: that is what the abort storm looks at
        finally:
            self.open -= 1
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    install_fast_loop()
    web.run_app(Upstream().app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
