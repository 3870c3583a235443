"""`python -m bench store` on tiny data, so the storage benchmark cannot rot: it builds
through the real Store and migrations, and every operation it times really ran (the
list is full, the long conversation opens whole, each search finds what it should)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.run import ROOT
from bench.store import QUERIES, Size, run, table

TINY = Size(conversations=30, messages=400, big=100)


async def test_the_store_bench_measures_every_operation(tmp_path: Path) -> None:
    rows, facts = await run(TINY, tmp_path, repeat=3)
    by_name = {row["operation"]: row for row in rows}
    assert by_name["list (first page)"]["results"] == TINY.conversations
    assert by_name["open (100 messages)"]["results"] == TINY.big
    assert by_name["floor: the same rows by plain sqlite3"]["results"] == TINY.big  # the same rows
    for name, query, hits in QUERIES:
        found = by_name[f"{name}: {query}"]["results"]
        assert (found > 0) == hits, (query, found)
    assert all(0 < row["p50_ms"] <= row["p95_ms"] for row in rows)
    assert all(0 < row["cpu_p50_ms"] <= row["cpu_p95_ms"] for row in rows)
    assert facts["file_mb"] > 0
    assert table(rows).count("\n") == len(rows) + 1


def test_python_m_bench_store_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "store", "--conversations", "10", "--messages", "60", "--big", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| operation | p50 ms | p95 ms | target p95 ms | CPU p50 / p95 ms | results | met |" in done.stdout
    assert "| open (20 messages) |" in done.stdout
    assert "Targets of issue 14:" in done.stdout
