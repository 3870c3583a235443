"""Who a request comes from, for per-client limits: the peer address, or the client
named in X-Forwarded-For when the peer is a trusted proxy."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address

from aiohttp import web

Networks = Sequence[IPv4Network | IPv6Network]


def is_trusted_proxy(address: str, proxies: Networks) -> bool:
    try:
        parsed = ip_address(address.strip())
    except ValueError:
        return False
    return any(parsed in network for network in proxies)


def client_address(request: web.Request, proxies: Networks) -> str:
    """The rightmost address that is not a trusted proxy (the leftmost ones can be forged)."""
    peer = request.remote or "unknown"
    if not is_trusted_proxy(peer, proxies):
        return peer
    hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", []) for hop in header.split(",")]
    for hop in reversed(hops):
        if hop and not is_trusted_proxy(hop, proxies):
            try:
                return str(ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: fall back to the proxy itself
    return peer


class RateWindow:
    """At most `limit` events per client in any `period` seconds (a sliding window).

    Remembers at most `max_clients` clients (the least recently seen go first), so a
    flood of addresses costs bounded memory; a forgotten client simply starts afresh."""

    def __init__(self, limit: int, period: float = 60.0, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.period = period
        self.max_clients = max_clients
        self._seen: dict[str, list[float]] = {}  # lists: a deque reserves ~600 bytes each
        self._swept_at = 0.0

    def hit(self, client: str, now: float) -> int:
        """Counts one event; 0 if allowed, else the seconds to wait before the next one."""
        wait = self.wait(client, now)
        if not wait:
            self.add(client, now)
        return wait

    def wait(self, client: str, now: float) -> int:
        """Seconds until `client` may have another event (0: now), counting nothing."""
        seen = self._seen.get(client)
        if not seen:
            return 0
        # Times are in order: find the first one still in the window without a scan.
        del seen[: bisect_right(seen, now - self.period)]
        if len(seen) >= self.limit:
            return max(1, math.ceil(seen[0] + self.period - now))
        return 0

    def add(self, client: str, now: float) -> None:
        seen = self._seen.pop(client, [])  # re-inserted last: the dict stays in order of use
        seen.append(now)
        if len(seen) > self.limit:
            del seen[: -self.limit]  # older ones can never matter again
        self._seen[client] = seen
        while len(self._seen) > self.max_clients:
            del self._seen[next(iter(self._seen))]
        if now - self._swept_at >= self.period:
            self.forget_idle(now)

    def forget_idle(self, now: float) -> None:
        """Drops clients with nothing in the window (done by `add` at most once a period)."""
        self._swept_at = now
        for client in [c for c, seen in self._seen.items() if not seen or seen[-1] <= now - self.period]:
            del self._seen[client]

    def __len__(self) -> int:
        return len(self._seen)
