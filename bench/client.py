"""The load client: opens many streams through a target and records every token.

`python -m bench.client '<json job>'` prints a JSON result. Targets: `direct` (the
fake upstream itself: the physical limit), `naive` (the baseline relay), `rill`
(POST /api/chat, then its event stream) and `rill-history` (a new stored conversation:
POST /api/conversations/{id}/messages, then the answer's event stream). Per token it checks delivered, lost,
duplicated and reordered, and how long after the upstream wrote it the token arrived.
It also reports its own CPU time and event-loop lag, to show it was not the bottleneck."""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from server.relay.bodytap import tapped

from .loops import install_fast_loop
from .wire import EVENT_ID, TOKEN_BYTES

EVENT_STREAM = {"Accept": "text/event-stream"}


@dataclass
class Job:
    target: str  # direct | naive | rill | rill-history
    url: str  # the target's base URL
    streams: int
    scenario: dict[str, Any]  # what the fake upstream should send: tokens, interval, split, seed
    ramp: float = 0.0  # seconds over which the streams start
    resume_after: tuple[int, int] | None = None  # drop and resume after a random token in this range
    abort_after: tuple[int, int] | None = None  # vanish after a random token in this range
    seed: int = 1
    fresh: bool = False  # a new connection per request; the GET asks for text/event-stream
    # Shared mode: the processes; stream n is started on urls[n] and read on urls[n + 1]
    # (modulo their number), so every read goes through Redis.
    urls: list[str] = field(default_factory=list)


@dataclass
class Stream:
    expected: int
    seen: bytearray = field(init=False)
    latencies_ns: list[int] = field(default_factory=list)
    duplicated: int = 0
    reordered: int = 0
    highest: int = -1
    setup_ns: int | None = None
    first_token_ns: int | None = None
    error: str | None = None
    reconnects: int = 0
    delivered: int = 0

    def __post_init__(self) -> None:
        self.seen = bytearray(self.expected)

    def take(self, data: bytes, arrived_ns: int, started_ns: int) -> None:
        """Records the tokens in complete events (whatever their format: the stamped
        text appears verbatim in the JSON of both Rill's and the upstream's events)."""
        for match in TOKEN_BYTES.finditer(data):
            index, stamp = int(match.group(1)), int(match.group(2))
            if self.first_token_ns is None:
                self.first_token_ns = arrived_ns - started_ns
            if index >= self.expected or self.seen[index]:
                self.duplicated += 1  # nothing past the end was ever sent: count it as extra
                continue
            if index < self.highest:
                self.reordered += 1
            self.highest = max(self.highest, index)
            self.seen[index] = 1
            self.delivered += 1
            self.latencies_ns.append(arrived_ns - stamp)


def _body(job: Job) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": json.dumps(job.scenario)}]}


def _complete_events(data: bytes) -> int:
    """Where the last complete event in `data` ends (0: none yet)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


async def _read(
    response: aiohttp.ClientResponse, stream: Stream, started: int, target: str, stop_at: int | None
) -> tuple[bool, str | None]:
    """Reads until the end (True) or until `stop_at` tokens have arrived (False).
    Returns whether it ended, and the id of the last complete event (Rill)."""
    reader = _EventReader(stream, started, target, stop_at)
    async with tapped(response.content, reader):
        ended = await reader.finished
    return ended, reader.last_id  # the caller closes the response: read or not, the rest is dropped


class _EventReader:
    """Takes the tokens of complete events as the body arrives, in aiohttp's own data
    callback (Rill's BodySink: no task step per chunk). Only complete events count, so a
    token (or an id) is never seen half-written. No JSON is parsed: at 30,000 tokens a
    second the client must stay cheap."""

    def __init__(self, stream: Stream, started: int, target: str, stop_at: int | None) -> None:
        self.stream = stream
        self.started = started
        self.target = target
        self.stop_at = stop_at
        self.pending = b""
        self.last_id: str | None = None
        self.finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def body_data(self, data: bytes) -> None:
        if self.finished.done():
            return
        arrived = time.monotonic_ns()
        pending = self.pending + data if self.pending else data
        end = _complete_events(pending)
        if not end:
            self.pending = pending
            return
        complete, self.pending = pending[:end], pending[end:]
        self.stream.take(complete, arrived, self.started)
        if self.target.startswith("rill"):
            if ids := EVENT_ID.findall(complete):
                self.last_id = ids[-1].decode()
            if b"event: error" in complete:
                self.stream.error = "error event"
                self.finished.set_result(True)
                return
        if self.stop_at is not None and self.stream.delivered >= self.stop_at:
            self.finished.set_result(False)

    def body_end(self, error: BaseException | None) -> None:
        if self.finished.done():
            return
        if error is None:
            self.finished.set_result(True)
        else:
            self.finished.set_exception(error)


async def _one(session: aiohttp.ClientSession, job: Job, number: int, rng: random.Random) -> Stream:
    stream = Stream(expected=int(job.scenario["tokens"]))
    stop_at = None
    if job.resume_after or job.abort_after:
        low, high = job.resume_after or job.abort_after  # type: ignore[misc]
        stop_at = rng.randint(low, high)
    await asyncio.sleep(job.ramp * number / max(1, job.streams))
    started = time.monotonic_ns()
    try:
        if job.target == "direct":
            response = await session.post(
                f"{job.url}/v1/chat/completions", json={"model": "bench", "stream": True, **_body(job)}
            )
        elif job.target == "naive":
            response = await session.get(f"{job.url}/relay", params={"scenario": json.dumps(job.scenario)})
        elif job.target == "rill-history":
            # A new conversation, made with its first question (as the page does).
            conversation = uuid.uuid4().hex[:16]
            question = {"parent": None, "content": _body(job)["messages"][0]["content"], "conversation": {}}
            async with session.post(f"{job.url}/api/conversations/{conversation}/messages", json=question) as created:
                if created.status != 201:
                    stream.error = f"POST message {created.status}"
                    return stream
                events = (await created.json())["generation"]["events"]
            response = await session.get(f"{job.url}{events}")
        else:
            start_url, read_url = job.url, job.url
            if job.urls:
                start_url, read_url = job.urls[number % len(job.urls)], job.urls[(number + 1) % len(job.urls)]
            async with session.post(f"{start_url}/api/chat", json=_body(job)) as created:
                if created.status != 201:
                    stream.error = f"POST {created.status}"
                    return stream
                events = (await created.json())["events"]
            response = await session.get(f"{read_url}{events}", headers=EVENT_STREAM if job.fresh else None)
        stream.setup_ns = time.monotonic_ns() - started
        if response.status != 200:
            stream.error = f"GET {response.status}"
            response.close()
            return stream
        ended, last_id = await _read(response, stream, started, job.target, stop_at)
        response.close()
        if ended or job.abort_after:
            return stream
        # The resume storm: the connection drops mid-answer; come back from the last id.
        stream.reconnects += 1
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with session.get(f"{job.url}{events}", headers=headers) as resumed:
            if resumed.status != 200:
                stream.error = f"resume {resumed.status}"
                return stream
            await _read(resumed, stream, started, job.target, None)
    except (TimeoutError, aiohttp.ClientError) as exc:
        stream.error = type(exc).__name__
    return stream


class LagMonitor:
    """How late a 10 ms timer fires: the client's own event-loop lag."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.01
            await asyncio.sleep(0.01)
            self.lags_ms.append(max(0.0, (loop.time() - due) * 1000))

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait({self._task})


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(job: Job) -> dict[str, Any]:
    rng = random.Random(job.seed)
    rngs = [random.Random(rng.random()) for _ in range(job.streams)]
    lag = LagMonitor()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    connector = aiohttp.TCPConnector(limit=0, force_close=job.fresh)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        lag.start()
        started = time.monotonic()
        streams = await asyncio.gather(*(_one(session, job, i, rngs[i]) for i in range(job.streams)))
        wall = time.monotonic() - started
        await lag.stop()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    latencies = [ns / 1e6 for s in streams for ns in s.latencies_ns]
    expected = sum(s.expected for s in streams)
    delivered = sum(s.delivered for s in streams)
    ended_early = job.abort_after is not None
    first_tokens = [s.first_token_ns / 1e6 for s in streams if s.first_token_ns is not None]
    return {
        "streams": job.streams,
        "expected": expected,
        "delivered": delivered,
        "lost": 0 if ended_early else expected - delivered,
        "duplicated": sum(s.duplicated for s in streams),
        "reordered": sum(s.reordered for s in streams),
        "errors": sorted({s.error for s in streams if s.error}),
        "failed_streams": sum(1 for s in streams if s.error),
        "reconnects": sum(s.reconnects for s in streams),
        "latency_ms": {f"p{int(q * 100)}": percentile(latencies, q) for q in (0.5, 0.9, 0.99)}
        | {"max": max(latencies, default=None)},
        "first_token_ms": percentile(first_tokens, 0.5),
        "first_token_p99_ms": percentile(first_tokens, 0.99),
        "setup_ms": percentile([s.setup_ns / 1e6 for s in streams if s.setup_ns is not None], 0.5),
        "wall_s": wall,
        "tokens_per_s": delivered / wall if wall else None,
        "client_cpu_s": cpu,
        "client_lag_ms": {"p99": percentile(lag.lags_ms, 0.99), "max": max(lag.lags_ms, default=None)},
    }


def main() -> None:
    raw = json.loads(sys.argv[1])
    for key in ("resume_after", "abort_after"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    install_fast_loop()
    print(json.dumps(asyncio.run(run(Job(**raw)))))


if __name__ == "__main__":
    main()
