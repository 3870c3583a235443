"""Connections a client cannot hold forever: a body that stalls gets 408 and is closed,
headers that never complete are closed, and no address (nor all of them) may hold
more connections than the bounds, while everybody else is still served."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest

from server.http.connections import (
    MAX_CUTS_PER_SWEEP,
    BodyTimeout,
    Connection,
    ConnectionLimits,
    ConnectionTable,
    Notices,
    address_key,
)

from .conftest import Rill, StartRill, make_config
from .fakes import text_of

HOLD = 10.0  # how long a test waits for something that must happen much sooner


async def connect(rill: Rill, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection from `source`: any 127/8 address is this machine."""
    assert rill.url.port is not None
    return await asyncio.open_connection("127.0.0.1", rill.url.port, local_addr=(source, 0))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    async with asyncio.timeout(seconds):
        while True:
            try:
                piece = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not piece:
                return received
            received += piece


def head_and_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def get(rill: Rill, source: str, path: str = "/healthz") -> int:
    reader, writer = await connect(rill, source)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {rill.url.host}:{rill.url.port}\r\nConnection: close\r\n\r\n".encode()
        )
        status, _, _ = head_and_body(await closed_within(reader, HOLD))
        return status
    finally:
        writer.close()


def stalled_post(rill: Rill, path: str = "/api/chat") -> bytes:
    """The headers of a 64-byte JSON body, and its first byte."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {rill.url.host}:{rill.url.port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{"
    ).encode()


TOKENS = {"RILL_ACCESS_TOKENS": "alice:a1b2c3d4e5f6g7h8i9j0"}


@pytest.mark.parametrize(
    ("path", "environ"),
    [("/api/chat", {}), ("/api/session", TOKENS)],  # sign-in needs no token: anyone can do this
)
async def test_a_stalled_body_gets_408_json_and_is_closed_at_the_deadline(
    start_rill: StartRill, path: str, environ: dict[str, str]
) -> None:
    rill = await start_rill(server={"body_timeout": 1.0, "header_timeout": 30.0}, environ=environ)
    reader, writer = await connect(rill)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(stalled_post(rill, path))
    raw = await closed_within(reader, HOLD)
    elapsed = loop.time() - started
    writer.close()
    status, headers, body = head_and_body(raw)
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.9 <= elapsed < 1.0 + 3.0  # cut at the deadline, not before; closed right after
    assert rill.registry.live() == []


async def test_an_answer_sent_without_reading_the_body_still_closes_at_the_deadline(start_rill: StartRill) -> None:
    rill = await start_rill(server={"body_timeout": 1.0, "header_timeout": 30.0})
    reader, writer = await connect(rill)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(stalled_post(rill, "/no/such/page"))
    raw = await closed_within(reader, HOLD)  # aiohttp reads the rest after a 404 (lingering): not for long
    writer.close()
    assert head_and_body(raw)[0] == 404
    assert loop.time() - started < 1.0 + 3.0


async def test_a_trickled_body_cannot_stretch_the_deadline(start_rill: StartRill) -> None:
    rill = await start_rill(server={"body_timeout": 1.0, "header_timeout": 30.0})
    reader, writer = await connect(rill)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(stalled_post(rill).replace(b"Content-Length: 64", b"Content-Length: 6400"))

    async def trickle() -> None:
        while True:
            await asyncio.sleep(0.1)
            writer.write(b" ")  # a byte at a time: an idle-per-read timer would never fire

    trickling = asyncio.create_task(trickle())
    try:
        raw = await closed_within(reader, HOLD)
    finally:
        trickling.cancel()
    writer.close()
    assert head_and_body(raw)[0] == 408
    assert loop.time() - started < 1.0 + 3.0


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["nothing", "partial-headers"],
)
async def test_headers_that_never_complete_are_closed_at_the_deadline(start_rill: StartRill, sent: bytes) -> None:
    rill = await start_rill(server={"header_timeout": 1.0})
    reader, writer = await connect(rill)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(sent)
    raw = await closed_within(reader, HOLD)
    elapsed = loop.time() - started
    writer.close()
    assert raw == b""  # closed, nothing answered
    assert 0.9 <= elapsed < 1.0 + 3.0


async def test_trickled_headers_cannot_stretch_the_deadline(start_rill: StartRill) -> None:
    rill = await start_rill(server={"header_timeout": 1.0})
    reader, writer = await connect(rill)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def trickle() -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        while True:
            await asyncio.sleep(0.1)
            writer.write(b"X: y\r\n")

    trickling = asyncio.create_task(trickle())
    try:
        assert await closed_within(reader, HOLD) == b""
    finally:
        trickling.cancel()
    writer.close()
    assert loop.time() - started < 1.0 + 3.0


async def test_keep_alive_idle_is_not_cut_by_the_header_deadline(start_rill: StartRill) -> None:
    """Between requests the keep-alive timeout applies; the header clock starts again
    with the next request's first byte (nginx keeps idle connections to Rill for 60 s)."""
    rill = await start_rill(server={"header_timeout": 0.5, "keepalive_timeout": 30.0})
    reader, writer = await connect(rill)
    for _ in range(2):
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {rill.url.host}:{rill.url.port}\r\n\r\n".encode())
        async with asyncio.timeout(HOLD):
            status, headers, _ = head_and_body(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(int(headers["content-length"]))
        assert status == 200
        await asyncio.sleep(1.5)  # three header deadlines of idling
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # a next request that stalls: the clock runs again
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await closed_within(reader, HOLD) == b""
    assert loop.time() - started < 0.5 + 3.0
    writer.close()


async def test_keepalive_timeout_closes_an_idle_connection(start_rill: StartRill) -> None:
    rill = await start_rill(server={"keepalive_timeout": 1.0})
    reader, writer = await connect(rill)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: {rill.url.host}:{rill.url.port}\r\n\r\n".encode())
    loop = asyncio.get_running_loop()
    started = loop.time()
    raw = await closed_within(reader, HOLD)
    assert head_and_body(raw)[0] == 200
    assert 0.9 <= loop.time() - started < 1.0 + 3.0
    writer.close()


async def test_the_per_address_bound_closes_the_extra_connection_and_logs_once(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill(server={"max_connections_per_address": 3, "header_timeout": 30.0})
    held = [await connect(rill, "127.0.0.2") for _ in range(3)]
    await asyncio.sleep(0.1)
    extra = [await connect(rill, "127.0.0.2") for _ in range(5)]
    for reader, writer in extra:
        assert await closed_within(reader, HOLD) == b""  # closed at once, unanswered
        writer.close()
    warnings = [r for r in caplog.records if "max_connections_per_address" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].levelno == logging.WARNING
    assert "127.0.0.2" in warnings[0].getMessage()
    # The ones let in still work.
    reader, writer = held[0]
    writer.write(
        f"GET /healthz HTTP/1.1\r\nHost: {rill.url.host}:{rill.url.port}\r\nConnection: close\r\n\r\n".encode()
    )
    assert head_and_body(await closed_within(reader, HOLD))[0] == 200
    for _, writer in held:
        writer.close()


async def test_a_legitimate_client_is_served_while_another_address_is_at_its_bound(start_rill: StartRill) -> None:
    rill = await start_rill(server={"max_connections_per_address": 4, "header_timeout": 30.0, "body_timeout": 30.0})
    attacker = []
    for _ in range(4):  # at the bound with stalled bodies
        reader, writer = await connect(rill, "127.0.0.2")
        writer.write(stalled_post(rill))
        attacker.append((reader, writer))
    reader, writer = await connect(rill, "127.0.0.2")
    assert await closed_within(reader, HOLD) == b""  # the attacker's next one is refused
    writer.close()
    assert await get(rill, "127.0.0.3") == 200  # another address
    assert await get(rill, "127.0.0.1") == 200  # a trusted proxy: exempt from the bound anyway
    stream = await rill.open_stream(await rill.start_chat())  # a whole answer
    assert text_of(await stream.read_all()) == "Hello world"
    for _, writer in attacker:
        writer.close()


async def test_trusted_proxies_are_exempt_from_the_per_address_bound(start_rill: StartRill) -> None:
    rill = await start_rill(server={"max_connections_per_address": 2, "header_timeout": 30.0})
    held = [await connect(rill, "127.0.0.1") for _ in range(5)]  # 127.0.0.1: a trusted proxy by default
    for _, writer in held:
        writer.write(
            f"GET /healthz HTTP/1.1\r\nHost: {rill.url.host}:{rill.url.port}\r\nConnection: close\r\n\r\n".encode()
        )
    for reader, writer in held:
        assert head_and_body(await closed_within(reader, HOLD))[0] == 200
        writer.close()


async def test_at_the_total_bound_the_oldest_idle_connection_makes_room(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill(server={"max_connections": 3, "header_timeout": 30.0, "body_timeout": 30.0})
    oldest = await connect(rill, "127.0.0.2")
    await asyncio.sleep(0.05)
    silent = [await connect(rill, "127.0.0.3") for _ in range(2)]
    await asyncio.sleep(0.05)
    assert await get(rill, "127.0.0.4") == 200  # let in: the oldest silent one went
    assert await closed_within(oldest[0], HOLD) == b""
    warnings = [r for r in caplog.records if "max_connections" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    for _, writer in [oldest, *silent]:
        writer.close()


async def test_at_the_total_bound_with_every_connection_busy_a_new_one_is_refused(start_rill: StartRill) -> None:
    rill = await start_rill(server={"max_connections": 2, "header_timeout": 30.0, "body_timeout": 30.0})
    busy = []
    for source in ("127.0.0.2", "127.0.0.3"):
        reader, writer = await connect(rill, source)
        writer.write(stalled_post(rill))
        busy.append((reader, writer))
    await asyncio.sleep(0.2)  # both in their handlers, reading the body
    reader, writer = await connect(rill, "127.0.0.4")
    assert await closed_within(reader, HOLD) == b""
    writer.close()
    for _, writer in busy:
        writer.close()


async def test_notices_hold_back_repeats_and_count_them(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.http.connections")
    notices = Notices(interval=0.2)
    for _ in range(5):
        notices.note("refusals", logging.WARNING, "refused one from %s", "127.0.0.2")
    assert [r.getMessage() for r in caplog.records] == ["refused one from 127.0.0.2"]
    await asyncio.sleep(0.3)
    notices.flush()  # the interval is over: what was held back is told, even with nothing new
    assert re.fullmatch(r"connections: 4 more refusals in the last \d+ s", caplog.records[-1].getMessage())
    notices.note("refusals", logging.WARNING, "refused one from %s", "127.0.0.3")
    assert caplog.records[-1].getMessage() == "refused one from 127.0.0.3"


def test_the_total_bound_stays_under_the_open_file_limit(caplog: pytest.LogCaptureFixture) -> None:
    config = make_config("http://127.0.0.1:9/v1", server={"max_connections": 4096})
    assert ConnectionLimits.from_config(config, open_files=65536).max_connections == 4096
    limits = ConnectionLimits.from_config(config, open_files=1024)
    assert limits.max_connections < 1024 - config.limits.max_concurrent_total  # room for upstream sockets
    assert "LimitNOFILE" in caplog.text


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # a dual-stack listener's IPv4 client counts as itself
        ("2001:db8::1", "2001:db8::/64"),  # IPv6 clients hold whole /64s: counted per /64
        ("2001:db8::2", "2001:db8::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_addresses_are_counted_per_client(peer: str, key: str) -> None:
    assert address_key(peer)[0] == key


class StalledBody:
    def __init__(self) -> None:
        self.error: BaseException | None = None

    def is_eof(self) -> bool:
        return False

    def set_exception(self, error: BaseException) -> None:
        self.error = error


async def test_a_flood_of_expired_bodies_is_cut_a_few_at_a_time() -> None:
    """They all pass their deadline together; each cut wakes a handler to answer 408.
    Spread over sweeps, no turn of the loop does them all."""
    config = make_config("http://127.0.0.1:9/v1", server={"body_timeout": 1.0})
    table = ConnectionTable(ConnectionLimits.from_config(config))
    bodies = [StalledBody() for _ in range(MAX_CUTS_PER_SWEEP + 10)]
    long_ago = asyncio.get_running_loop().time() - 10
    for body in bodies:
        table.bodies[Connection(table)] = (long_ago, body)  # type: ignore[assignment]
    table.sweep()
    assert sum(isinstance(b.error, BodyTimeout) for b in bodies) == MAX_CUTS_PER_SWEEP
    table.sweep()
    assert all(isinstance(b.error, BodyTimeout) for b in bodies)
    assert not table.bodies
