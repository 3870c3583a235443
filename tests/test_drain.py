"""The real process's stop: SIGTERM turns Rill not ready while it still listens for
[server] drain_delay (a load balancer polling /readyz sees 503, not refused
connections), then the listener closes, live streams end, and it exits 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from .conftest import KEY_ENV, SENTINEL_KEY, server_env, spawn_server
from .fakes import FakeUpstream, Reply, StreamReader, answer, chunk, free_port, terminal, text_of
from .test_process import CONFIG_TEMPLATE, LOG_NAME, next_notification

Started = tuple[URL, asyncio.subprocess.Process, socket.socket]
StartProcess = Callable[..., Awaitable[Started]]


@pytest.fixture
async def start_process(
    fake_upstream: FakeUpstream, tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> AsyncIterator[StartProcess]:
    processes: list[asyncio.subprocess.Process] = []
    log_file = (tmp_path / LOG_NAME).open("wb")

    async def start(drain_delay: float, drain_timeout: float = 0.0, listener: socket.socket | None = None) -> Started:
        """Rill as `python -m server`; with `listener`, on that socket as systemd passes
        one (fd 3, $LISTEN_FDS, $LISTEN_PID naming the process)."""
        config = tmp_path / "config.toml"
        text = CONFIG_TEMPLATE.format(upstream=fake_upstream.url, key_env=KEY_ENV)
        drain = f"drain_delay = {drain_delay}\ndrain_timeout = {drain_timeout}"
        config.write_text(text.replace("shutdown_timeout = 3.0", f"shutdown_timeout = 3.0\n{drain}"))
        port = free_port() if listener is None else listener.getsockname()[1]
        # With a socket from systemd, [server] port is unused: another free port shows it.
        env = server_env(config, port if listener is None else free_port(), NOTIFY_SOCKET=notify_socket[0])
        process = await spawn_server(env, tmp_path, log_file, listener)
        processes.append(process)
        assert await next_notification(notify_socket[1]) == "READY=1"
        return URL.build(scheme="http", host="127.0.0.1", port=port), process, notify_socket[1]

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log_file.close()


async def get_fresh(url: URL) -> tuple[int, dict[str, object]]:
    """On a new connection each time, as a load balancer's health check does."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_sigterm_turns_not_ready_and_keeps_listening_for_the_drain_delay(
    start_process: StartProcess, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    drain = 4.0  # long enough for the checks below on a busy machine
    url, process, notifications = await start_process(drain)
    fake_upstream.script(Reply(chunks=[chunk("so far")], end="hang"))
    async with aiohttp.ClientSession() as session:
        async with session.post(url / "api/chat", json={"messages": [{"role": "user", "content": "q"}]}) as response:
            assert response.status == 201
            generation_id = (await response.json())["id"]
        reader = StreamReader(await session.get(url / f"api/chat/{generation_id}/events"))
        await reader.read_until("delta")

        loop = asyncio.get_running_loop()
        signalled = loop.time()
        process.send_signal(signal.SIGTERM)
        assert await next_notification(notifications) == "STOPPING=1"  # first, as before

        # During the drain: still listening, not ready, no new answers, the rest served.
        polls = 0
        while loop.time() - signalled < 1.5:
            status, body = await get_fresh(url / "readyz")
            assert (status, body) == (503, {"ready": False, "status": "shutting_down"})
            polls += 1
            await asyncio.sleep(0.1)
        assert polls >= 3
        status, body = await get_fresh(url / "healthz")
        assert status == 200
        assert body["status"] == "shutting_down"
        async with session.post(url / "api/chat", json={"messages": [{"role": "user", "content": "q"}]}) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "shutting_down"
        assert not reader.response.content.at_eof()  # the live stream goes on meanwhile

        # After it: the listener is closed and the live stream ends as it always did.
        events = await reader.read_all(timeout=10)
        assert terminal(events).data["code"] == "server_shutdown"
        assert text_of(events) == "so far"
        assert loop.time() - signalled >= drain * 0.9
        reader.response.close()
        async with asyncio.timeout(10):
            while True:
                try:
                    await get_fresh(url / "readyz")
                except aiohttp.ClientConnectionError:
                    break  # refused: the listener is closed
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    output = (tmp_path / LOG_NAME).read_text()
    assert "drain_delay" in output
    assert "Traceback" not in output
    assert SENTINEL_KEY not in output


async def test_a_second_signal_ends_the_drain_early(start_process: StartProcess) -> None:
    url, process, notifications = await start_process(60.0)
    process.send_signal(signal.SIGTERM)
    assert await next_notification(notifications) == "STOPPING=1"
    assert (await get_fresh(url / "readyz"))[0] == 503
    loop = asyncio.get_running_loop()
    started = loop.time()
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(10):
        assert await process.wait() == 0
    assert loop.time() - started < 10


async def test_without_a_drain_delay_the_stop_is_immediate(start_process: StartProcess) -> None:
    _, process, notifications = await start_process(0.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    process.send_signal(signal.SIGTERM)
    assert await next_notification(notifications) == "STOPPING=1"
    async with asyncio.timeout(10):
        assert await process.wait() == 0
    assert loop.time() - started < 3.0


async def test_a_port_in_use_is_one_line_and_exit_1(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TEMPLATE.format(upstream=fake_upstream.url, key_env=KEY_ENV))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = server_env(config, port)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 1
    assert f"rill: cannot listen on http://127.0.0.1:{port}: " in stderr.decode()
    assert "Traceback" not in stderr.decode()


async def answer_under_way(session: aiohttp.ClientSession, url: URL) -> StreamReader:
    """An answer started and read until its first piece of text."""
    async with session.post(url / "api/chat", json={"messages": [{"role": "user", "content": "q"}]}) as response:
        generation_id = (await response.json())["id"]
    reader = StreamReader(await session.get(url / f"api/chat/{generation_id}/events"))
    await reader.read_until("delta")
    return reader


async def refused(url: URL) -> bool:
    try:
        await get_fresh(url / "healthz")
    except aiohttp.ClientConnectionError:
        return True
    return False


async def test_with_a_drain_timeout_answers_in_flight_finish_with_the_listener_closed(
    start_process: StartProcess, fake_upstream: FakeUpstream
) -> None:
    tokens = [f"t{i} " for i in range(25)]
    fake_upstream.script(Reply(chunks=answer(tokens, delay=0.08)))  # 2 s
    url, process, notifications = await start_process(0.0, drain_timeout=20.0)
    async with aiohttp.ClientSession() as session:
        reader = await answer_under_way(session, url)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        process.send_signal(signal.SIGTERM)
        assert await next_notification(notifications) == "STOPPING=1"
        async with asyncio.timeout(5):
            while not await refused(url):  # the listener closes at once (no drain_delay)
                await asyncio.sleep(0.05)
        events = await reader.read_all(timeout=10)  # while the answer streams on to its end
    assert text_of(events) == "".join(tokens)
    assert terminal(events).data == {"finish_reason": "stop"}
    async with asyncio.timeout(10):
        assert await process.wait() == 0
    assert loop.time() - signalled < 8  # it went once nothing was in flight, not at the timeout


async def test_an_answer_longer_than_the_drain_timeout_ends_with_server_shutdown_at_it(
    start_process: StartProcess, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Reply(chunks=[chunk("endless ")], end="hang"))
    url, process, _ = await start_process(0.0, drain_timeout=1.5)
    async with aiohttp.ClientSession() as session:
        reader = await answer_under_way(session, url)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        process.send_signal(signal.SIGTERM)
        events = await reader.read_all(timeout=10)
        ended = loop.time() - signalled
    assert terminal(events).data["code"] == "server_shutdown"
    assert 1.3 <= ended < 6
    async with asyncio.timeout(10):
        assert await process.wait() == 0


async def test_with_a_socket_from_systemd_a_restart_refuses_no_connection(
    start_process: StartProcess, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    # systemd holds the port (deploy/rill.socket): while one process stops and the next
    # starts, new connections wait in the socket's queue and are served by the next.
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    fake_upstream.script(Reply(chunks=[chunk("in flight ")], end="hang"))
    url, first, notifications = await start_process(0.0, drain_timeout=0.0, listener=listener)
    async with aiohttp.ClientSession() as session:
        reader = await answer_under_way(session, url)
        first.send_signal(signal.SIGTERM)
        assert await next_notification(notifications) == "STOPPING=1"
        ended = await reader.read_all(timeout=10)
        async with asyncio.timeout(10):
            assert await first.wait() == 0
        # Nobody accepts now; the request waits in the queue rather than being refused.
        waiting = asyncio.ensure_future(get_fresh(url / "healthz"))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        _, second, _ = await start_process(0.0, listener=listener)
        async with asyncio.timeout(10):
            status, health = await waiting
        assert (status, health["status"]) == (200, "ok")
        # The next process serves new answers on the same port.
        again = await answer_under_way(session, url)
        again.response.close()
    # An answer in flight at the restart ends retryably (resumed by nobody: it lived in
    # the process that stopped; a stored conversation keeps its text, Continue goes on).
    assert terminal(ended).data["code"] == "server_shutdown"
    assert terminal(ended).data["retryable"] is True
    log = (tmp_path / LOG_NAME).read_text()
    assert f"listening on http://127.0.0.1:{url.port} (" in log
    assert "socket from systemd" in log
    second.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await second.wait() == 0
    listener.close()
