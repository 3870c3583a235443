"""`python -m bench rolling-restart`: Rill processes in shared mode behind the real nginx
(the shipped site, one `server` line per process), restarted one after the other while
answers stream, as `deploy/install.sh --workers N` restarts them on an upgrade.

Every answer is started through nginx and read through nginx the way EventSource reads
it: when a stream ends without its last event (its process stopped), the reader comes
back with `Last-Event-ID`, through nginx, to whichever process answers. Meanwhile a new
answer is started every `--new-every` seconds. What must hold: no failed request, no
502, no token lost or repeated, every answer complete."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .nginx import main_config, nginx_args
from .run import ROOT, Processes, free_port, http_probe, port_probe, rill_config, wait_ready
from .wire import TOKEN, SSELines

RECONNECTS_MAX = 20  # per answer: more means something is wrong, not a restart


@dataclass
class Answer:
    number: int
    tokens: list[int] = field(default_factory=list)  # token indexes, in the order they came
    ended: str = ""  # the terminal event's name
    reconnects: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Tally:
    answers: list[Answer] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def saw(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def follow(
    session: aiohttp.ClientSession, url: str, scenario: dict[str, Any], answer: Answer, tally: Tally
) -> None:
    body = {"messages": [{"role": "user", "content": json.dumps(scenario)}]}
    async with session.post(f"{url}/api/chat", json=body) as response:
        tally.saw(response.status)
        if response.status != 201:
            answer.failures.append(f"POST {response.status}: {(await response.text())[:200]}")
            return
        events = (await response.json())["events"]
    last_id: str | None = None
    while answer.reconnects <= RECONNECTS_MAX:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with session.get(f"{url}{events}", headers=headers) as response:
                tally.saw(response.status)
                if response.status == 204:
                    return  # everything was delivered already
                if response.status != 200:
                    answer.failures.append(f"GET {response.status}: {(await response.text())[:200]}")
                    return
                lines = SSELines()
                async for chunk in response.content.iter_any():
                    for event in lines.feed(chunk):
                        last_id = event.id or last_id
                        if event.name == "delta":
                            answer.tokens.extend(
                                int(m.group(1)) for m in TOKEN.finditer(json.loads(event.data)["text"])
                            )
                        elif event.name in ("done", "error"):
                            answer.ended = event.name
                            if event.name == "error":
                                answer.failures.append(f"error event: {event.data[:200]}")
                            return
        except aiohttp.ClientError:
            pass  # its process went away mid-stream: back with Last-Event-ID, as EventSource
        answer.reconnects += 1
        await asyncio.sleep(0.05)  # EventSource waits `retry`; a short wait keeps the run short
    answer.failures.append("too many reconnects")


def site(ports: list[int], listen: int) -> str:
    text = (ROOT / "deploy/nginx/rill.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{port} max_fails=0;\n" for port in ports)
    text = text.replace("    server 127.0.0.1:8080 max_fails=0;\n", servers)
    return text.replace("listen 80;", f"listen 127.0.0.1:{listen};").replace("listen [::]:80;", "")


def stop_and_restart(processes: Processes, index: int, rill: list[subprocess.Popen[bytes]], start: Any) -> float:
    """SIGTERM process `index`, wait for it to exit (its answers finish first), start a
    new one on its port: the seconds it took."""
    began = time.monotonic()
    old = rill[index]
    old.send_signal(signal.SIGTERM)
    old.wait(timeout=300)
    if old.returncode != 0:
        raise RuntimeError(f"Rill process {index} exited {old.returncode}")
    rill[index] = start(index)
    return time.monotonic() - began


async def run(
    streams: int, tokens: int, interval: float, workers: int, new_every: float, work: Path, drain_timeout: float = 120.0
) -> dict[str, Any]:
    processes = Processes(work)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RILL_") and not k.endswith("_API_KEY")}
    base_env["PYTHONPATH"] = str(ROOT)
    _, redis_port = processes.start_redis(base_env, None)
    _, up_port = processes.start_upstream(base_env, None)
    config = rill_config(work)
    text = config.read_text().replace("allowed_hosts = []", 'allowed_hosts = ["127.0.0.1"]')  # nginx guards it
    config.write_text(text)
    ports = [free_port() for _ in range(workers)]
    env = base_env | {
        "RILL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "RILL_DRAIN_TIMEOUT": str(drain_timeout),
        "RILL_CONFIG": str(config),
        "RILL_UPSTREAM_URL": f"http://127.0.0.1:{up_port}/v1",
        "RILL_MODEL": "bench",
    }

    def start(index: int) -> subprocess.Popen[bytes]:
        process, log = processes.start(
            f"rill-{index}", [sys.executable, "-m", "server"], env | {"RILL_PORT": str(ports[index])}, None
        )
        wait_ready(http_probe(f"http://127.0.0.1:{ports[index]}/readyz"), process, log, f"Rill {index}")
        return process

    rill = [start(index) for index in range(workers)]
    listen = free_port()
    (work / "site.conf").write_text(site(ports, listen))
    (work / "nginx.conf").write_text(main_config(work, f"    include {work}/site.conf;", connections=4096))
    nginx, nginx_log = processes.start("nginx", nginx_args(work), base_env, None)
    wait_ready(port_probe(listen), nginx, nginx_log, "nginx")
    url = f"http://127.0.0.1:{listen}"
    scenario = {"tokens": tokens, "interval": interval, "split": 0.0, "seed": 7}
    tally = Tally()
    restarts: list[float] = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            followers: list[asyncio.Task[None]] = []

            def begin() -> None:
                answer = Answer(len(tally.answers))
                tally.answers.append(answer)
                followers.append(asyncio.create_task(follow(session, url, scenario, answer, tally)))

            for _ in range(streams):
                begin()
                await asyncio.sleep(1.0 / streams)  # a one-second ramp
            more = True

            async def keep_starting() -> None:
                while more:
                    begin()
                    await asyncio.sleep(new_every)

            starter = asyncio.create_task(keep_starting())
            await asyncio.sleep(tokens * interval / 4)  # the answers are well under way
            for index in range(workers):
                restarts.append(await asyncio.to_thread(stop_and_restart, processes, index, rill, start))
            more = False
            await starter
            await asyncio.wait_for(asyncio.gather(*followers), timeout=tokens * interval * 4 + 60)
    finally:
        processes.stop_all()
    expected = list(range(tokens))
    incomplete = [a for a in tally.answers if a.ended != "done" or a.tokens != expected]
    lost = sum(len(set(expected) - set(a.tokens)) for a in tally.answers)
    repeated = sum(len(a.tokens) - len(set(a.tokens)) for a in tally.answers)
    failures = [f"answer {a.number}: {f}" for a in tally.answers for f in a.failures]
    return {
        "workers": workers,
        "answers": len(tally.answers),
        "live_at_first_restart": streams,
        "statuses": tally.statuses,
        "failed_requests": sum(n for status, n in tally.statuses.items() if status not in (200, 201, 204)),
        "status_502": tally.statuses.get(502, 0),
        "tokens_lost": lost,
        "tokens_repeated": repeated,
        "incomplete": len(incomplete),
        "reconnects": sum(a.reconnects for a in tally.answers),
        "restart_seconds": [round(s, 1) for s in restarts],
        "failures": failures[:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench rolling-restart")
    parser.add_argument("--streams", type=int, default=200, help="answers live when the first restart begins")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per answer")
    parser.add_argument("--interval", type=float, default=1 / 30, help="seconds between tokens")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--new-every", type=float, default=0.1, help="seconds between new answers during the restarts")
    parser.add_argument(
        "--drain-timeout", type=float, default=120.0, help="each process's [server] drain_timeout (0: answers cut)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rill-rolling-") as work:
        result = asyncio.run(
            run(args.streams, args.tokens, args.interval, args.workers, args.new_every, Path(work), args.drain_timeout)
        )
    print(json.dumps(result, indent=2))
    ok = (
        result["failed_requests"] == 0
        and result["tokens_lost"] == 0
        and result["incomplete"] == 0
        and result["tokens_repeated"] == 0
    )
    print("rolling restart:", "no failure visible to users" if ok else "FAILURES")
    return 0 if ok else 1
