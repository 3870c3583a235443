"""The rolling restart behind the real nginx (bench/rolling.py, scaled down): two Rill
processes in shared mode restarted one after the other while answers stream and new ones
start. With [server] drain_timeout nothing is visible to users; without it the answers in
flight are cut (which shows the scenario can see a failure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rolling import run

from .conftest import RedisServer

SMALL = {"streams": 20, "tokens": 40, "interval": 0.05, "workers": 2, "new_every": 0.2}


@pytest.fixture(autouse=True)
def _needs_redis(redis_server: RedisServer) -> None:
    """redis-server must be installed (the scenario starts one of its own): fail, never skip."""


async def test_two_processes_restarted_one_after_the_other_lose_nothing(tmp_path: Path) -> None:
    result = await run(**SMALL, work=tmp_path)  # type: ignore[arg-type]
    assert result["failures"] == []
    assert result["failed_requests"] == 0
    assert result["status_502"] == 0
    assert result["tokens_lost"] == 0
    assert result["tokens_repeated"] == 0
    assert result["incomplete"] == 0
    assert result["answers"] > SMALL["streams"]  # new answers started during the restarts too
    assert len(result["restart_seconds"]) == 2


async def test_without_a_drain_timeout_the_answers_in_flight_are_cut(tmp_path: Path) -> None:
    result = await run(**SMALL, work=tmp_path, drain_timeout=0.0)  # type: ignore[arg-type]
    assert result["incomplete"] > 0
    assert any("server_shutdown" in failure for failure in result["failures"])
