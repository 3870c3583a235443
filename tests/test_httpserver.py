"""aiohttp's own parser refusals: JSON like every other error, nothing of the request
echoed, and logged at INFO without header values. Also pins the aiohttp internals
server/http/httpserver.py relies on (aiohttp 3.14.5): an upgrade that changes them fails here."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from server.http.httpserver import RillSite, _JsonRefusals

from .conftest import CHECKOUT, Rill, StartRill
from .test_connections import HOLD, closed_within, connect, head_and_body

# An access token read from a file with Windows line endings: a bare CR ends the line.
TOKEN = "tok-8d1f0c7e5b3a9624"


def request_with(rill: Rill, *lines: bytes, start: bytes = b"GET /healthz HTTP/1.1") -> bytes:
    host = f"Host: {rill.url.host}:{rill.url.port}".encode()
    return b"\r\n".join([start, host, *lines]) + b"\r\n\r\n"


def all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the log holds: messages, their arguments, tracebacks."""
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(repr(record.exc_info[1]))
            parts.append(logging.Formatter().formatException(record.exc_info))
        if record.exc_text:
            parts.append(record.exc_text)
    return "\n".join(parts)


BAD_REQUESTS: dict[str, Callable[[Rill], bytes]] = {
    "bare-CR-after-a-token": lambda rill: request_with(rill, f"Authorization: Bearer {TOKEN}\r".encode()),
    "bare-CR-inside-a-header": lambda rill: request_with(rill, f"X-Token: {TOKEN}\rX-Other: 1".encode()),
    "header-too-long": lambda rill: request_with(rill, f"X-Token: {TOKEN}".encode() + b"a" * 9000),
    "bad-method": lambda rill: request_with(rill, start=f"G{TOKEN}@ / HTTP/1.1".encode()),
    "bad-header-name": lambda rill: request_with(rill, f"X {TOKEN}: 1".encode()),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_a_parser_refusal_is_json_echoes_nothing_and_logs_no_header_value(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    caplog.set_level(logging.DEBUG)
    rill = await start_rill()
    reader, writer = await connect(rill)
    writer.write(BAD_REQUESTS[name](rill))
    raw = await closed_within(reader, HOLD)  # answered, then closed
    writer.close()
    status, headers, body = head_and_body(raw)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request"
    assert "not valid HTTP" in error["message"]
    assert TOKEN.encode() not in raw
    assert TOKEN not in all_log_text(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    refusals = [r for r in caplog.records if "refused a malformed request" in r.getMessage()]
    assert len(refusals) == 1


async def test_the_server_keeps_serving_after_parser_refusals(start_rill: StartRill) -> None:
    rill = await start_rill()
    for make in BAD_REQUESTS.values():
        reader, writer = await connect(rill)
        writer.write(make(rill))
        await closed_within(reader, HOLD)
        writer.close()
    async with rill.session.get(rill.url / "healthz") as response:
        assert response.status == 200


# --- the aiohttp internals httpserver.py relies on --------------------------------------


async def test_aiohttp_makes_the_request_handler_that_httpserver_takes_over(start_rill: StartRill) -> None:
    rill = await start_rill()
    server = rill.runner.server
    assert server is not None
    handler = server()
    assert type(handler) is RequestHandler  # else the class swap is skipped: refusals echo again
    handler.__class__ = _JsonRefusals  # needs the same layout: no slots of its own
    assert _JsonRefusals.__slots__ == ()
    assert "handle_error" in RequestHandler.__dict__


async def test_the_site_is_the_runners_and_closes_with_it(start_rill: StartRill) -> None:
    rill = await start_rill()
    (site,) = rill.runner.sites
    assert isinstance(site, RillSite)
    assert rill.runner.addresses[0][1] == rill.url.port  # read from BaseSite._server
    await rill.runner.cleanup()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", rill.url.port)  # stop() closed BaseSite._server


async def test_a_plain_aiohttp_handler_still_echoes(aiohttp_raw_server: object) -> None:
    """What httpserver.py guards against: if this stops failing the aiohttp way, the
    refusal path moved and _JsonRefusals may no longer be called."""

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok")

    server = await aiohttp_raw_server(handler)  # type: ignore[operator]
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\r\n\r\n")
    raw = await closed_within(reader, HOLD)
    writer.close()
    assert raw.startswith(b"HTTP/1.0 400")
    assert TOKEN.encode() in raw  # aiohttp 3.14.5 echoes the line; Rill's site must not


def test_aiohttp_is_the_pinned_version() -> None:
    assert aiohttp.__version__ == "3.14.5"  # httpserver.py and bodytap.py were checked against it


def test_rill_lifts_its_open_file_limit_to_the_hard_one() -> None:
    """A shell's soft limit is often 1,024 under a far higher hard one (the unit's
    LimitNOFILE sets both): every connection is a file, so Rill takes what it may."""
    script = (
        "import resource\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from server.http.httpserver import raise_open_file_limit\n"
        "assert raise_open_file_limit() == hard\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=CHECKOUT, check=True, timeout=30)
