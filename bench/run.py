"""Runs every scenario against `direct`, the naive relay and Rill in one go, prints a
Markdown table and the targets, and writes the figures as JSON.

Each run gets fresh processes: the fake upstream and the load client on one core, the
relay under test alone on the other (when the machine has two), so the relay's CPU
time and peak RSS are its own and nothing else competes with it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RESUME_GRACE = 3.0  # Rill's [stream] resume_grace here: how long an unread answer goes on


@dataclass
class Scenario:
    name: str
    streams: int
    tokens: int
    interval: float  # seconds between tokens; 0: as fast as possible
    targets: tuple[str, ...] = ("direct", "pipe", "naive", "rill")
    split: float = 0.0
    ramp: float = 0.0
    resume_after: tuple[int, int] | None = None
    abort_after: tuple[int, int] | None = None
    # A new connection for every request, and `Accept: text/event-stream` on the event
    # stream's GET: how an outside client (and a browser's first visit) reads an answer.
    fresh: bool = False
    note: str = ""


FULL = [
    Scenario(
        "latency", 1, 2000, 0.001, ("direct", "pipe", "nginx", "naive", "rill"), note="1 stream, 2,000 tokens at 1 ms"
    ),
    Scenario(
        "latency-paced",
        1,
        300,
        1 / 30,
        ("direct", "pipe", "nginx", "naive", "rill"),
        fresh=True,
        note="1 stream, 300 tokens at 30/s, a new connection per request: every token meets an idle relay",
    ),
    Scenario(
        "capacity-100",
        100,
        300,
        1 / 30,
        ("direct", "pipe", "nginx", "naive", "rill", "rill-history", "rill-history-end", "rill-shared"),
        ramp=1.0,
        note="100 streams × 300 tokens at 30/s; rill-history: the same through stored conversations, "
        "rill-history-end: written at the end only (what the writes every save_interval cost is the difference); "
        "rill-shared: two processes in shared mode, each answer started on one and read on the other",
    ),
    Scenario(
        "capacity-500",
        500,
        300,
        1 / 30,
        ("direct", "pipe", "nginx", "naive", "rill", "rill-shared"),
        ramp=2.0,
        note="500 streams × 300 tokens at 30/s",
    ),
    Scenario(
        "capacity-1000",
        1000,
        300,
        1 / 30,
        ("direct", "pipe", "nginx", "naive", "rill", "rill-shared"),
        ramp=3.0,
        note="1,000 streams × 300 tokens at 30/s",
    ),
    Scenario("throughput", 20, 5000, 0.0, note="20 streams × 5,000 tokens, as fast as possible"),
    Scenario(
        "answers",
        500,
        2,
        0.0,
        ("direct", "nginx", "rill"),
        ramp=2.0,
        note="500 answers of 2 tokens over 2 s: what an answer costs apart from its tokens",
    ),
    Scenario(
        "split",
        100,
        300,
        0.01,
        ("direct", "pipe", "nginx", "naive", "rill"),
        split=0.1,
        ramp=0.5,
        note="10 % of upstream events in two pieces",
    ),
    Scenario(
        "resume-storm",
        100,
        300,
        1 / 30,
        ("rill",),
        ramp=1.0,
        resume_after=(50, 250),
        note="every client drops once mid-answer and resumes",
    ),
    Scenario(
        "abort-storm",
        100,
        300,
        1 / 30,
        ("naive", "rill"),
        ramp=1.0,
        abort_after=(30, 150),
        note="every client vanishes mid-answer",
    ),
]

QUICK = [
    Scenario("latency", 1, 200, 0.001),
    Scenario(
        "capacity-20",
        20,
        60,
        0.01,
        ("direct", "pipe", "nginx", "naive", "rill", "rill-history", "rill-history-end", "rill-shared"),
        ramp=0.2,
    ),
    Scenario("split", 10, 100, 0.002, split=0.3),
    Scenario("resume-storm", 10, 100, 0.01, ("rill",), resume_after=(20, 60)),
    Scenario("abort-storm", 10, 200, 0.01, ("naive", "rill"), abort_after=(10, 40)),
]


@dataclass
class Row:
    scenario: str
    target: str
    client: dict[str, Any]
    server_cpu_s: float | None = None
    server_peak_rss_mb: float | None = None
    upstream_requests: int | None = None
    upstream_open_after: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    round: int = 0  # with --repeat: which pass over the scenarios this row is from

    @property
    def cpu_us_per_token(self) -> float | None:
        delivered = self.client.get("delivered")
        return None if self.server_cpu_s is None or not delivered else self.server_cpu_s / delivered * 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(pid: int, core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(pid, {core})


def cores() -> tuple[int | None, int | None]:
    """(server core, bench core): different ones when there are two."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_ready(probe: Callable[[], object], process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Until `probe` stops raising OSError (the process answers), or fail with its log."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            probe()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up:\n{log.read_text()[-2000:]}")


def http_probe(url: str) -> Callable[[], object]:
    return lambda: urllib.request.urlopen(url, timeout=1).close()


def port_probe(port: int) -> Callable[[], object]:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close()


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile of a non-empty sample (share 0.5: the median)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


class Processes:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.running: list[subprocess.Popen[bytes]] = []
        self.started: Counter[str] = Counter()  # processes started, by name

    def start(
        self, name: str, args: list[str], env: dict[str, str], core: int | None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        # Each process its own file: the two Rills of rill-shared once wrote over each other's lines.
        self.started[name] += 1
        count = self.started[name]
        log = self.work / (f"{name}.log" if count == 1 else f"{name}-{count}.log")
        with log.open("wb") as out:  # the child keeps its own copy of the file
            process = subprocess.Popen(
                args, cwd=self.work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        pin(process.pid, core)
        self.running.append(process)
        return process, log

    def start_upstream(self, env: dict[str, str], core: int | None) -> tuple[subprocess.Popen[bytes], int]:
        """The fake upstream (bench/upstream.py), once it answers: its process and port."""
        port = free_port()
        process, log = self.start("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port)], env, core)
        wait_ready(http_probe(f"http://127.0.0.1:{port}/stats"), process, log, "the fake upstream")
        return process, port

    def start_redis(self, env: dict[str, str], core: int | None) -> tuple[subprocess.Popen[bytes], int]:
        """redis-server keeping nothing on disk, once it answers: its process and port."""
        port = free_port()
        binary = shutil.which("redis-server") or "redis-server"
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process, log = self.start("redis", args, env, core)
        wait_ready(port_probe(port), process, log, "redis-server")
        return process, port

    def start_rill(
        self, config: Path, up_port: int, env: dict[str, str], core: int | None, module: str = "server"
    ) -> tuple[subprocess.Popen[bytes], Path, str]:
        """Rill (`python -m server`, or a module that runs it) in front of the fake upstream,
        once it is ready: its process, log file and URL."""
        port = free_port()
        rill_env = env | {
            "RILL_CONFIG": str(config),
            "RILL_UPSTREAM_URL": f"http://127.0.0.1:{up_port}/v1",
            "RILL_MODEL": "bench",
            "RILL_PORT": str(port),
        }
        process, log = self.start("rill", [sys.executable, "-m", module], rill_env, core)
        url = f"http://127.0.0.1:{port}"
        wait_ready(http_probe(f"{url}/readyz"), process, log, "Rill")
        return process, log, url

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.terminate()
        for process in self.running:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.running.clear()


def rill_config(
    work: Path,
    resume_grace: float = RESUME_GRACE,
    finished_ttl: float | None = None,
    buffer_memory_mb: float | None = None,
    history: bool = False,
    save_interval: float | None = None,
) -> Path:
    """The bundled config with limits opened up for the load, and a short resume grace
    (the soak passes its own, and its finished_ttl and buffer cap). history: conversations
    stored in a fresh SQLite file in `work` (no automatic titles: the fake upstream answers
    scenarios only); else [storage] off."""
    text = (ROOT / "config.toml").read_text()
    document = tomllib.loads(text)  # check that it parses before editing
    assert "limits" in document
    overrides = {
        "max_concurrent_per_client = 4": "max_concurrent_per_client = 5000",
        "max_concurrent_total = 64": "max_concurrent_total = 5000",
        "max_streams_per_client = 16": "max_streams_per_client = 5000",
        "generations_per_minute = 20": "generations_per_minute = 100000",
        "resume_grace = 15.0": f"resume_grace = {resume_grace}",
    }
    if history:
        database = work / f"history-{time.monotonic_ns()}.db"
        overrides['\nurl = ""'] = f'\nurl = "sqlite:///{database}"'
        overrides["auto_titles = true "] = "auto_titles = false"
        if save_interval is not None:
            overrides["save_interval = 2.0"] = f"save_interval = {save_interval}"
    else:
        overrides["as before.\nenabled = true"] = "as before.\nenabled = false"
    if finished_ttl is not None:
        overrides["finished_ttl = 600.0"] = f"finished_ttl = {finished_ttl}"
    if buffer_memory_mb is not None:
        overrides["buffer_memory_mb = 64.0"] = f"buffer_memory_mb = {buffer_memory_mb}"
    for old, new in overrides.items():
        if text.count(old) != 1:  # `url = ""` once matched [cluster] redis_url as well
            raise RuntimeError(f"config.toml no longer has {old!r} exactly once: update bench/run.py")
        text = text.replace(old, new)
    path = work / "rill.toml"
    path.write_text(text)
    return path


def start_shared(
    processes: Processes, work: Path, up_port: int, env: dict[str, str], core: int | None, workers: int = 2
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]], list[str]]:
    """Shared mode: redis-server (no disk) and `workers` Rill processes on it, all on the
    server's core: (redis, the Rills, their URLs)."""
    redis, redis_port = processes.start_redis(env, core)
    config = rill_config(work)
    shared_env = env | {"RILL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    started = [processes.start_rill(config, up_port, shared_env, core) for _ in range(workers)]
    return redis, [process for process, _, _ in started], [url for _, _, url in started]


def run_one(scenario: Scenario, target: str, work: Path) -> Row:
    server_core, bench_core = cores()
    processes = Processes(work)
    base_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("RILL_")}
    base_env["PYTHONPATH"] = str(ROOT)
    try:
        _, up_port = processes.start_upstream(base_env, bench_core)
        server = None
        if target == "direct":
            url = f"http://127.0.0.1:{up_port}"
        elif target == "pipe":
            port = free_port()
            server, log = processes.start(
                "pipe",
                [sys.executable, "-m", "bench.pipe", "--port", str(port), "--upstream-port", str(up_port)],
                base_env,
                server_core,
            )
            url = f"http://127.0.0.1:{port}"
            wait_ready(port_probe(port), server, log, "the byte pipe")
        elif target == "naive":
            port = free_port()
            upstream_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
            server, log = processes.start(
                "naive",
                [sys.executable, "-m", "bench.naive", "--port", str(port), "--upstream", upstream_url],
                base_env,
                server_core,
            )
            url = f"http://127.0.0.1:{port}"
            wait_ready(port_probe(port), server, log, "the naive relay")
        elif target == "nginx":
            from .nginx import start_nginx

            server, url = start_nginx(processes, work, up_port, base_env, server_core)
        elif target == "rill-shared":
            shared = start_shared(processes, work, up_port, base_env, server_core)
            server, url = shared[0], shared[2][0]
        else:
            history = target.startswith("rill-history")
            config = rill_config(work, history=history, save_interval=3600.0 if target == "rill-history-end" else None)
            server, _, url = processes.start_rill(config, up_port, base_env, server_core)
        # Every process the target runs on, whose CPU counts: Redis and both Rills for rill-shared.
        counted = [server] if server is not None else []
        if target == "rill-shared":
            counted = [*shared[1], shared[0]]
        cpu, rss = cpu_seconds, peak_rss_mb
        if target == "nginx":
            from .nginx import family_cpu_seconds, family_peak_rss_mb

            cpu, rss = family_cpu_seconds, family_peak_rss_mb  # its master and its worker
        job = {
            # The pipe and nginx are read as the upstream is; both history targets ask as the page does.
            "target": "direct"
            if target in ("pipe", "nginx")
            else "rill-history"
            if target.startswith("rill-history")
            else target,
            "url": url,
            "streams": scenario.streams,
            "scenario": {"tokens": scenario.tokens, "interval": scenario.interval, "split": scenario.split, "seed": 7},
            "ramp": scenario.ramp,
            "resume_after": scenario.resume_after,
            "abort_after": scenario.abort_after,
            "fresh": scenario.fresh,
            "urls": shared[2] if target == "rill-shared" else [],
        }
        if target == "rill-shared":
            job["target"] = "rill"
        cpu_before = sum(cpu(p.pid) for p in counted) if counted else None
        redis_before = cpu_seconds(shared[0].pid) if target == "rill-shared" else 0.0
        client = subprocess.run(
            [sys.executable, "-m", "bench.client", json.dumps(job)],
            cwd=work,
            env=base_env,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=(lambda: pin(0, bench_core)) if bench_core is not None else None,
        )
        if client.returncode != 0:
            raise RuntimeError(f"client failed:\n{client.stderr[-3000:]}")
        row = Row(scenario.name, target, json.loads(client.stdout))
        if counted and cpu_before is not None:
            row.server_cpu_s = sum(cpu(p.pid) for p in counted) - cpu_before
            row.server_peak_rss_mb = max(rss(p.pid) for p in counted)
        if target == "rill-shared":
            row.extra["redis_cpu_s"] = cpu_seconds(shared[0].pid) - redis_before  # its share of server_cpu_s
        if scenario.abort_after is not None:
            time.sleep(RESUME_GRACE + 1.0)  # Rill keeps an unread answer going this long, then stops it
        stats = get_json(f"http://127.0.0.1:{up_port}/stats")
        row.upstream_requests, row.upstream_open_after = stats["requests"], stats["open"]
        return row
    finally:
        processes.stop_all()
