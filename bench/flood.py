"""`python -m bench.flood`: does a real client still get its answer while thousands of
connections try to hold Rill? (issue 13, item 1)

Rill (`python -m server`, the bundled config with the bench's opened-up answer limits,
its [server] connection settings untouched) runs alone on one core; the fake upstream,
the attacker and the legitimate client share the other. The attacker, in its own
process, holds from other loopback addresses (Linux accepts any 127/8 source, so Rill's
per-address bound bites as it would on the internet):
- `--stalled` connections that sent the headers of a 64-byte POST /api/session body
  and one byte of it (no token needed), then nothing;
- `--idle` connections, half that sent nothing at all, half kept alive after a request;
- one greedy address that tries `--greedy` connections at once.
Each connection Rill cuts is opened again at once, so the counts hold up all along.
With all of them open, the client (at yet another address) makes `--samples` fresh
connections in turn: POST /api/chat, then its event stream until the first token
arrives; that time is the latency sampled. The same is measured before the flood.
Prints a table, writes bench/results/flood.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from .run import RESULTS, ROOT, Processes, cores, percentile, rill_config

PER_ADDRESS = 40  # attacker connections per source address: under Rill's default bound of 64
ATTACK_HOST = "127.0.0.1"


def raise_nofile() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def source(kind: int, index: int) -> str:
    """127.0.<kind>.<n>: each kind of attacker from its own addresses, PER_ADDRESS each."""
    return f"127.{10 + kind}.{index // PER_ADDRESS // 250}.{index // PER_ADDRESS % 250 + 2}"


# --- the attacker process ------------------------------------------------------------


class Attacker:
    def __init__(self, port: int) -> None:
        self.port = port
        self.open = {"stalled": 0, "silent": 0, "kept_alive": 0, "greedy": 0}
        self.cut = {"stalled": 0, "silent": 0, "kept_alive": 0}
        self.refused = 0  # closed by Rill before anything was sent
        self.failed_connects = 0

    async def _connect(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection(ATTACK_HOST, self.port, local_addr=(address, 0))
        except OSError:
            self.failed_connects += 1
            await asyncio.sleep(0.5)
            return None

    async def hold(self, kind: str, address: str) -> None:
        """One connection of one kind, opened again each time Rill closes it."""
        host = f"Host: {ATTACK_HOST}:{self.port}\r\n"
        while True:
            opened = await self._connect(address)
            if opened is None:
                continue
            reader, writer = opened
            self.open[kind] += 1
            try:
                if kind == "stalled":
                    writer.write(
                        f"POST /api/chat HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
                        "Content-Length: 64\r\n\r\n{".encode()
                    )
                elif kind == "kept_alive":
                    writer.write(f"GET /healthz HTTP/1.1\r\n{host}\r\n".encode())
                while await reader.read(65536):
                    pass
            except OSError:
                pass
            finally:
                self.open[kind] -= 1
                self.cut[kind] += 1
                writer.close()

    async def greedy(self, address: str, count: int) -> None:
        """All at once from one address: Rill keeps its per-address bound, closes the rest."""
        await asyncio.gather(*(self._one_greedy(address) for _ in range(count)))

    async def _one_greedy(self, address: str) -> None:
        opened = await self._connect(address)
        if opened is None:
            return
        reader, writer = opened
        try:
            async with asyncio.timeout(0.5):
                closed = await reader.read(1) == b""
        except TimeoutError:
            closed = False
        except OSError:
            closed = True
        if closed:
            self.refused += 1
            writer.close()
            return
        self.open["greedy"] += 1
        with contextlib.suppress(OSError):
            await reader.read(1)  # held until Rill cuts it at its header deadline
        self.open["greedy"] -= 1
        writer.close()

    def report(self, phase: str) -> None:
        line = {"phase": phase, "open": dict(self.open), "cut": dict(self.cut), "refused": self.refused}
        line["failed_connects"] = self.failed_connects
        print(json.dumps(line), flush=True)


async def attack(port: int, stalled: int, idle: int, greedy: int, ramp: float) -> None:
    raise_nofile()
    attacker = Attacker(port)
    tasks = []
    plan = [("stalled", stalled), ("silent", idle // 2), ("kept_alive", idle - idle // 2)]
    slots = [
        (kind, source(kind_index, index)) for kind_index, (kind, count) in enumerate(plan) for index in range(count)
    ]
    random.Random(7).shuffle(slots)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for number, (kind, address) in enumerate(slots):
        # Spread over `ramp` seconds, as a steady attack opens them (and as they reopen
        # after Rill's deadlines), rather than all in one instant.
        await asyncio.sleep(max(0.0, started + ramp * number / len(slots) - loop.time()))
        tasks.append(asyncio.create_task(attacker.hold(kind, address)))
    wanted = stalled + idle
    while sum(attacker.open[kind] for kind, _ in plan) < wanted:  # noqa: ASYNC110 - counts, not an event
        await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(attacker.greedy("127.9.0.2", greedy)))
    await asyncio.sleep(2.0)
    attacker.report("holding")
    while True:
        await asyncio.sleep(1.0)
        attacker.report("status")


# --- the measuring side ----------------------------------------------------------------


async def one_answer(url: str, address: str) -> float:
    """POST /api/chat and its stream until the first token, on fresh connections."""
    connector = aiohttp.TCPConnector(force_close=True, local_addr=(address, 0))
    body = {"messages": [{"role": "user", "content": json.dumps({"tokens": 5, "interval": 0, "seed": 7})}]}
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        async with session.post(f"{url}/api/chat", json=body) as created:
            assert created.status == 201, await created.text()
            events = (await created.json())["events"]
        async with session.get(f"{url}{events}") as stream:
            assert stream.status == 200
            first = None
            ended = False
            async for line in stream.content:
                if first is None and line.startswith(b"event: delta"):
                    first = time.perf_counter() - started
                if line.startswith(b"event: done"):
                    ended = True
                    break
            assert first is not None, "no token arrived"
            assert ended, "the answer did not end"
            return first


async def sample(url: str, count: int, gap: float) -> list[float]:
    latencies = []
    for index in range(count):
        latencies.append(await one_answer(url, f"127.250.0.{index % 200 + 2}"))
        await asyncio.sleep(gap)
    return latencies


def lag_counts(url: str) -> dict[str, float]:
    """Rill's own event-loop lag histogram (its monitor task, every 0.5 s): cumulative counts."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("rill_heartbeat_lag_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            counts[bound] = float(line.rsplit(" ", 1)[1])
    return counts


def lag_over(start: dict[str, float], end: dict[str, float]) -> dict[str, int]:
    """How many monitor ticks in between ran more than 25 / 50 / 100 ms late."""
    total = end["+Inf"] - start["+Inf"]
    return {
        "ticks": int(total),
        **{f"over_{int(float(b) * 1000)}ms": int(total - (end[b] - start[b])) for b in ("0.025", "0.05", "0.1")},
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def phase(url: str, pid: int, samples: int, gap: float) -> dict[str, Any]:
    """The latencies of `samples` answers, and what Rill itself spent meanwhile."""
    lag, cpu = lag_counts(url), cpu_seconds(pid)
    latencies = await sample(url, samples, gap)
    figures: dict[str, Any] = dict(summary(latencies))
    figures["rill_cpu_s"] = round(cpu_seconds(pid) - cpu, 2)
    figures["rill_loop_lag"] = lag_over(lag, lag_counts(url))
    return figures


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "n": len(latencies),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server_core, bench_core = cores()
    processes = Processes(work)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("RILL_")}
    env["PYTHONPATH"] = str(ROOT)
    if bench_core is not None:
        os.sched_setaffinity(0, {bench_core})
    try:
        upstream, up_port = processes.start_upstream(env, bench_core)
        rill, rill_log, url = processes.start_rill(rill_config(work), up_port, env, server_core)
        if args.renice:
            # On a machine others share, their load shows in every percentile: this takes
            # Rill, the upstream and the measuring client (not the attacker) out of it.
            for pid in (0, upstream.pid, rill.pid):
                os.setpriority(os.PRIO_PROCESS, pid, args.renice)

        await sample(url, 10, 0.0)  # warm-up
        before = await phase(url, rill.pid, args.samples, args.gap)
        rss_before = rss_mb(rill.pid)

        job = [str(URL(url).port), str(args.stalled), str(args.idle), str(args.greedy), str(args.ramp)]
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.flood", "--attacker", *job, env=env, stdout=asyncio.subprocess.PIPE
        )
        assert attacker.stdout is not None
        lines = attacker.stdout
        latest: dict[str, Any] = {}

        async def follow() -> None:
            while line := await lines.readline():
                latest.update(json.loads(line))

        following = asyncio.create_task(follow())
        try:
            async with asyncio.timeout(120):
                while latest.get("phase") != "holding":  # noqa: ASYNC110 - a status from another process
                    await asyncio.sleep(0.1)
            holding = dict(latest)
            fds_during = open_fds(rill.pid)
            during = await phase(url, rill.pid, args.samples, args.gap)
            rss_during = rss_mb(rill.pid)
            await asyncio.sleep(1.1)  # the attacker's next status line
            attacker_status = dict(latest)
        finally:
            attacker.terminate()
            await attacker.wait()
            following.cancel()
        await asyncio.sleep(2.0)  # Rill closes what the attacker left
        after = await phase(url, rill.pid, args.samples, args.gap)
        log = rill_log.read_text()
        if args.log is not None:
            args.log.write_text(log)
        return {
            "before": before,
            "during": during,
            "after": after,
            "attacker_when_measuring_began": holding,
            "attacker_when_measuring_ended": attacker_status,
            "rill_open_fds_during": fds_during,
            "rill_rss_mb": {"before": round(rss_before, 1), "during": round(rss_during, 1)},
            "rill_warning_lines": sum(" WARNING " in line for line in log.splitlines()),
            "rill_warnings": [line[:300] for line in log.splitlines() if " WARNING " in line or " ERROR " in line][:10],
            "rill_error_lines": sum(" ERROR " in line for line in log.splitlines()),
        }
    finally:
        processes.stop_all()


def report(result: dict[str, Any]) -> str:
    lines = [
        "| POST /api/chat + stream, to the first token | p50 ms | p99 ms | max ms | Rill CPU s | Rill late >50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("before", "during", "after"):
        f = result[name]
        lag = f["rill_loop_lag"]
        lines.append(
            f"| {name} the flood ({f['n']} answers) | {f['p50_ms']} | {f['p99_ms']} | {f['max_ms']} "
            f"| {f['rill_cpu_s']} | {lag['over_50ms']} of {lag['ticks']} ticks |"
        )
    began, ended = result["attacker_when_measuring_began"], result["attacker_when_measuring_ended"]
    lines += [
        "",
        f"attacker connections open as measuring began: {began['open']}; refused: {began['refused']}",
        f"as it ended: {ended['open']}; cut and opened again so far: {ended['cut']}",
        f"Rill: {result['rill_open_fds_during']} open files, RSS {result['rill_rss_mb']} MB",
        f"load average (1 min) as it ended: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        f"Rill's WARNING/ERROR log lines: {result['rill_warning_lines']} / {result['rill_error_lines']}",
        *(f"  {line}" for line in result["rill_warnings"]),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood")
    parser.add_argument("--stalled", type=int, default=2000, help="connections with a stalled request body")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections (half silent, half kept alive)")
    parser.add_argument("--greedy", type=int, default=500, help="connections tried at once from one address")
    parser.add_argument("--samples", type=int, default=100, help="legitimate answers timed before and during")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between two legitimate answers")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds over which the attacker opens them")
    parser.add_argument("--attacker", nargs=5, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--renice", type=int, default=0, help="niceness for all but the attacker (root: < 0)")
    parser.add_argument("--log", type=Path, help="keep Rill's log here")
    parser.add_argument("--out", type=Path, default=RESULTS / "flood.json")
    args = parser.parse_args()
    if args.attacker:
        port, stalled, idle, greedy = (int(value) for value in args.attacker[:4])
        asyncio.run(attack(port, stalled, idle, greedy, float(args.attacker[4])))
        return 0
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="rill-flood-") as work:
        result = asyncio.run(measure(args, Path(work)))
    result["config"] = {
        "stalled": args.stalled,
        "idle": args.idle,
        "greedy": args.greedy,
        "samples": args.samples,
        "ramp": args.ramp,
        "renice": args.renice,
        "load_average": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
