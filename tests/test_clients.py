"""Per-client limits: who the client is behind a proxy, and the rate of new answers."""

from __future__ import annotations

from ipaddress import ip_network

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from server.access.clients import RateWindow, client_address

from .conftest import StartRill

PROXIES = (ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"))


def request_from(peer: str, forwarded: str | None = None) -> web.Request:
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    request = make_mocked_request("GET", "/", headers=headers)
    request._transport_peername = (peer, 50000)  # what request.remote reads
    return request


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", None, "203.0.113.9"),  # no proxy
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # not a trusted proxy: the header is ignored
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # nginx on this host
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the leftmost can be forged
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),  # a chain of trusted proxies
        ("127.0.0.1", "10.1.2.3", "127.0.0.1"),  # only proxies: the nearest one
        ("127.0.0.1", "not-an-address", "127.0.0.1"),  # garbage
        ("127.0.0.1", "2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_address(peer: str, forwarded: str | None, client: str) -> None:
    request = request_from(peer, forwarded)
    assert client_address(request, PROXIES) == client


def test_rate_window_slides() -> None:
    window = RateWindow(limit=2, period=60.0)
    assert window.hit("a", 0.0) == 0
    assert window.hit("a", 10.0) == 0
    assert window.hit("a", 20.0) == 40  # the first one leaves the window at 60
    assert window.hit("b", 20.0) == 0  # per client
    assert window.hit("a", 60.0) == 0
    window.forget_idle(200.0)
    assert window.hit("a", 200.0) == 0


async def test_new_answers_per_minute_are_limited_per_forwarded_client(start_rill: StartRill) -> None:
    # An open Rill behind a proxy that guards access itself must name its host.
    rill = await start_rill(
        limits={"generations_per_minute": 2, "max_concurrent_per_client": 50}, access={"allowed_hosts": ["127.0.0.1"]}
    )

    async def post(client: str) -> tuple[int, dict[str, object], str | None]:
        async with rill.session.post(
            rill.url / "api/chat",
            json={"messages": [{"role": "user", "content": "Hi"}]},
            headers={"X-Forwarded-For": client},
        ) as response:
            return response.status, await response.json(), response.headers.get("Retry-After")

    assert (await post("198.51.100.1"))[0] == 201
    assert (await post("198.51.100.1"))[0] == 201
    status, body, retry_after = await post("198.51.100.1")
    assert status == 429
    assert body["error"]["code"] == "rate_limited"  # type: ignore[index]
    assert retry_after is not None
    assert 1 <= int(retry_after) <= 60
    assert (await post("198.51.100.2"))[0] == 201  # another client behind the same proxy
