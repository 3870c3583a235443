"""A process with [storage] off never loads the store's libraries (SQLAlchemy and the rest
cost about 19 MB of its memory), and one with it on still does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CHECKOUT

# Starts the whole app (every cleanup context, as `python -m server` does) and serves a
# request, then tells which of the store's libraries the process holds.
PROGRAM = """
import asyncio, sys, tomllib
import aiohttp
from server.config import parse_config
from server.app import create_app, runner_options
from server.http.httpserver import start_server

async def main(storage):
    with open("config.toml", "rb") as bundled:
        document = tomllib.load(bundled)
    document["storage"].update(storage)
    config = parse_config(document, {"DEEPSEEK_API_KEY": "sk-test", "RILL_STATE_DIR": sys.argv[2]})
    app = create_app(config)
    runner = await start_server(app, config, "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/api/history") as response:
            assert response.status == 200, response.status
    await runner.cleanup()
    print(sorted({name.split(".")[0] for name in sys.modules} & {"sqlalchemy", "alembic", "greenlet"}))

storage = {"enabled": False} if sys.argv[1] == "off" else {"url": f"sqlite:///{sys.argv[2]}/rill.db"}
asyncio.run(main(storage))
"""


@pytest.mark.parametrize(("storage", "loaded"), [("off", "[]"), ("on", "['alembic', 'sqlalchemy']")])
def test_the_store_is_loaded_only_when_it_is_used(tmp_path: Path, storage: str, loaded: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, storage, str(tmp_path)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == loaded


def test_every_name_the_store_offers_is_found_where_it_says() -> None:
    import server.store as store

    assert sorted(store.__all__) == sorted(store._HOMES)
    for name in store.__all__:
        assert getattr(store, name).__name__ == name
