"""Request ids on responses and log lines; JSON log lines for log shippers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.ops.logs import JsonFormatter, RequestIdFilter

from .conftest import Rill

ROOT = Path(__file__).resolve().parent.parent


async def test_every_response_has_a_request_id_and_a_proxys_id_is_kept(rill: Rill) -> None:
    async with rill.session.get(rill.url / "api/models") as response:
        generated = response.headers["X-Request-ID"]
    assert len(generated) == 16
    async with rill.session.get(rill.url / "api/models", headers={"X-Request-ID": "nginx-42.a"}) as response:
        assert response.headers["X-Request-ID"] == "nginx-42.a"
    async with rill.session.get(rill.url / "api/models", headers={"X-Request-ID": "<script>"}) as response:
        assert response.headers["X-Request-ID"] != "<script>"
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)  # the event stream too
    assert len(reader.response.headers["X-Request-ID"]) == 16
    async with rill.session.get(rill.url / "no/such/page") as response:
        assert response.status == 404  # error responses too
        assert "X-Request-ID" in response.headers


async def test_log_lines_written_during_a_request_carry_its_id(rill: Rill, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        async with rill.session.post(
            rill.url / "api/chat", json={"messages": "nope"}, headers={"X-Request-ID": "trace-me"}
        ) as response:
            assert response.status == 400
    lines = [r for r in caplog.records if r.name == "server.http.errors"]
    assert lines
    assert {getattr(r, "request_id", None) for r in lines} == {"trace-me"}
    access = [r for r in caplog.records if r.name == "aiohttp.access"]
    assert access
    assert access[-1].request_id == "trace-me"  # type: ignore[attr-defined]


def test_json_lines() -> None:
    record = logging.LogRecord("server.x", logging.WARNING, __file__, 1, "hello %s", ("世界",), None)
    RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello 世界"
    assert line["level"] == "WARNING"
    assert line["logger"] == "server.x"
    assert line["request_id"] == "-"  # outside a request
    assert line["time"].endswith("+00:00")


def test_python_m_server_writes_json_lines_when_asked(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env |= {"RILL_LOG_FORMAT": "json", "RILL_PORT": "0", "PYTHONPATH": str(ROOT), "RILL_STATE_DIR": str(tmp_path)}
    with subprocess.Popen(
        [sys.executable, "-m", "server"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    ) as process:
        try:
            assert process.stderr is not None
            lines = []
            for raw in process.stderr:  # every line is JSON, up to "listening on"
                lines.append(json.loads(raw))
                if "listening on" in lines[-1]["message"]:
                    break
        finally:
            process.terminate()
    assert lines[-1]["level"] == "INFO"
    assert lines[-1]["logger"] == "server"
    assert {line["request_id"] for line in lines} == {"-"}  # outside any request


def test_the_text_format_writes_times_as_logging_does_though_once_a_second() -> None:
    from server.ops.logs import TEXT_FORMAT, TextFormatter

    ours, logging_own = TextFormatter(TEXT_FORMAT), logging.Formatter(TEXT_FORMAT)
    base = 1796560064.0  # 2026-12-06, any second
    for created in (base + 0.001, base + 0.5, base + 0.999, base + 1.0, base + 1.25, base + 0.75, base + 86400.042):
        record = logging.LogRecord("server", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.formatTime(record) == logging_own.formatTime(record)
    assert ours.formatTime(record, "%H:%M") == logging_own.formatTime(record, "%H:%M")
