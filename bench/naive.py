"""The baseline relay: what a tutorial builds. One ClientSession; each GET /relay
opens the upstream request and writes every line it gets back to the browser, as it
comes. No resume, no limits, no heartbeats: the floor a real relay is measured from.
`python -m bench.naive --port N --upstream URL`."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": request.query["scenario"]}]}
    async with request.app[SESSION].post(request.app[UPSTREAM], json=body) as upstream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for line in upstream.content:
            await response.write(line)
        return response


async def session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        app[SESSION] = client
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(session)
    app.router.add_get("/relay", relay)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
