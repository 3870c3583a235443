"""Connection accounting under aiohttp: how many connections one client address may
hold and how many all of them may, and how long a client may take to send a request's
headers and its body. A silent or slow client is cut at a deadline it cannot stretch by
trickling bytes, so a few thousand of them cannot hold the file descriptors that real
requests need (issue 13: 1,030 stalled bodies made every request fail).

A connection is a thin asyncio.Protocol in front of aiohttp's own, which is made only
once the connection is let in; the requests' middleware tells it when a request starts
and ends. Public asyncio and aiohttp interfaces only: the aiohttp internals Rill leans
on are in httpserver.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import cast

from aiohttp import StreamReader, web

from server.config import Config
from server.http.errors import ApiError, Handler

log = logging.getLogger(__name__)

NOTICE_INTERVAL = 60.0  # seconds: one log line per kind of refusal, the rest counted into the next
SWEEP_INTERVAL = 0.1  # seconds between two looks for connections past their deadline
# A flood's connections pass their deadline together, and each cut body wakes its handler
# to answer 408: at most this many per sweep keeps every loop turn short (~0.3 ms each),
# at the cost of a deadline kept a few ticks late in a flood.
MAX_CUTS_PER_SWEEP = 64


class BodyTimeout(TimeoutError):
    """Set on a request body that did not arrive in time. A TimeoutError, because that
    is what aiohttp's own lingering read after the response expects and ends quietly."""


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_per_address: int
    exempt: tuple[IPv4Network | IPv6Network, ...]  # the trusted proxies: nginx is every client at once

    @classmethod
    def from_config(cls, config: Config, open_files: int | None = None) -> ConnectionLimits:
        """`open_files`: the process's open-file limit. The bound stays under it with room
        for the upstream connections and the demo's (two sockets per live answer)."""
        total = config.server.max_connections
        if open_files is not None:
            room = max(16, open_files - 2 * config.limits.max_concurrent_total - 64)
            if total > room:
                log.warning(
                    "[server] max_connections is %d, but the open-file limit (%d) leaves room for %d: "
                    "using %d (raise LimitNOFILE or ulimit -n)",
                    total,
                    open_files,
                    room,
                    room,
                )
                total = room
        return cls(
            header_timeout=config.server.header_timeout,
            body_timeout=config.server.body_timeout,
            max_connections=total,
            max_per_address=config.server.max_connections_per_address,
            exempt=config.limits.trusted_proxies,
        )


class State(Enum):
    HEADERS = "headers"  # waiting for a request's headers (new, or bytes after keep-alive)
    REQUEST = "request"  # a handler is running
    IDLE = "idle"  # keep-alive between requests: aiohttp's keepalive_timeout ends it


class Notices:
    """One log line per kind of event per NOTICE_INTERVAL: under attack a refusal per
    connection would flood the log. The ones held back are counted into the next line."""

    def __init__(self, interval: float = NOTICE_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int, int]] = {}  # kind -> (logged at, held back, level)

    def note(self, kind: str, level: int, message: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self.interval:
            self._last[kind] = (last[0], last[1] + 1, level)
            return
        if last is not None and last[1]:
            message += " (%d more like it before this)"
            args = (*args, last[1])
        log.log(level, message, *args)
        self._last[kind] = (now, 0, level)

    def flush(self) -> None:
        """Reports what was held back once its interval is over, even if nothing follows."""
        now = asyncio.get_running_loop().time()
        for kind, (at, held, level) in list(self._last.items()):
            if now - at >= self.interval:
                if held:
                    log.log(level, "connections: %d more %s in the last %.0f s", held, kind, now - at)
                del self._last[kind]


def address_key(host: str) -> tuple[str, IPv4Address | IPv6Address]:
    """The key connections are counted under, and the address itself. IPv6 counts per
    /64: one client commonly holds a whole /64."""
    address = ip_address(host.partition("%")[0])
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:  # a dual-stack listener's IPv4 client
            return str(address.ipv4_mapped), address.ipv4_mapped
        return str(ip_network(f"{address}/64", strict=False)), address
    return host, address


class ConnectionTable:
    """Every client connection by state, oldest first in each, and the counts per address."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_address: dict[str, int] = {}
        # Oldest first: a deadline is the same span for all, so the front expires first.
        self.headers: OrderedDict[Connection, float] = OrderedDict()
        self.idle: OrderedDict[Connection, float] = OrderedDict()
        self.bodies: OrderedDict[Connection, tuple[float, StreamReader]] = OrderedDict()
        self.notices = Notices()
        self.make_handler: Callable[[], asyncio.Protocol] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def protocol(self) -> Connection:
        """The protocol factory for loop.create_server."""
        return Connection(self)

    def start(self, make_handler: Callable[[], asyncio.Protocol]) -> None:
        self.make_handler = make_handler
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="rill-connection-deadlines")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper})
            self._sweeper = None

    # --- letting connections in ------------------------------------------------------

    def admit(self, conn: Connection, transport: asyncio.Transport) -> bool:
        peer = transport.get_extra_info("peername")
        key = None
        if isinstance(peer, tuple) and peer:
            key, address = address_key(peer[0])
            if any(address in network for network in self.limits.exempt):
                key = None
            elif self.per_address.get(key, 0) >= self.limits.max_per_address:
                self.notices.note(
                    "refusals of a client address at its bound",
                    logging.WARNING,
                    "connections: refused a connection from %s: it already has %d open "
                    "([server] max_connections_per_address)",
                    key,
                    self.limits.max_per_address,
                )
                return False
        if self.total >= self.limits.max_connections and not self._evict_one():
            self.notices.note(
                "refusals at the total bound",
                logging.WARNING,
                "connections: refused a connection: %d open ([server] max_connections), all of them busy",
                self.total,
            )
            return False
        conn.key = key
        self.total += 1
        if key is not None:
            self.per_address[key] = self.per_address.get(key, 0) + 1
        conn.state = State.HEADERS
        self.headers[conn] = asyncio.get_running_loop().time()
        return True

    def _evict_one(self) -> bool:
        """At the total bound, the oldest connection that is not in a request (idle
        keep-alive, or still without its headers) is closed to let a new one in. A
        careful operator wants this rather than refusing the newcomer: a flood of silent
        connections then costs only themselves, while a connection in the middle of a
        request (an answer streaming to someone) is never the one that goes."""
        candidates = [next(iter(queue.items())) for queue in (self.headers, self.idle) if queue]
        if not candidates:
            return False
        victim, _ = min(candidates, key=lambda item: item[1])
        self.notices.note(
            "connections closed at the total bound",
            logging.WARNING,
            "connections: %d open ([server] max_connections): closed the oldest one not in a request "
            "to let a new one in",
            self.total,
        )
        victim.close()
        return True

    def forget(self, conn: Connection) -> None:
        """The connection is closed (or was never let in): its counts go at once."""
        if conn.state is None:
            return
        self.headers.pop(conn, None)
        self.idle.pop(conn, None)
        self.bodies.pop(conn, None)
        conn.state = None
        self.total -= 1
        if conn.key is not None:
            left = self.per_address[conn.key] - 1
            if left:
                self.per_address[conn.key] = left
            else:
                del self.per_address[conn.key]

    # --- deadlines -------------------------------------------------------------------

    def sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        cutoff = now - self.limits.header_timeout
        for _ in range(4 * MAX_CUTS_PER_SWEEP):  # a close costs less than a 408
            if not self.headers:
                break
            conn, since = next(iter(self.headers.items()))
            if since > cutoff:
                break
            self.notices.note(
                "connections closed without complete request headers",
                logging.INFO,
                "connections: closed one from %s: no complete request headers in %g s ([server] header_timeout)",
                conn.key or "a trusted proxy",
                self.limits.header_timeout,
            )
            conn.close()  # forget() takes it out of the queue
        cutoff = now - self.limits.body_timeout
        for _ in range(MAX_CUTS_PER_SWEEP):
            if not self.bodies:
                break
            conn, (since, payload) = next(iter(self.bodies.items()))
            if since > cutoff:
                break
            del self.bodies[conn]
            if not payload.is_eof():
                # The handler reading it answers 408; a handler that already answered is in
                # aiohttp's lingering read, which ends quietly on a TimeoutError.
                payload.set_exception(BodyTimeout())
        self.notices.flush()

    async def _sweep_forever(self) -> None:
        # One timer for every connection instead of one each; deadlines are kept to a tick.
        tick = min(SWEEP_INTERVAL, self.limits.header_timeout / 4, self.limits.body_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            try:
                self.sweep()
            except Exception:  # one bad sweep must not end the deadlines for good
                log.exception("connection sweep failed")


class Connection(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection: lets it in (or not),
    and tells the table when its bytes start a new request after keep-alive."""

    __slots__ = ("inner", "key", "state", "table", "transport")

    def __init__(self, table: ConnectionTable) -> None:
        self.table = table
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.key: str | None = None
        self.state: State | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's is one without the class
        self.transport = transport
        if not self.table.admit(self, transport):
            transport.abort()  # at once, before aiohttp's protocol is even made
            return
        assert self.table.make_handler is not None
        self.inner = self.table.make_handler()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.state is State.IDLE:
            # A new request begins: its headers have header_timeout from now.
            table = self.table
            del table.idle[self]
            self.state = State.HEADERS
            table.headers[self] = asyncio.get_running_loop().time()
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.forget(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)
        self.transport = None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def close(self) -> None:
        self.table.forget(self)
        if self.transport is not None:
            self.transport.close()

    def request_started(self, payload: StreamReader) -> None:
        table = self.table
        if self.state is State.HEADERS:
            del table.headers[self]
        elif self.state is State.IDLE:  # a pipelined request, parsed before its turn
            del table.idle[self]
        else:
            return  # closed meanwhile
        self.state = State.REQUEST
        table.bodies.pop(self, None)
        if not payload.is_eof():
            table.bodies[self] = (asyncio.get_running_loop().time(), payload)

    def request_ended(self, payload: StreamReader) -> None:
        if self.state is not State.REQUEST:
            return
        table = self.table
        if payload.is_eof():
            table.bodies.pop(self, None)
        # else: its deadline still bounds aiohttp's lingering read of the rest
        self.state = State.IDLE
        table.idle[self] = asyncio.get_running_loop().time()


@web.middleware
async def connection_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Marks the start and end of each request on its connection, and answers a body
    that missed its deadline with 408 (the connection then closes: its rest is unread)."""
    transport = request.transport
    conn = transport.get_protocol() if transport is not None else None
    if not isinstance(conn, Connection):
        return await handler(request)
    payload = request.content
    conn.request_started(payload)
    try:
        return await handler(request)
    except BodyTimeout:
        raise ApiError(
            408,
            "request_timeout",
            f"The request body did not arrive within {conn.table.limits.body_timeout:g} s.",
        ) from None
    finally:
        conn.request_ended(payload)
