"""The Stop latency bench (bench/stop.py, scaled down): it starts its own Redis and two
Rill processes in shared mode, and times each Stop to the moment the fake upstream sees
the answer's request closed, with the owner elsewhere and with the owner itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _needs_redis(redis_server: RedisServer) -> None:
    """redis-server must be installed (the bench starts one of its own): fail, never skip."""


def test_every_stop_through_either_process_closes_the_upstream_request_and_is_timed() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RILL_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "stop-latency", "--answers", "8", "--concurrency", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert len(result) == 2  # the owner elsewhere, and the owner itself
    for side in result.values():
        assert side["failures"] == []
        assert side["answers"] == 4
        closed = side["upstream_closed_ms"]
        assert 0 < closed["p50"] <= closed["p99"] <= closed["max"] < 5000
        assert side["delete_answered_ms"]["p50"] > 0
