"""The floor for any relay process: a TCP byte pipe in Python on uvloop, no HTTP, no
parsing. `python -m bench.pipe --port N --upstream-port M`.

Every connection to it is joined to a new connection to the fake upstream, and bytes
go through both ways untouched, so the load client reads it exactly as it reads the
upstream (`direct`). What a paced token costs here (one read, one write, the event
loop's wake-up) is what the kernel and the loop charge before a relay does any work."""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from .loops import install_fast_loop


class Side(asyncio.Protocol):
    """One end of a pipe: what it reads, its peer writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.early: list[bytes] = []  # read before the other end was connected
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def join(client: Side, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    upstream = Side()
    try:
        await loop.create_connection(lambda: upstream, "127.0.0.1", upstream_port)
    except OSError:
        if client.transport is not None:
            client.transport.close()
        return
    upstream.peer, client.peer = client, upstream
    assert upstream.transport is not None
    for data in client.early:
        upstream.transport.write(data)
    client.early.clear()
    if client.closed:
        upstream.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    joining: set[asyncio.Task[None]] = set()

    def accept() -> Side:
        client = Side()
        task = loop.create_task(join(client, upstream_port))
        joining.add(task)
        task.add_done_callback(joining.discard)
        return client

    async with await loop.create_server(accept, "127.0.0.1", port) as server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    install_fast_loop()
    asyncio.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
