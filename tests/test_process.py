"""The real process: `python -m server` serves, and SIGTERM ends live streams cleanly."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from server.__main__ import new_event_loop
from server.config import ConfigError

from .conftest import KEY_ENV, SENTINEL_KEY, server_env, spawn_server, wait_healthy
from .fakes import FakeUpstream, Reply, StreamReader, chunk, free_port, open_live_streams, terminal, text_of

LOG_NAME = "rill.log"  # the process's output, in the test's tmp_path

CONFIG_TEMPLATE = """
default_model = "fake-chat"

[server]
host = "127.0.0.1"
shutdown_timeout = 3.0

[[providers]]
name = "fake"
base_url = "{upstream}"
api_key_env = "{key_env}"

  [[providers.models]]
  id = "fake-chat"
  upstream_id = "fake-model"

[stream]
liveness_interval = 0.1

[limits]
max_concurrent_per_client = 300
max_concurrent_total = 300
generations_per_minute = 1000
max_streams_per_client = 1000
"""


async def next_notification(sock: socket.socket) -> str:
    async with asyncio.timeout(5):
        return (await asyncio.get_running_loop().sock_recv(sock, 4096)).decode()


@pytest.fixture(params=["asyncio", "uvloop"])
async def process_url(
    request: pytest.FixtureRequest,
    fake_upstream: FakeUpstream,
    tmp_path: Path,
    notify_socket: tuple[str, socket.socket],
) -> AsyncIterator[tuple[URL, asyncio.subprocess.Process]]:
    """The real process, on each event loop it can run on (RILL_EVENT_LOOP)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TEMPLATE.format(upstream=fake_upstream.url, key_env=KEY_ENV))
    port = free_port()
    env = server_env(config, port, NOTIFY_SOCKET=notify_socket[0], RILL_EVENT_LOOP=request.param)
    log_file = (tmp_path / LOG_NAME).open("wb")
    process = await spawn_server(env, tmp_path, log_file)
    url = URL.build(scheme="http", host="127.0.0.1", port=port)
    try:
        await wait_healthy(url, process)
        yield url, process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log_file.close()


async def test_sigterm_delivers_server_shutdown_and_exits_zero(
    process_url: tuple[URL, asyncio.subprocess.Process],
    fake_upstream: FakeUpstream,
    notify_socket: tuple[str, socket.socket],
    tmp_path: Path,
) -> None:
    url, process = process_url
    # systemd (Type=notify) hears READY=1 once Rill listens, and STOPPING=1 at SIGTERM.
    assert await next_notification(notify_socket[1]) == "READY=1"
    for _ in range(3):
        fake_upstream.script(Reply(chunks=[chunk("so far")], end="hang"))
    async with aiohttp.ClientSession() as session:
        readers = []
        for i in range(3):
            async with session.post(
                url / "api/chat", json={"messages": [{"role": "user", "content": f"q{i}"}]}
            ) as response:
                assert response.status == 201
                generation_id = (await response.json())["id"]
            reader = StreamReader(await session.get(url / f"api/chat/{generation_id}/events"))
            await reader.read_until("delta")
            readers.append(reader)

        loop = asyncio.get_running_loop()
        started = loop.time()
        process.send_signal(signal.SIGTERM)
        assert await next_notification(notify_socket[1]) == "STOPPING=1"
        for reader in readers:
            events = await reader.read_all()
            error = terminal(events)
            assert error.data["code"] == "server_shutdown"
            assert error.data["retryable"] is True
            assert text_of(events) == "so far"
            reader.response.close()
        async with asyncio.timeout(10):
            code = await process.wait()
        assert code == 0
        assert loop.time() - started < 3.0 * 2  # within aiohttp's worst case of 2 x shutdown_timeout
    assert all(seen.closed.is_set() for seen in fake_upstream.requests)
    assert fake_upstream.open == 0
    output = (tmp_path / LOG_NAME).read_text()
    assert SENTINEL_KEY not in output
    assert "Traceback" not in output


LIVE_STREAMS = 200


async def test_sigterm_under_load_ends_every_stream_and_closes_every_upstream_request(
    process_url: tuple[URL, asyncio.subprocess.Process], fake_upstream: FakeUpstream
) -> None:
    url, process = process_url
    for _ in range(LIVE_STREAMS):
        fake_upstream.script(Reply(chunks=[chunk("so far"), 0.2, chunk(" and"), 30.0], end="hang"))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        readers = await open_live_streams(session, url, LIVE_STREAMS)
        assert fake_upstream.open == LIVE_STREAMS

        loop = asyncio.get_running_loop()
        started = loop.time()
        process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*(reader.read_all(timeout=10) for reader in readers))
        for events in results:
            assert terminal(events).data["code"] == "server_shutdown"
            assert text_of(events).startswith("so far")
        for reader in readers:
            reader.response.close()
        async with asyncio.timeout(10):
            code = await process.wait()
        elapsed = loop.time() - started
    assert code == 0
    assert elapsed < 3.0  # the config's shutdown_timeout: streams end at once, not at the deadline
    await asyncio.sleep(0.2)  # the fake upstream's handlers see their connections close
    assert all(seen.closed.is_set() for seen in fake_upstream.requests)
    assert fake_upstream.open == 0


def test_event_loop_choice() -> None:
    loop, name = new_event_loop("asyncio")
    try:
        assert name == "asyncio"
        assert type(loop).__module__.startswith("asyncio.")
    finally:
        loop.close()
    with pytest.raises(ConfigError, match="RILL_EVENT_LOOP"):
        new_event_loop("trio")
    try:
        import uvloop
    except ImportError:
        loop, name = new_event_loop(None)
        loop.close()
        assert name == "asyncio"  # the default without uvloop
        return
    for choice in ("uvloop", "", None):
        loop, name = new_event_loop(choice)
        try:
            assert name == "uvloop"
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
