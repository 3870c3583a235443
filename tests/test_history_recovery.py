"""A crash loses at most the last save_interval of an answer: the real `python -m server`
is killed with SIGKILL mid-answer, started again on the same SQLite file, and the answer
is there, marked interrupted, with its text up to the last write."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from yarl import URL

from .conftest import KEY_ENV, SENTINEL_KEY, wait_healthy
from .fakes import FakeUpstream, Reply, StreamReader, chunk, free_port, text_of

ROOT = Path(__file__).resolve().parents[1]
SAVE_INTERVAL = 0.5
TOKEN_DELAY = 0.02

CONFIG = f"""
default_model = "fake-chat"

[server]
host = "127.0.0.1"

[[providers]]
name = "fake"
base_url = "{{upstream}}"
api_key_env = "{KEY_ENV}"

  [[providers.models]]
  id = "fake-chat"
  upstream_id = "fake-model"

[storage]
url = "sqlite:///{{database}}"
save_interval = {SAVE_INTERVAL}
auto_titles = false
"""


@asynccontextmanager
async def rill_process(tmp_path: Path, upstream: str, log_name: str) -> AsyncIterator[URL]:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(upstream=upstream, database=tmp_path / "rill.db"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        {
            "RILL_CONFIG": str(config),
            "RILL_PORT": str(port),
            KEY_ENV: SENTINEL_KEY,
            "RILL_STATE_DIR": str(tmp_path / "state"),
            "PYTHONPATH": str(ROOT),
        }
    )
    with (tmp_path / log_name).open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", cwd=tmp_path, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
        url = URL.build(scheme="http", host="127.0.0.1", port=port)
        try:
            await wait_healthy(url, process)
            yield url
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)  # the crash (or the test's end)
                await process.wait()


async def test_sigkill_mid_answer_keeps_the_text_up_to_the_last_write(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    pieces = [f"p{i} " for i in range(2000)]  # ~40 s: the crash comes long before the end
    fake_upstream.script(Reply(stream=(item for piece in pieces for item in (TOKEN_DELAY, chunk(piece))), end="hang"))
    async with aiohttp.ClientSession() as session:
        async with rill_process(tmp_path, fake_upstream.url, "first.log") as url:
            async with session.post(url / "api/conversations", json={}) as response:
                assert response.status == 201, await response.text()
                cid = (await response.json())["id"]
            async with session.post(
                url / f"api/conversations/{cid}/messages", json={"parent": None, "content": "Go on and on"}
            ) as response:
                assert response.status == 201, await response.text()
                started = await response.json()
            generation = started["generation"]["id"]
            reader = StreamReader(await session.get(url / f"api/chat/{generation}/events"))
            async with asyncio.timeout(10):
                while text_of(reader.events).count(" ") < 100:  # ~2 s: a few writes
                    await reader.next_event()
            # SIGKILL at the end of the block: no shutdown, no last write.
        received = text_of(reader.events)
        reader.response.close()

        async with (
            rill_process(tmp_path, fake_upstream.url, "second.log") as url,
            session.get(url / f"api/conversations/{cid}") as response,
        ):
            assert response.status == 200, await response.text()
            conversation = await response.json()
    answer = next(m for m in conversation["messages"] if m["id"] == started["answer"]["id"])
    assert answer["status"] == "interrupted"
    saved = answer["content"].count(" ")
    assert answer["content"] == "".join(pieces[:saved])  # exactly the text of its first events
    assert answer["last_event_id"] == saved + 1  # the meta event, then a piece an event
    # At most a save_interval of tokens (and some scheduling slack) is lost.
    lost = received.count(" ") - saved
    assert lost <= (SAVE_INTERVAL / TOKEN_DELAY) * 2, lost
    second_log = (tmp_path / "second.log").read_text()
    assert "marked interrupted" in second_log
    assert "Traceback" not in second_log
