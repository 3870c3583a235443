"""Who a request comes from, for per-client limits: the peer address, or the client
named in X-Forwarded-For when the peer is a trusted proxy."""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address

from aiohttp import web

Networks = Sequence[IPv4Network | IPv6Network]


def _trusted(address: str, proxies: Networks) -> bool:
    try:
        parsed = ip_address(address.strip())
    except ValueError:
        return False
    return any(parsed in network for network in proxies)


def client_address(request: web.Request, proxies: Networks) -> str:
    """The rightmost address that is not a trusted proxy (the leftmost ones can be forged)."""
    peer = request.remote or "unknown"
    if not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", []) for hop in header.split(",")]
    for hop in reversed(hops):
        if hop and not _trusted(hop, proxies):
            try:
                return str(ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: fall back to the proxy itself
    return peer


class RateWindow:
    """At most `limit` events per client in any `period` seconds (a sliding window)."""

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = period
        self._seen: defaultdict[str, deque[float]] = defaultdict(deque)

    def hit(self, client: str, now: float) -> int:
        """Counts one event; 0 if allowed, else the seconds to wait before the next one."""
        seen = self._seen[client]
        while seen and seen[0] <= now - self.period:
            seen.popleft()
        if len(seen) >= self.limit:
            return max(1, math.ceil(seen[0] + self.period - now))
        seen.append(now)
        return 0

    def forget_idle(self, now: float) -> None:
        """Drops clients with nothing in the window (called by the monitor now and then)."""
        for client in [c for c, seen in self._seen.items() if not seen or seen[-1] <= now - self.period]:
            del self._seen[client]
