"""Log forging: nothing a client sends can start a log line of its own. Control
characters (C0, DEL, C1), the Unicode line and paragraph separators, bidi controls and
lone surrogates are escaped in every field, in the text and the JSON format; a
traceback keeps its lines, each marked as a continuation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from server.ops.logs import CONTINUATION, escape_block, escape_controls, log_handler

from .conftest import Rill, StartRill
from .fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
# How every text record starts (TEXT_FORMAT): a line that does not is a continuation.
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
FORGED = "2026-12-06 06:00:00,000 WARNING server.http.views_session [-]: signed in with access token admin"
# Everything a line could be broken or disguised with, one of each kind.
UNSAFE = {
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\x00": "\\x00",
    "\x1b": "\\x1b",
    "\x7f": "\\x7f",
    "\x85": "\\x85",  # NEL, a C1 control that str.splitlines() breaks at
    "\x9b": "\\x9b",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
    "\u202e": "\\u202e",  # right-to-left override
    "\u2066": "\\u2066",
    "\ud800": "\\ud800",
}


@pytest.mark.parametrize(("char", "shown"), UNSAFE.items(), ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_unsafe_characters_are_escaped(char: str, shown: str) -> None:
    assert escape_controls(f"a{char}b") == f"a{shown}b"


def test_text_is_otherwise_left_alone() -> None:
    text = "GET /api/chat 世界 é \U0001f600 \\ \"quoted\" 'x' %0A"
    assert escape_controls(text) == text


def test_a_block_keeps_its_lines_and_marks_every_one_after_the_first() -> None:
    block = escape_block(f"Traceback (most recent call last):\n  File 'x'\nValueError: a\n{FORGED}\rtail\n")
    lines = block.split("\n")
    assert lines[0] == "Traceback (most recent call last):"
    assert all(line.startswith(CONTINUATION) for line in lines[1:])
    assert lines[-1] == f"{CONTINUATION}{FORGED}\\rtail"


class Captured:
    """What Rill's own handler (log_handler, as configure_logging builds it) writes."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.stream = io.StringIO()
        self.handler = log_handler(json_lines, self.stream)
        self.count = 0

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()  # splitlines: it breaks at U+2028 and NEL too


@pytest.fixture(params=[False, True], ids=["text", "json"])
def captured(request: pytest.FixtureRequest) -> Iterator[Captured]:
    capture = Captured(request.param)

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            capture.count += 1

    root = logging.getLogger()
    counter = Count()
    loggers = [logging.getLogger("server"), logging.getLogger("aiohttp"), logging.getLogger("forging")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    root.addHandler(capture.handler)
    root.addHandler(counter)
    try:
        yield capture
    finally:
        root.removeHandler(capture.handler)
        root.removeHandler(counter)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_one_line_per_record(capture: Captured, json_lines: bool) -> str:
    """Each record is one physical line; returns the whole text for the escape checks."""
    lines = capture.lines()
    assert len(lines) == capture.count, lines
    for line in lines:
        if json_lines:
            record = json.loads(line)
            assert set(record) >= {"time", "level", "logger", "message", "request_id"}
            for value in record.values():
                assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202e]", value), value
        else:
            assert RECORD_START.match(line), line
    # What a reader of the JSON sees after decoding is escaped too, not just the wire.
    return "\n".join(json.loads(line)["message"] for line in lines) if json_lines else "\n".join(lines)


# Percent-encoded in the URL path, decoded by aiohttp into request.path, which is logged
# by the error middleware and the access log.
PATHS = {
    "%0A": "\\n",
    "%0D": "\\r",
    "%1B%5B31m": "\\x1b[31m",
    "%7F": "\\x7f",
    "%C2%85": "\\x85",
    "%E2%80%A8": "\\u2028",
    "%E2%80%A9": "\\u2029",
    "%E2%80%AE": "\\u202e",
    "%00": "\\x00",
}


async def get(rill: Rill, target: str, **headers: str) -> int:
    async with rill.session.get(URL(str(rill.url) + target, encoded=True), headers=headers) as response:
        await response.read()
        return response.status


async def test_control_characters_in_the_path_are_escaped(rill: Rill, captured: Captured) -> None:
    json_lines = captured.json_lines
    forged = FORGED.replace(" ", "%20").replace("[", "%5B").replace("]", "%5D")
    assert await get(rill, f"/nothing%0A{forged}") == 404
    for encoded in PATHS:
        assert await get(rill, f"/x{encoded}y") == 404
    await asyncio.sleep(0.05)  # the access log is written just after the response
    text = check_one_line_per_record(captured, json_lines)
    assert f"/nothing\\n{FORGED}" in text  # the fake line is there, visibly inside the real one
    for shown in PATHS.values():
        assert f"/x{shown}y" in text, shown


async def test_control_characters_in_headers_are_escaped(start_rill: StartRill, captured: Captured) -> None:
    """Origin is logged when refused; the HTTP parser lets obs-text through (UTF-8 line
    separators, NEL, bidi overrides) and refuses raw C0 controls itself."""
    json_lines = captured.json_lines
    rill = await start_rill()
    for char, shown in [("\u2028", "\\u2028"), ("\x85", "\\x85"), ("\u202e", "\\u202e")]:
        origin = f"https://evil.example{char}{FORGED}"
        async with rill.session.post(
            rill.url / "api/chat", json={"messages": [{"role": "user", "content": "Hi"}]}, headers={"Origin": origin}
        ) as response:
            assert response.status == 403
        await asyncio.sleep(0.05)
        assert f"evil.example{shown}{FORGED}" in check_one_line_per_record(captured, json_lines)
    # User-Agent and X-Request-ID are not logged as sent at all.
    assert await get(rill, "/healthz", **{"User-Agent": f"ua\u2028{FORGED}", "X-Request-ID": "id\u2028x"}) == 200
    await asyncio.sleep(0.05)
    text = check_one_line_per_record(captured, json_lines)
    assert "ua\\u2028" not in text
    assert "id\\u2028" not in text


async def test_json_fields_never_reach_the_log(rill: Rill, captured: Captured) -> None:
    """Refused fields are named in the answer, not the log: the log has the code only."""
    json_lines = captured.json_lines
    async with rill.session.post(
        rill.url / "api/chat",
        json={"messages": [{"role": f"x\n{FORGED}", "content": "Hi"}], "model": f"m\n{FORGED}"},
    ) as response:
        assert response.status == 400
    async with rill.session.post(rill.url / "api/chat", json={f"k\n{FORGED}": 1, "messages": []}) as response:
        assert response.status == 400
    await asyncio.sleep(0.05)
    text = check_one_line_per_record(captured, json_lines)
    assert "signed in with access token admin" not in text


def test_a_forged_line_in_an_exception_message_stays_inside_its_traceback(captured: Captured) -> None:
    json_lines = captured.json_lines
    log = logging.getLogger("forging")
    try:
        try:
            raise KeyError(f"inner\u2028{FORGED}")
        except KeyError as exc:
            raise ValueError(f"outer\n{FORGED}\r\n{FORGED}\x1b[2K") from exc
    except ValueError:
        log.exception("request failed for %s", f"x\n{FORGED}")
    lines = captured.lines()
    if json_lines:
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["message"] == f"request failed for x\\n{FORGED}"
        block = record["exception"].split("\n")
        assert block[0] == "Traceback (most recent call last):"
    else:
        assert RECORD_START.match(lines[0])
        assert lines[0].endswith(f"request failed for x\\n{FORGED}")
        block = lines[1:]
        assert block[0] == f"{CONTINUATION}Traceback (most recent call last):"
    assert all(line.startswith(CONTINUATION) for line in block[1:]), block
    joined = "\n".join(block)
    assert f"{CONTINUATION}{FORGED}\\r" in joined  # readable, but marked as part of the traceback
    assert "\\x1b[2K" in joined
    assert f"inner\\u2028{FORGED}" in joined
    assert "ValueError: outer" in joined  # the traceback itself is all there
    assert "The above exception was the direct cause" in joined


@pytest.mark.parametrize("json_lines", [False, True], ids=["text", "json"])
def test_python_m_server_escapes_what_clients_send(tmp_path: Path, json_lines: bool) -> None:
    """End to end: configure_logging in `python -m server` installs the escaping handler."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env |= {"RILL_PORT": str(port), "PYTHONPATH": str(ROOT), "RILL_LOG_FORMAT": "json" if json_lines else "text"}
    with subprocess.Popen(
        [sys.executable, "-m", "server"],
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="strict",
        env=env,
        cwd=tmp_path,
    ) as process:
        assert process.stderr is not None
        try:
            for line in process.stderr:
                if "listening on" in line:
                    break
            target = "/a%0A" + FORGED.replace(" ", "%20").replace("[", "%5B").replace("]", "%5D") + "%E2%80%A8%1B"
            send_raw(port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            time.sleep(0.3)
        finally:
            process.terminate()
        rest = process.stderr.read()
    lines = rest.splitlines()
    for line in lines:
        if json_lines:
            json.loads(line)
        else:
            assert RECORD_START.match(line), line
    messages = [json.loads(line)["message"] for line in lines] if json_lines else lines
    assert any(f"/a\\n{FORGED}\\u2028\\x1b" in message for message in messages), rest


def send_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received
