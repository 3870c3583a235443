"""Shared mode with real processes (`python -m server`) on a real redis-server: POST on A,
read on B, resume on C; A killed with SIGKILL ends B's reader with `worker_lost`, text
kept; a Redis that cannot be reached at start stops Rill with exit 2."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from .conftest import KEY_ENV, SENTINEL_KEY, server_env, spawn_server
from .fakes import FakeUpstream, Reply, StreamReader, answer, chunk, free_port, terminal, text_of
from .test_process import CONFIG_TEMPLATE, next_notification

StartProcess = Callable[[], Awaitable[tuple[URL, asyncio.subprocess.Process]]]


@pytest.fixture
async def start_process(
    fake_upstream: FakeUpstream, tmp_path: Path, redis_url: str, notify_socket: tuple[str, socket.socket]
) -> AsyncIterator[StartProcess]:
    processes: list[asyncio.subprocess.Process] = []
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TEMPLATE.format(upstream=fake_upstream.url, key_env=KEY_ENV))
    logs = (tmp_path / "rill.log").open("wb")

    async def start() -> tuple[URL, asyncio.subprocess.Process]:
        port = free_port()
        env = server_env(config, port, RILL_REDIS_URL=redis_url, NOTIFY_SOCKET=notify_socket[0])
        process = await spawn_server(env, tmp_path, logs)
        processes.append(process)
        assert await next_notification(notify_socket[1]) == "READY=1"
        return URL.build(scheme="http", host="127.0.0.1", port=port), process

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()
    logs.close()
    output = (tmp_path / "rill.log").read_text()
    assert "Traceback" not in output
    assert SENTINEL_KEY not in output


async def post_chat(session: aiohttp.ClientSession, url: URL) -> str:
    async with session.post(url / "api/chat", json={"messages": [{"role": "user", "content": "q"}]}) as response:
        assert response.status == 201, await response.text()
        return str((await response.json())["id"])


async def test_post_on_a_read_on_b_resume_on_c_with_three_processes(
    start_process: StartProcess, fake_upstream: FakeUpstream
) -> None:
    tokens = [f"w{i} " for i in range(30)]
    fake_upstream.script(Reply(chunks=answer(tokens, delay=0.03)))
    (a, _), (b, _), (c, _) = [await start_process() for _ in range(3)]
    async with aiohttp.ClientSession() as session:
        generation_id = await post_chat(session, a)
        on_b = StreamReader(await session.get(b / f"api/chat/{generation_id}/events"))
        for _ in range(5):
            await on_b.read_until("delta")
        on_b.response.close()
        last = on_b.events[-1].id
        on_c = StreamReader(await session.get(c / f"api/chat/{generation_id}/events", headers={"Last-Event-ID": last}))
        rest = await on_c.read_all()
    assert int(rest[0].id) == int(last) + 1
    assert text_of(on_b.events) + text_of(rest) == "".join(tokens)
    assert terminal(rest).data["finish_reason"] == "stop"
    assert len(fake_upstream.requests) == 1


async def test_the_owner_killed_ends_readers_elsewhere_with_worker_lost_and_keeps_the_text(
    start_process: StartProcess, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Reply(chunks=[chunk("kept "), chunk("so far")], end="hang"))
    (a, owner), (b, _) = await start_process(), await start_process()
    async with aiohttp.ClientSession() as session:
        generation_id = await post_chat(session, a)
        on_b = StreamReader(await session.get(b / f"api/chat/{generation_id}/events"))
        while text_of(on_b.events) != "kept so far":
            await on_b.next_event()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        owner.send_signal(signal.SIGKILL)
        events = await on_b.read_all(timeout=10)
        assert loop.time() - killed < 5.0
        end = terminal(events)
        assert end.event == "error"
        assert end.data["code"] == "worker_lost"
        assert end.data["retryable"] is True
        # Later, from the start, on the same survivor: the same text and the same ending.
        again = await StreamReader(await session.get(b / f"api/chat/{generation_id}/events")).read_all()
        assert text_of(again) == "kept so far"
        assert terminal(again).data == end.data
        assert again[-1].id == end.id


def test_a_redis_that_cannot_be_reached_stops_start_up_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TEMPLATE.format(upstream="http://127.0.0.1:9/v1", key_env=KEY_ENV))
    env = server_env(config, free_port(), RILL_REDIS_URL=f"redis://:pw-secret-7@127.0.0.1:{free_port()}/0")
    result = subprocess.run(
        [sys.executable, "-m", "server"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rill: cannot use Redis for shared mode: Redis at redis://"), lines[0]
    assert "RILL_REDIS_URL" in lines[0]
    assert "pw-secret-7" not in result.stderr
    assert "Traceback" not in result.stderr
