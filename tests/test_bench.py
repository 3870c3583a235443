"""The benchmark's instrument: its client must count every token a relay loses,
duplicates or reorders, and must read Rill (and its resume) correctly. A faulty relay
built here, in front of the bench's own fake upstream, proves the first."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.client import Job, Stream, run
from bench.pipe import Side, join
from bench.report import table, targets
from bench.run import ROOT, Row, rill_config
from bench.soak import MIX, Sample, slope_per_1000
from bench.upstream import Upstream, listen
from bench.wire import SSELines, token_text
from server.app import create_app
from server.config import parse_config
from server.http.errors import Handler
from server.keys import STORE

from .conftest import BASE_DOCUMENT

AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]
SCENARIO = {"tokens": 120, "interval": 0.0, "seed": 3}


def faulty_relay(upstream_url: str, fault: str) -> web.Application:
    """A relay that re-emits upstream events, except for one planted fault."""

    async def relay(request: web.Request) -> web.StreamResponse:
        body = {"messages": [{"role": "user", "content": request.query["scenario"]}]}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        held = b""
        async with aiohttp.ClientSession() as session, session.post(upstream_url, json=body) as upstream:
            parser = SSELines()
            number = 0
            async for chunk in upstream.content.iter_any():
                for event in parser.feed(chunk):
                    out = f"data: {event.data}\n\n".encode()
                    number += 1
                    if number == 50 and fault == "lose":
                        continue
                    if number == 50 and fault == "duplicate":
                        await response.write(out)
                    if number == 50 and fault == "reorder":
                        held = out  # sent after the next one
                        continue
                    await response.write(out)
                    if held and number == 51:
                        await response.write(held)
                        held = b""
        return response

    app = web.Application()
    app.router.add_get("/relay", relay)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    """The fake upstream on a free loopback port, and its base URL."""
    model = Upstream()
    async with await listen(model) as server:
        port = server.sockets[0].getsockname()[1]
        yield model, f"http://127.0.0.1:{port}"


@pytest.fixture
def upstream_url(upstream: tuple[Upstream, str]) -> str:
    return upstream[1]


def bench_app(upstream_url: str, **sections: Any) -> web.Application:
    """Rill as the bench runs it, on the bench's fake upstream: its one model, limits opened up."""
    document = BASE_DOCUMENT | {"default_model": "bench", "limits": {"max_concurrent_per_client": 50}} | sections
    environ = {"RILL_UPSTREAM_URL": f"{upstream_url}/v1", "RILL_MODEL": "bench"}
    return create_app(parse_config(document, environ))


@pytest.mark.parametrize(
    ("fault", "lost", "duplicated", "reordered"),
    [("none", 0, 0, 0), ("lose", 1, 0, 0), ("duplicate", 0, 1, 0), ("reorder", 0, 0, 1)],
)
async def test_the_client_counts_every_fault_of_a_relay(
    aiohttp_server: AiohttpServer, upstream_url: str, fault: str, lost: int, duplicated: int, reordered: int
) -> None:
    relay = await aiohttp_server(faulty_relay(f"{upstream_url}/v1/chat/completions", fault))
    result = await run(Job(target="naive", url=str(relay.make_url("")).rstrip("/"), streams=3, scenario=SCENARIO))
    assert (result["lost"], result["duplicated"], result["reordered"]) == (3 * lost, 3 * duplicated, 3 * reordered)
    assert result["delivered"] == 3 * (120 - lost)
    assert result["latency_ms"]["p50"] is not None
    assert result["latency_ms"]["p50"] >= 0


async def test_the_client_reads_the_upstream_directly(upstream_url: str) -> None:
    result = await run(Job(target="direct", url=upstream_url.rstrip("/"), streams=5, scenario=SCENARIO))
    assert (result["delivered"], result["lost"], result["failed_streams"]) == (600, 0, 0)


async def test_the_client_reads_rill_and_resumes_it(
    aiohttp_server: AiohttpServer, upstream: tuple[Upstream, str]
) -> None:
    model, upstream_url = upstream
    rill = await aiohttp_server(bench_app(upstream_url))
    job = Job(
        target="rill",
        url=str(rill.make_url("")).rstrip("/"),
        streams=5,
        scenario={"tokens": 200, "interval": 0.002, "seed": 1},
        resume_after=(40, 120),
    )
    result = await run(job)
    assert (result["delivered"], result["lost"], result["duplicated"], result["reordered"]) == (1000, 0, 0, 0)
    assert result["reconnects"] == 5
    assert model.requests == 5  # resumed from Rill's buffer, not asked again


@pytest.mark.parametrize("fresh", [False, True])
async def test_a_fresh_job_reads_each_answer_on_new_connections_as_an_event_stream(
    aiohttp_server: AiohttpServer, upstream: tuple[Upstream, str], fresh: bool
) -> None:
    app = bench_app(upstream[1])
    seen: list[tuple[str, Any, str]] = []  # (method, the client's address and port, Accept)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen.append((request.method, peer, request.headers.get("Accept", "")))
        return await handler(request)

    app.middlewares.insert(0, record)
    rill = await aiohttp_server(app)
    job = Job(
        target="rill",
        url=str(rill.make_url("")).rstrip("/"),
        streams=3,
        scenario={"tokens": 20, "interval": 0.01, "seed": 1},
        ramp=0.3,
        fresh=fresh,
    )
    result = await run(job)
    assert (result["delivered"], result["failed_streams"]) == (60, 0)
    gets = [accept for method, _, accept in seen if method == "GET"]
    assert len(gets) == 3
    peers = [peer for _, peer, _ in seen]
    if fresh:
        assert len(set(peers)) == 6  # a POST and a GET per answer, each on its own connection
        assert gets == ["text/event-stream"] * 3
    else:
        assert len(set(peers)) < 6  # kept connections are used again


async def test_the_client_reads_rill_through_stored_conversations(
    aiohttp_server: AiohttpServer, upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    model, upstream_url = upstream
    app = bench_app(upstream_url, storage={"url": f"sqlite:///{tmp_path / 'rill.db'}", "auto_titles": False})
    rill = await aiohttp_server(app)
    job = Job(
        target="rill-history",
        url=str(rill.make_url("")).rstrip("/"),
        streams=5,
        scenario={"tokens": 100, "interval": 0.002, "seed": 1},
    )
    result = await run(job)
    assert (result["delivered"], result["lost"], result["failed_streams"]) == (500, 0, 0)
    assert model.requests == 5
    listed = await app[STORE].list_conversations("local")
    assert len(listed) == 5


def test_the_history_checks_compare_the_same_scenario() -> None:
    def row(target: str, cpu_s: float) -> Row:
        client = {"delivered": 1000, "lost": 0, "duplicated": 0, "reordered": 0, "failed_streams": 0}
        return Row("capacity-100", target, client, server_cpu_s=cpu_s)

    rows = [row("rill", 0.020), row("rill-history", 0.030), row("rill-history-end", 0.029)]
    checks = {name: (met, figure) for name, met, figure in targets(rows)}
    assert checks["history on within 10 % of off, CPU per token (capacity-100)"][0] is False
    streaming = checks["writes while streaming (every save_interval) within 10 % of history off (capacity-100)"]
    assert streaming[0] is True
    assert "+5.0 %" in streaming[1]


def test_shared_mode_is_judged_per_capacity_scenario_with_and_without_its_redis() -> None:
    def row(scenario: str, target: str, cpu_s: float, redis_cpu_s: float | None = None) -> Row:
        client = {"delivered": 1000, "lost": 0, "duplicated": 0, "reordered": 0, "failed_streams": 0}
        made = Row(scenario, target, client, server_cpu_s=cpu_s)
        if redis_cpu_s is not None:
            made.extra["redis_cpu_s"] = redis_cpu_s
        return made

    rows = [
        row("capacity-100", "rill", 0.080),
        row("capacity-100", "rill-shared", 0.140, redis_cpu_s=0.020),  # 1.75×; 1.50× without Redis
        row("capacity-500", "rill", 0.050),
        row("capacity-500", "rill-shared", 0.064, redis_cpu_s=0.010),  # 1.28×; 1.08× without Redis
    ]
    checks = {name: (met, figure) for name, met, figure in targets(rows)}
    met, figure = checks["shared mode CPU per token ≤ 1.3× one process (capacity-100, Redis included)"]
    assert met is False
    assert "140.0 vs 80.0 µs: 1.75×" in figure
    assert "the two Rill processes alone 1.50×" in figure
    met, figure = checks["shared mode CPU per token ≤ 1.3× one process (capacity-500, Redis included)"]
    assert met is True
    assert "alone 1.08×" in figure


def test_rill_is_judged_against_nginx_measured_in_the_same_pass() -> None:
    def row(scenario: str, target: str, pass_: int, cpu_s: float | None, p99: float, first_p99: float = 0.0) -> Row:
        client = {
            "delivered": 1000,
            "lost": 0,
            "duplicated": 0,
            "reordered": 0,
            "failed_streams": 0,
            "latency_ms": {"p50": 0.5, "p99": p99},
            "first_token_p99_ms": first_p99,
        }
        return Row(scenario, target, client, server_cpu_s=cpu_s, server_peak_rss_mb=None, round=pass_)

    rows = []
    for pass_, (rill_cpu, nginx_cpu) in enumerate([(0.060, 0.020), (0.040, 0.030), (0.045, 0.030)]):
        rows += [
            row("capacity-100", "direct", pass_, None, 1.0),
            row("capacity-100", "nginx", pass_, nginx_cpu, 2.0),
            row("capacity-100", "rill", pass_, rill_cpu, 3.0),
            row("capacity-500", "direct", pass_, None, 5.0),
            row("capacity-500", "nginx", pass_, 0.015, 15.0, first_p99=40.0),
            row("capacity-500", "rill", pass_, 0.040, 30.0 if pass_ else 20.0, first_p99=70.0 if pass_ else 100.0),
        ]
    rows[-1].server_peak_rss_mb = 1.0  # memory is judged at 1,000 streams only: none here
    checks = {name: (met, figure) for name, met, figure in targets(rows)}
    # 3.0×, 1.33×, 1.5×: the median is 1.5×, met.
    met, figure = checks["CPU per token ≤ 1.5× nginx's (capacity-100), median of 3 runs"]
    assert met is True
    assert "1.50× (runs 1.33× to 3.00×)" in figure
    assert checks["CPU per token ≤ 1.5× nginx's (capacity-500), median of 3 runs"][0] is False  # 2.67×
    met, figure = checks["time to first token p99 ≤ 2× nginx's (capacity-500), every run"]
    assert met is False  # 2.5× in the first run
    assert figure.startswith("100 vs 40 ms (2.5×)")
    # Rill's added p99 minus nginx's: +5, +15, +15 ms: the median misses the 10 ms mark.
    met, figure = checks["p99 added latency within 10 ms of nginx's (capacity-500, median, median of 3 runs)"]
    assert met is False
    assert figure == "+5.0 ms, +15.0 ms, +15.0 ms"
    assert not any("capacity-1000" in name for name in checks)  # not run: not judged


def test_a_single_stream_is_judged_by_the_median_over_direct_with_nginx_beside() -> None:
    def row(scenario: str, target: str, pass_: int, p50: float) -> Row:
        client = {"delivered": 300, "lost": 0, "duplicated": 0, "reordered": 0, "failed_streams": 0}
        return Row(scenario, target, client | {"latency_ms": {"p50": p50, "p99": 1.0}}, round=pass_)

    rows = []
    for pass_, (rill_p50, nginx_p50) in enumerate([(0.45, 0.30), (0.38, 0.31), (0.50, 0.33)]):
        rows += [
            row("latency", "direct", pass_, 0.10),
            row("latency", "rill", pass_, 0.15),
            row("latency-paced", "direct", pass_, 0.20),
            row("latency-paced", "nginx", pass_, nginx_p50),
            row("latency-paced", "rill", pass_, rill_p50),
        ]
    checks = {name: (met, figure) for name, met, figure in targets(rows)}
    assert checks["single stream (1 ms apart): p50 ≤ 0.2 ms over direct, median of 3 runs"][0] is True
    # +0.25, +0.18, +0.30 ms: the median (+0.25) misses, whatever one good run says.
    met, figure = checks["single stream (30/s, new connections): p50 ≤ 0.2 ms over direct, median of 3 runs"]
    assert met is False
    assert figure == "+0.250 ms (runs +0.180 to +0.300); nginx +0.110 ms"


def test_an_answers_cost_apart_from_its_tokens_is_its_server_cpu_over_the_answers() -> None:
    client = {"delivered": 1000, "lost": 0, "duplicated": 0, "reordered": 0, "failed_streams": 0, "streams": 500}
    rows = [Row("answers", "rill", client, server_cpu_s=cpu_s, round=n) for n, cpu_s in enumerate([0.40, 0.60, 0.45])]
    checks = {name: (met, figure) for name, met, figure in targets(rows)}
    met, figure = checks["CPU per answer < 1 ms (answers: 500 of 2 tokens), median of 3 runs"]
    assert met is True
    assert figure == "0.90 ms (runs 0.80 to 1.20)"


def test_repeated_passes_are_compared_pass_by_pass_and_judged_by_the_median() -> None:
    """Each pass compares history on and off in one state of the machine; the verdict is the
    median over the passes, and the runs' spread is shown."""

    def row(target: str, cpu_s: float, pass_: int) -> Row:
        client = {
            "delivered": 1000,
            "expected": 1000,
            "lost": 0,
            "duplicated": 0,
            "reordered": 0,
            "failed_streams": 0,
            "latency_ms": {"p50": 0.2, "p99": 1.0},
            "first_token_ms": 14.0,
            "tokens_per_s": 2700.0,
            "client_cpu_s": 1.4,
            "client_lag_ms": {"p99": 1.0},
        }
        return Row("capacity-100", target, client, server_cpu_s=cpu_s, round=pass_)

    # +5 %, +30 % (a noisy pass), +8 %: the median is +8 %.
    rows = [
        row("rill", 0.020, 0),
        row("rill-history", 0.021, 0),
        row("rill", 0.020, 1),
        row("rill-history", 0.026, 1),
        row("rill", 0.025, 2),
        row("rill-history", 0.027, 2),
    ]
    checks = {name: (met, figure) for name, met, figure in targets(rows)}
    met, figure = checks["history on within 10 % of off, CPU per token (capacity-100), median of 3 runs"]
    assert met is True
    assert "+8.0 %" in figure
    assert "runs +5.0 % to +30.0 %" in figure
    # A fault in any pass counts, not only in the last one.
    rows[0].client = rows[0].client | {"lost": 2}
    lost = next(c for c in targets(rows) if c[0] == "0 tokens lost, duplicated or reordered")
    assert lost[1] is False
    shown = table(rows)
    assert "| rill #2 |" in shown
    assert "| rill-history #3 |" in shown


def test_only_complete_events_are_read() -> None:
    from bench.client import _complete_events

    data = b"id: 1\r\nevent: delta\r\ndata: x\r\n\r\nid: 2\r\nevent: del"
    assert data[: _complete_events(data)].endswith(b"data: x\r\n\r\n")
    assert _complete_events(b"data: [1:2] \n\ndata: [2") == len(b"data: [1:2] \n\n")
    assert _complete_events(b"data: [1:2") == 0


def test_a_repeated_or_unknown_token_is_a_duplicate() -> None:
    stream = Stream(expected=3)
    stream.take((token_text(0, 10) + token_text(2, 30) + token_text(1, 20)).encode(), 100, 0)
    stream.take((token_text(2, 30) + token_text(7, 30)).encode(), 100, 0)
    assert (stream.delivered, stream.duplicated, stream.reordered) == (3, 2, 1)


def _row(target: str, p50: float, p99: float) -> Row:
    client = {"lost": 0, "duplicated": 0, "reordered": 0, "failed_streams": 0, "streams": 1000, "reconnects": 0}
    return Row("capacity-1000", target, client | {"latency_ms": {"p50": p50, "p99": p99}})


@pytest.mark.parametrize(("direct_p50", "met"), [(0.5, True), (47.0, None)])
def test_a_saturated_bench_core_makes_the_1000_stream_check_inconclusive(direct_p50: float, met: bool | None) -> None:
    rows = [_row("direct", direct_p50, 190.0), _row("rill", direct_p50 + 1, 195.0)]
    check = next(c for c in targets(rows) if c[0].startswith("1,000 streams"))
    assert check[1] is met


async def test_split_events_arrive_whole_and_in_order(upstream_url: str) -> None:
    """Half of all events in two TCP segments, paced and as fast as possible."""
    for interval in (0.003, 0.0):
        scenario = {"tokens": 60, "interval": interval, "split": 0.5, "seed": 3}
        result = await run(Job(target="direct", url=upstream_url, streams=4, scenario=scenario))
        assert (result["delivered"], result["lost"], result["duplicated"], result["reordered"]) == (240, 0, 0, 0)


async def test_the_byte_pipe_passes_the_upstream_through(upstream: tuple[Upstream, str]) -> None:
    model, upstream_url = upstream
    loop = asyncio.get_running_loop()
    accepted: set[asyncio.Task[None]] = set()

    def accept() -> Side:
        client = Side()
        accepted.add(loop.create_task(join(client, int(upstream_url.rsplit(":", 1)[1]))))
        return client

    async with await loop.create_server(accept, "127.0.0.1", 0) as pipe:
        url = f"http://127.0.0.1:{pipe.sockets[0].getsockname()[1]}"
        result = await run(Job(target="direct", url=url, streams=3, scenario=SCENARIO))
    assert (result["delivered"], result["lost"], result["failed_streams"]) == (360, 0, 0)
    assert model.requests == 3
    await asyncio.gather(*accepted)


async def test_the_nginx_peer_passes_the_upstream_through_and_counts_its_worker(
    upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    # Debian's nginx (the tests install it): the peer issue 16 measures Rill against.
    from bench.nginx import family, start_nginx
    from bench.run import Processes

    model, upstream_url = upstream
    processes = Processes(tmp_path)
    try:
        master, url = await asyncio.to_thread(
            start_nginx, processes, tmp_path, int(upstream_url.rsplit(":", 1)[1]), dict(os.environ), None
        )
        result = await run(Job(target="direct", url=url, streams=3, scenario=SCENARIO))
        assert (result["delivered"], result["lost"], result["failed_streams"]) == (360, 0, 0)
        assert model.requests == 3
        assert len(family(master.pid)) == 2  # the master and its one worker, both counted
    finally:
        processes.stop_all()


def test_the_soak_runs_and_reads_rill_from_inside(tmp_path: Path) -> None:
    """`python -m bench soak` with tiny numbers, so the scenario cannot rot: every kind
    of the mix ends as it should, and each sample has Rill's RSS and the probe's figures."""
    out = tmp_path / "soak.json"
    args = ["--minutes", "0.1", "--rate", "10", "--sample", "2", "--finished-ttl", "5", "--resume-grace", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", "soak", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["answers_ended"] == result["answers_started"] >= 50
    assert {kind.split(":")[0] for kind in result["outcomes"]} == set(MIX)
    assert all(outcome.endswith(": ok") for outcome in result["outcomes"]), result["outcomes"]
    assert len(result["samples"]) >= 3
    last = result["samples"][-1]
    assert last["rss_mb"] > 10
    assert min(last["gc_objects"], last["pymalloc_mb"], last["heap_in_use_mb"]) > 0
    assert [sample["label"] for sample in result["trim_at_end"]] == ["before_trim", "after_trim"]
    assert "| minute | answers ended |" in done.stdout
    assert "Verdict:" in done.stdout


def test_the_soak_slope_is_per_1000_answers() -> None:
    samples = [Sample(t=i, started=0, ended=1000 * i, rss_mb=60 + 0.5 * i, anon_mb=0) for i in range(6)]
    assert slope_per_1000(samples) == pytest.approx(0.5)
    flat = [Sample(t=i, started=0, ended=1000 * i, rss_mb=60, anon_mb=0) for i in range(6)]
    assert slope_per_1000(flat) == pytest.approx(0.0)


@pytest.mark.parametrize("history", [False, True])
def test_the_bench_config_is_valid_and_changes_only_what_it_means_to(tmp_path: Path, history: bool) -> None:
    path = rill_config(tmp_path, history=history, save_interval=3600.0 if history else None)
    config = parse_config(tomllib.loads(path.read_text()), {})
    assert config.limits.max_concurrent_total == 5000
    assert config.cluster.redis_url == ""  # one process: shared mode stays off
    if history:
        assert config.storage.enabled
        assert config.storage.url.startswith(f"sqlite:///{tmp_path}/history-")
        assert config.storage.save_interval == 3600.0
    else:
        assert not config.storage.enabled
