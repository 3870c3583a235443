"""`python -m bench soak --minutes 60`: does Rill's memory level off under a steady churn?

Rill (run by bench/probe.py: `python -m server` plus a look inside on a signal) serves
a fixed mix of answers at a steady rate, in fixed proportions (see MIX): complete, stopped
mid-answer with DELETE, abandoned (the client vanishes and never returns, so
`resume_grace` ends the answer) and resumed with Last-Event-ID after a drop. Prompts
vary from 100 characters to 50,000, every answer has its own client_id, the answers
spread over several access tokens, some POSTs are repeated (a client retrying) and some
come with a wrong token from ever new addresses, so every per-client structure is used.

Every `--sample` seconds it records Rill's RSS and what bench/probe.py sees: glibc's
heap (in use and free inside it), pymalloc blocks, live objects. It prints a table,
and the verdict: how RSS grew per 1,000 answers over the last half of the run. Ended
answers are kept for `finished_ttl` (600 s) and legitimately grow RSS until the first
ones expire, so the last half means something only once it starts after that: run at
least twice `finished_ttl + resume_grace`, or pass a shorter `--finished-ttl`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .loops import install_fast_loop
from .probe import status_kb
from .run import RESULTS, Processes, cores, pin, rill_config

# Ten answers in a row, then again: 50 % complete, 20 % stopped, 20 % resumed, 10 % abandoned.
MIX = (
    *("complete", "stopped", "complete", "resumed", "complete"),
    *("abandoned", "complete", "stopped", "resumed", "complete"),
)
TOKENS = 8  # access tokens the answers spread over
RETRY_EVERY = 25  # every 25th answer's POST is sent twice (same client_id: the same answer)
WRONG_TOKEN_EVERY = 50  # and every 50th comes with a wrong token first, from a new address
ENDLESS = 1_000_000  # tokens of an abandoned answer: only resume_grace ends it
DELTA = re.compile(rb"^event: delta\r?$", re.MULTILINE)
EVENT_ID = re.compile(rb"^id: ?(\d+)\r?$", re.MULTILINE)
TERMINAL = re.compile(rb"^event: (done|error)\r?$", re.MULTILINE)
WORDS = ("stream", "token", "answer", "relay", "buffer", "window", "heap", "arena", "page", "ttl", "rill", "的", "流")


@dataclass
class SoakOptions:
    minutes: float = 60.0
    rate: float = 12.0  # answers started per second
    tokens_per_s: float = 40.0  # pace of the fake upstream's answers
    finished_ttl: float = 600.0
    resume_grace: float = 15.0
    buffer_memory_mb: float = 64.0
    sample_s: float = 30.0
    report_every_s: float = 300.0
    seed: int = 1
    env: dict[str, str] = field(default_factory=dict)  # extra environment for Rill (MALLOC_ARENA_MAX=2)
    trim_at_end: bool = True  # at the end, a full collection and malloc_trim(0): what garbage and fragmentation held


@dataclass
class Sample:
    t: float  # seconds since the churn began
    started: int
    ended: int
    rss_mb: float
    anon_mb: float
    heap_in_use_mb: float | None = None  # malloc: uordblks + hblkhd (mmapped chunks)
    heap_free_mb: float | None = None  # malloc: fordblks, free inside the heap
    pymalloc_mb: float | None = None  # pymalloc's arenas (1 MiB each, mmapped outside the heap)
    pymalloc_used_mb: float | None = None  # in their allocated blocks
    pymalloc_blocks: int | None = None
    gc_objects: int | None = None


@dataclass
class Tally:
    started: int = 0
    ended: Counter[str] = field(default_factory=Counter)  # "kind: outcome"
    requests: int = 0

    @property
    def answers_ended(self) -> int:
        return sum(self.ended.values())


class Churn:
    """The client side: answers of the mix at a steady rate, each its own task."""

    def __init__(self, url: str, secrets: list[str], options: SoakOptions) -> None:
        self.url = url
        self.secrets = secrets
        self.options = options
        self.tally = Tally()
        self.rng = random.Random(options.seed)
        self.tasks: set[asyncio.Task[None]] = set()
        words = random.Random(0)
        self.corpus = " ".join(words.choice(WORDS) for _ in range(30_000))

    async def run(self, session: aiohttp.ClientSession, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        number = 0
        while (due := begin + number / self.options.rate) < begin + seconds:
            await asyncio.sleep(max(0.0, due - loop.time()))
            task = asyncio.create_task(self.answer(session, number, random.Random(self.rng.random())))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            number += 1
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=60)

    def _messages(self, rng: random.Random, scenario: dict[str, Any]) -> list[dict[str, str]]:
        """A conversation of 100 to 50,000 characters (log-uniform), scenario last."""
        size = int(10 ** rng.uniform(2, 4.7))
        turns = rng.randint(0, 3) * 2
        messages = []
        for turn in range(turns):
            start = rng.randrange(0, len(self.corpus) - 1)
            text = self.corpus[start : start + size // (turns + 1)] or "hello"
            messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
        pad = self.corpus[: max(0, size // (turns + 1))]
        messages.append({"role": "user", "content": json.dumps(scenario | {"pad": pad})})
        return messages

    async def answer(self, session: aiohttp.ClientSession, number: int, rng: random.Random) -> None:
        kind = MIX[number % len(MIX)]
        self.tally.started += 1
        try:
            outcome = await self._answer(session, number, rng, kind)
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome = type(exc).__name__
        self.tally.ended[f"{kind}: {outcome}"] += 1

    async def _answer(self, session: aiohttp.ClientSession, number: int, rng: random.Random, kind: str) -> str:
        auth = {"Authorization": f"Bearer {self.secrets[number % len(self.secrets)]}"}
        tokens = ENDLESS if kind == "abandoned" else rng.randint(20, 400)
        scenario = {"tokens": tokens, "interval": 1 / self.options.tokens_per_s, "seed": number}
        body = {"messages": self._messages(rng, scenario), "client_id": str(uuid.UUID(int=rng.getrandbits(128)))}
        if number % WRONG_TOKEN_EVERY == 0:
            address = f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}"
            wrong = {"Authorization": "Bearer not-a-valid-token-at-all", "X-Forwarded-For": address}
            async with session.post(f"{self.url}/api/chat", json=body, headers=wrong) as refused:
                self.tally.requests += 1
                if refused.status != 401:
                    return f"wrong token got {refused.status}"
        for attempt in range(2 if number % RETRY_EVERY == 0 else 1):
            async with session.post(f"{self.url}/api/chat", json=body, headers=auth) as created:
                self.tally.requests += 1
                if created.status != (201 if attempt == 0 else 200):
                    return f"POST {created.status}"
                events = (await created.json())["events"]
        stop_at = {
            "complete": None,
            "stopped": rng.randint(3, min(tokens - 1, 100)),
            "resumed": rng.randint(3, tokens - 3),
            "abandoned": rng.randint(3, 60),
        }[kind]
        ended, last_id, seen = await self._read(session, f"{self.url}{events}", auth, stop_at)
        if kind == "complete" or ended is not None:  # a resumed one may end before its drop
            return "ok" if ended == b"done" and seen == tokens else f"{ended!r} after {seen}"
        if kind == "abandoned":
            return "ok"  # gone for good: Rill ends it after resume_grace
        if kind == "stopped":
            async with session.delete(f"{self.url}{events}".removesuffix("/events"), headers=auth) as stopped:
                self.tally.requests += 1
                return "ok" if stopped.status == 200 else f"DELETE {stopped.status}"
        # Resumed: the connection dropped, the page comes back well within resume_grace.
        await asyncio.sleep(rng.uniform(0.1, 2.0) * min(1.0, self.options.resume_grace / 4))
        ended, _, more = await self._read(session, f"{self.url}{events}", auth | {"Last-Event-ID": last_id}, None)
        return "ok" if ended == b"done" and seen + more == tokens else f"resumed: {ended!r} after {seen}+{more}"

    async def _read(
        self, session: aiohttp.ClientSession, url: str, headers: dict[str, str], stop_at: int | None
    ) -> tuple[bytes | None, str, int]:
        """Reads the events until the terminal one, or until `stop_at` deltas, then drops
        the connection. Returns the terminal event's name (None: none), the last id, deltas."""
        seen, last_id, pending = 0, "0", b""
        async with session.get(url, headers=headers) as response:
            self.tally.requests += 1
            if response.status != 200:
                return f"GET {response.status}".encode(), last_id, seen
            async for chunk in response.content.iter_any():
                pending += chunk
                end = pending.rfind(b"\r\n\r\n")
                if end < 0:
                    continue
                complete, pending = pending[: end + 4], pending[end + 4 :]
                seen += len(DELTA.findall(complete))
                if ids := EVENT_ID.findall(complete):
                    last_id = ids[-1].decode()
                if terminal := TERMINAL.search(complete):
                    return terminal.group(1), last_id, seen
                if stop_at is not None and seen >= stop_at:
                    response.close()  # mid-answer: the connection drops
                    return None, last_id, seen
        return None, last_id, seen


class Probe:
    """Rill's RSS from /proc, and the probe's look inside on SIGUSR1 (bench/probe.py)."""

    def __init__(self, pid: int, path: Path) -> None:
        self.pid = pid
        self.path = path
        self.lines = 0

    async def ask(self, signal_number: int = signal.SIGUSR1) -> list[dict[str, Any]]:
        os.kill(self.pid, signal_number)
        for _ in range(100):  # it answers at its next bytecode: at once under load
            await asyncio.sleep(0.02)
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            wanted = 2 if signal_number == signal.SIGUSR2 else 1
            if len(lines) >= self.lines + wanted:
                new = [json.loads(line) for line in lines[self.lines :]]
                self.lines = len(lines)
                return new
        return []

    async def sample(self, t: float, tally: Tally) -> Sample:
        status = status_kb(self.pid)
        sample = Sample(t, tally.started, tally.answers_ended, status["VmRSS"] / 1024, status["RssAnon"] / 1024)
        inside = await self.ask()
        if inside:
            fill(sample, inside[-1])
        return sample


def fill(sample: Sample, inside: dict[str, Any]) -> None:
    if malloc := inside.get("malloc"):
        sample.heap_in_use_mb = (malloc["uordblks"] + malloc["hblkhd"]) / 2**20
        sample.heap_free_mb = malloc["fordblks"] / 2**20
    if pymalloc := inside.get("pymalloc"):
        sample.pymalloc_mb = pymalloc["arenas"]
        sample.pymalloc_used_mb = pymalloc["allocated"] / 2**20
    sample.pymalloc_blocks = inside["pymalloc_blocks"]
    sample.gc_objects = inside["gc_objects"]


def slope_per_1000(samples: list[Sample], field_name: str = "rss_mb") -> float | None:
    """Least-squares slope of a figure (MB) against answers ended, per 1,000 answers."""
    points: list[tuple[int, float]] = [
        (s.ended, float(getattr(s, field_name))) for s in samples if getattr(s, field_name) is not None
    ]
    if len(points) < 3:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread * 1000


def verdict(samples: list[Sample], options: SoakOptions) -> dict[str, Any]:
    last_half = [s for s in samples if s.t >= samples[-1].t / 2]
    settled = last_half[0].t >= options.finished_ttl + options.resume_grace if last_half else False
    rss = slope_per_1000(last_half)
    return {
        "rss_mb_per_1000_answers_last_half": rss,
        "heap_in_use_mb_per_1000_answers_last_half": slope_per_1000(last_half, "heap_in_use_mb"),
        "anon_mb_per_1000_answers_last_half": slope_per_1000(last_half, "anon_mb"),
        "last_half_past_finished_ttl": settled,
        "rss_first_mb": samples[0].rss_mb,
        "rss_last_mb": samples[-1].rss_mb,
        "rss_peak_mb": max(s.rss_mb for s in samples),
    }


def table(samples: list[Sample], every: float) -> str:
    rows = [
        "| minute | answers ended | answers/s | RSS MB | anon MB | malloc in use MB | malloc free MB "
        "| pymalloc MB (in use) | objects |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shown: list[Sample] = []
    for sample in samples:
        if not shown or sample.t - shown[-1].t >= every - 1 or sample is samples[-1]:
            shown.append(sample)
    previous = None
    for sample in shown:
        rate = (sample.ended - previous.ended) / (sample.t - previous.t) if previous and sample.t > previous.t else 0
        rows.append(
            f"| {sample.t / 60:.1f} | {sample.ended:,} | {rate:.1f} | {sample.rss_mb:.1f} | {sample.anon_mb:.1f} "
            f"| {_mb(sample.heap_in_use_mb)} | {_mb(sample.heap_free_mb)} "
            f"| {_mb(sample.pymalloc_mb)} ({_mb(sample.pymalloc_used_mb)}) "
            f"| {_count(sample.gc_objects)} |"
        )
        previous = sample
    return "\n".join(rows)


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


async def soak(url: str, pid: int, probe_file: Path, secrets: list[str], options: SoakOptions) -> dict[str, Any]:
    probe = Probe(pid, probe_file)
    churn = Churn(url, secrets, options)
    samples: list[Sample] = []
    loop = asyncio.get_running_loop()
    begin = loop.time()

    async def sampler() -> None:
        while True:
            sample = await probe.sample(loop.time() - begin, churn.tally)
            samples.append(sample)
            print(
                f"{sample.t / 60:6.1f} min  {sample.ended:7,} answers  RSS {sample.rss_mb:6.1f} MB  "
                f"malloc in use {_mb(sample.heap_in_use_mb)} free {_mb(sample.heap_free_mb)}  "
                f"pymalloc {_mb(sample.pymalloc_mb)} ({_mb(sample.pymalloc_used_mb)})  "
                f"objects {_count(sample.gc_objects)}",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(max(0.0, begin + len(samples) * options.sample_s - loop.time()))

    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        sampling = asyncio.create_task(sampler())
        await churn.run(session, options.minutes * 60)
        sampling.cancel()
        await asyncio.wait({sampling})
    wall = loop.time() - begin
    samples.append(await probe.sample(wall, churn.tally))
    trimmed: list[dict[str, Any]] = await probe.ask(signal.SIGUSR2) if options.trim_at_end else []
    return {
        "options": asdict(options),
        "mix": dict(Counter(MIX)),
        "wall_s": wall,
        "answers_started": churn.tally.started,
        "answers_ended": churn.tally.answers_ended,
        "answers_per_s": churn.tally.answers_ended / wall,
        "requests": churn.tally.requests,
        "outcomes": dict(sorted(churn.tally.ended.items())),
        "verdict": verdict(samples, options),
        "trim_at_end": trimmed,
        "samples": [asdict(s) for s in samples],
    }


def report(result: dict[str, Any]) -> str:
    options, verdict_ = result["options"], result["verdict"]
    mix = ", ".join(f"{count * 10} % {kind}" for kind, count in result["mix"].items())
    slope = verdict_["rss_mb_per_1000_answers_last_half"]
    lines = [
        f"Soak: {result['wall_s'] / 60:.1f} min, {result['answers_ended']:,} answers "
        f"({result['answers_per_s']:.1f}/s; {mix}), {result['requests']:,} requests, "
        f"finished_ttl {options['finished_ttl']:g} s, resume_grace {options['resume_grace']:g} s"
        + (f", env {options['env']}" if options["env"] else ""),
        "",
        table([Sample(**s) for s in result["samples"]], options["report_every_s"]),
        "",
        "Outcomes: " + ", ".join(f"{name} {count:,}" for name, count in result["outcomes"].items()),
    ]
    if len(result["trim_at_end"]) == 2:
        before, after = result["trim_at_end"]
        lines.append(
            f"At the end, a full collection ({after.get('collected', '?')} objects in cycles) and malloc_trim(0): "
            f"RSS {before['rss_kb'] / 1024:.1f} -> {after['rss_kb'] / 1024:.1f} MB"
        )
    if slope is None:
        lines.append("Verdict: too few samples for a slope.")
    else:
        heap = verdict_["heap_in_use_mb_per_1000_answers_last_half"]
        lines.append(
            f"Verdict: over the last half RSS grew {slope:+.3f} MB per 1,000 answers"
            + (f" (malloc in use {heap:+.3f})" if heap is not None else "")
            + (
                ""
                if verdict_["last_half_past_finished_ttl"]
                else "; the last half began before finished_ttl: retained answers still count in it"
            )
        )
    return "\n".join(lines)


def run_soak(options: SoakOptions, work: Path) -> dict[str, Any]:
    server_core, bench_core = cores()
    processes = Processes(work)
    base_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("RILL_")}
    base_env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    secrets = [f"soak-token-{n:02d}-{uuid.UUID(int=n).hex}" for n in range(TOKENS)]
    probe_file = work / "probe.jsonl"
    state = work / "state"
    state.mkdir()
    try:
        _, up_port = processes.start_upstream(base_env, bench_core)
        config = rill_config(
            work,
            resume_grace=options.resume_grace,
            finished_ttl=options.finished_ttl,
            buffer_memory_mb=options.buffer_memory_mb,
        )
        env = (
            base_env
            | {
                "RILL_ACCESS_TOKENS": ",".join(f"user{n}:{secret}" for n, secret in enumerate(secrets)),
                "RILL_STATE_DIR": str(state),
                "RILL_LOG_LEVEL": "WARNING",  # ~50 INFO lines a second would be the log's memory, not Rill's
                "BENCH_PROBE_FILE": str(probe_file),
            }
            | options.env
        )
        server, _, url = processes.start_rill(config, up_port, env, server_core, module="bench.probe")
        return asyncio.run(soak(url, server.pid, probe_file, secrets, options))
    finally:
        processes.stop_all()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=12.0, help="answers started per second")
    parser.add_argument("--finished-ttl", type=float, default=600.0, help="Rill's [stream] finished_ttl")
    parser.add_argument("--resume-grace", type=float, default=15.0, help="Rill's [stream] resume_grace")
    parser.add_argument("--buffer-memory-mb", type=float, default=64.0, help="Rill's [stream] buffer_memory_mb")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--report-every", type=float, default=300.0, help="seconds between rows of the table")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for Rill's process")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    options = SoakOptions(
        minutes=args.minutes,
        rate=args.rate,
        finished_ttl=args.finished_ttl,
        resume_grace=args.resume_grace,
        buffer_memory_mb=args.buffer_memory_mb,
        sample_s=args.sample,
        report_every_s=args.report_every,
        env=dict(item.split("=", 1) for item in args.env),
    )
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    pin(0, cores()[1])  # this process is the load client: on the bench core, away from Rill
    install_fast_loop()
    with tempfile.TemporaryDirectory(prefix="rill-soak-") as work:
        result = run_soak(options, Path(work))
    result["when"] = started
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {args.out}")
    return 0
