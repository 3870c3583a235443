"""`python -m bench stop-latency`: how soon a Stop closes the upstream request, with the
answer's owner on another process (shared mode) and, as the baseline in the same run,
on the process the DELETE reaches.

Two Rill processes in shared mode and their Redis, in front of the fake upstream. Answers
are started on process A and read there (so they stream, and are not abandoned); a moment
later their Stop goes to B (the owner elsewhere) or to A (the owner itself), alternately,
`--concurrency` at a time. The fake upstream notes when each answer's request is closed
before its end: the latency is from the DELETE being sent to that moment, on the
machine's one monotonic clock. Reported: p50, p99 and max per side, and the DELETE's own
response time (it answers once the answer's ending is known, in Redis for B)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .run import ROOT, Processes, cores, percentile, start_shared

STREAMING_BEFORE_STOP = 0.3  # seconds an answer streams before its Stop
LONG_ANSWER = {"tokens": 100_000, "interval": 1 / 30, "split": 0.0, "seed": 7}


@dataclass
class Side:
    name: str
    closed_ms: list[float] = field(default_factory=list)  # DELETE sent -> upstream request closed
    answered_ms: list[float] = field(default_factory=list)  # DELETE sent -> its response
    failures: list[str] = field(default_factory=list)


async def stop_one(session: aiohttp.ClientSession, owner: str, stopper: str, tag: str, side: Side) -> float | None:
    """Starts an answer on `owner`, reads it there, stops it through `stopper`: when the
    DELETE was sent (the upstream's close time is read later)."""
    body = {"messages": [{"role": "user", "content": json.dumps(LONG_ANSWER | {"tag": tag})}]}
    async with session.post(f"{owner}/api/chat", json=body) as created:
        if created.status != 201:
            side.failures.append(f"POST {created.status}: {(await created.text())[:200]}")
            return None
        about = await created.json()
    async with session.get(f"{owner}{about['events']}") as stream:
        await stream.content.readline()  # it streams
        await asyncio.sleep(STREAMING_BEFORE_STOP)
        sent = time.monotonic()
        async with session.delete(f"{stopper}/api/chat/{about['id']}") as stopped:
            side.answered_ms.append((time.monotonic() - sent) * 1000)
            if stopped.status != 200:
                side.failures.append(f"DELETE {stopped.status}: {(await stopped.text())[:200]}")
                return None
    return sent


async def measure(urls: list[str], upstream: str, answers: int, concurrency: int) -> list[Side]:
    owner, other = urls
    sides = [Side("owner elsewhere (DELETE on B, answer on A)"), Side("owner itself (DELETE on A)")]
    sent: dict[str, tuple[Side, float]] = {}
    slots = asyncio.Semaphore(concurrency)

    async def one(number: int) -> None:
        side = sides[number % 2]
        tag = f"stop-{number}"
        async with slots:
            at = await stop_one(session, owner, other if side is sides[0] else owner, tag, side)
        if at is not None:
            sent[tag] = (side, at)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(number) for number in range(answers)))
        await asyncio.sleep(0.5)  # the last closes reach the upstream
        async with session.get(f"{upstream}/stats") as response:
            closed: dict[str, float] = (await response.json())["closed"]
    for tag, (side, at) in sent.items():
        if tag in closed:
            side.closed_ms.append((closed[tag] - at) * 1000)
        else:
            side.failures.append(f"{tag}: its upstream request was never closed")
    return sides


def report(sides: list[Side]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for side in sides:
        row: dict[str, Any] = {"answers": len(side.closed_ms), "failures": side.failures[:5]}
        for what, values in (("upstream_closed_ms", side.closed_ms), ("delete_answered_ms", side.answered_ms)):
            if values:
                row[what] = {
                    "p50": round(statistics.median(values), 1),
                    "p99": round(percentile(values, 0.99), 1),
                    "max": round(max(values), 1),
                }
        result[side.name] = row
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench stop-latency")
    parser.add_argument("--answers", type=int, default=400, help="answers stopped, half through each process")
    parser.add_argument("--concurrency", type=int, default=20, help="answers streaming and stopped at once")
    args = parser.parse_args(argv)
    server_core, bench_core = cores()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("RILL_")}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory(prefix="rill-stop-") as work:
        processes = Processes(Path(work))
        try:
            _, up_port = processes.start_upstream(env, bench_core)
            _, _, urls = start_shared(processes, Path(work), up_port, env, server_core)
            sides = asyncio.run(measure(urls, f"http://127.0.0.1:{up_port}", args.answers, args.concurrency))
        finally:
            processes.stop_all()
    result = report(sides)
    print(json.dumps(result, indent=2))
    failed = any(side.failures for side in sides)
    if failed:
        print("failures: see above", file=sys.stderr)
    return 1 if failed else 0
