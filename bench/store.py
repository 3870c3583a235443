"""`python -m bench store` (or `python -m bench.store`): how fast the conversation store
answers with one owner's large history in SQLite.

Builds a database of 10,000 conversations and 200,000 messages (English prose, some
Chinese, some mixed, a little code and emoji; one conversation of 2,000 messages) for one
owner: rows go in by bulk inserts into the schema's tables on the Store's own engine, so
the migrations' triggers index them for search as a real write would. Then times, through
the Store's methods, the sidebar's first page, opening the 2,000-message conversation, and
searches of each kind, and prints p50/p95 against the targets of issue 14 (list and open
p95 < 20 ms, search p95 < 50 ms)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from server.ops.memory import tune_collector
from server.store import Store, StoreLimits, open_store
from server.store.schema import conversations, messages

from .run import percentile

OWNER = "bench"
BIG_ID = "big0000000000000"
BATCH = 5000
TARGETS_MS: dict[str, float | None] = {"list": 20.0, "open": 20.0, "search": 50.0, "floor": None}
# The floor under `open`, measured in the same run: the same rows by a plain sqlite3
# connection, no SQLAlchemy and no shaping. This VM's speed swings about 2x over minutes;
# the ratio to the floor does not.
FLOOR_QUERY = "SELECT * FROM messages WHERE conversation_pk = ? ORDER BY pk"

VOCABULARY = (
    "the a to of and in is it that for you with on this be are as can not your or we have will an by from "
    "if at all more one about so when what which there use but they some would like just how time make "
    "server client request response stream token model answer question database index query latency "
    "memory thread process connection timeout retry cache network browser page function value error "
    "config file system user data list table search result message conversation history title python "
    "async await event loop socket buffer write read commit transaction lock backup restore migration "
    "schema column row key owner limit quota budget deploy proxy nginx certificate domain version release"
)
WORDS = VOCABULARY.split()
CHINESE = (
    "你好世界",
    "我们今天讨论数据库的性能问题",
    "这个模型的回答非常准确",
    "请帮我写一个函数来计算平均值",
    "服务器在重启之后恢复了连接",
    "搜索功能需要支持中文和英文",
    "历史记录会保存在服务器上",
    "用户可以在手机和电脑上继续对话",
    "这是一个关于网络延迟的问题",
    "备份和恢复都应该经过测试",
    "世界各地的用户都在使用它",
    "请把这段文字翻译成英文",
)
EMOJI = ("🙂", "🚀", "👍🏻", "✅", "🔥")
# The long conversation's first message: every search of QUERIES that should hit does,
# whatever the size (the rest of the data is random).
FIRST = "你好世界。Does the database index keep latency low? 这是我的问题。"
CODE = "```python\nasync def handler(request):\n    return web.json_response({'ok': True})\n```"


@dataclass(frozen=True)
class Size:
    conversations: int
    messages: int
    big: int  # messages in the one long conversation


FULL = Size(10_000, 200_000, 2_000)

# (name, query, whether the data must hold hits)
QUERIES = (
    ("search 3+ Latin", "latency", True),
    ("search 3+ Latin, 2 words", "database index", True),
    ("search 2 CJK", "世界", True),
    ("search 1 CJK", "的", True),
    ("search no hit, Latin", "zyxwvutq", False),
    ("search no hit, 2 CJK", "据世", False),  # two common characters, never adjacent
)


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        return rng.choice(CHINESE) + "。"
    words = rng.choices(WORDS, k=rng.randint(6, 18))
    text = " ".join(words).capitalize() + "."
    if kind < 0.22:
        text += " " + rng.choice(CHINESE) + "，" + rng.choice(WORDS)
    if kind > 0.97:
        text += " " + rng.choice(EMOJI)
    return text


def usage(rng: random.Random, content: str) -> str:
    """An answer's usage as the writer stores it (DeepSeek's fields)."""
    prompt, completion = rng.randint(20, 4000), max(1, len(content) // 4)
    cached = rng.randint(0, prompt)
    return json.dumps(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_cache_hit_tokens": cached,
            "prompt_cache_miss_tokens": prompt - cached,
        },
        separators=(",", ":"),
    )


def message_text(rng: random.Random, role: str) -> str:
    count = rng.randint(1, 3) if role == "user" else rng.randint(3, 12)
    text = " ".join(sentence(rng) for _ in range(count))
    if role == "assistant" and rng.random() < 0.05:
        text += "\n\n" + CODE
    return text


def plan(size: Size) -> list[int]:
    """Messages per conversation: the long one first, the rest spread over the others."""
    rest = size.conversations - 1
    each, extra = divmod(size.messages - size.big, rest)
    return [size.big] + [each + (1 if index < extra else 0) for index in range(rest)]


async def build(store: Store, size: Size, seed: int = 14) -> None:
    """One owner's history, bulk-inserted in one write transaction (the triggers index it)."""
    rng = random.Random(seed)
    start = 1_700_000_000_000
    conversation_rows: list[dict[str, Any]] = []
    message_rows: list[dict[str, Any]] = []
    message_pk = 0
    clock = start

    def insert_all(connection: Connection) -> None:
        nonlocal message_pk, clock, conversation_rows, message_rows
        for number, count in enumerate(plan(size)):
            conversation_pk = number + 1
            cid = BIG_ID if number == 0 else f"{rng.getrandbits(64):016x}"
            created = clock
            parent: int | None = None
            total = 0
            last = ""
            for index in range(count):
                message_pk += 1
                role = "user" if index % 2 == 0 else "assistant"
                content = FIRST if message_pk == 1 else message_text(rng, role)
                total += len(content.encode())
                clock += rng.randint(1_000, 60_000)
                last = f"{rng.getrandbits(64):016x}"
                message_rows.append(
                    {
                        "pk": message_pk,
                        "conversation_pk": conversation_pk,
                        "owner": OWNER,
                        "id": last,
                        "parent_pk": parent,
                        "role": role,
                        "content": content,
                        "reasoning": "",
                        "status": "done",
                        "model": None if role == "user" else "bench-model",
                        "finish_reason": None if role == "user" else "stop",
                        "usage": None if role == "user" else usage(rng, content),
                        "last_event_id": 0 if role == "user" else 40,
                        "created": clock,
                        "updated": clock,
                    }
                )
                parent = message_pk
            conversation_rows.append(
                {
                    "pk": conversation_pk,
                    "owner": OWNER,
                    "id": cid,
                    "title": " ".join(rng.choices(WORDS, k=4)).capitalize()
                    if rng.random() > 0.1
                    else rng.choice(CHINESE),
                    "title_source": "auto",
                    "system": "",
                    "model": "bench-model",
                    "active": last or None,
                    "created": created,
                    "updated": clock,
                    "bytes": total,
                    "message_count": count,
                }
            )
            if len(message_rows) >= BATCH or number == size.conversations - 1:
                # Conversations first: messages refer to them.
                connection.execute(conversations.insert(), conversation_rows)
                connection.execute(messages.insert(), message_rows)
                conversation_rows, message_rows = [], []

    await store.database.write(insert_all)


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> tuple[list[float], list[float], Any]:
    """(wall ms of each call, CPU ms of each call, the last result). CPU time counts every
    thread of this process (the store's threads included) and not the waits for a core, so on a
    busy machine it tells the work from the queueing."""
    await call()  # warm: the first read pulls pages into the cache
    wall, cpu = [], []
    result = None
    for _ in range(repeat):
        started, used = time.perf_counter(), time.process_time()
        result = await call()
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - used) * 1000)
    return wall, cpu, result


async def measure(store: Store, size: Size, repeat: int) -> list[dict[str, Any]]:
    """One row per operation: p50/p95 in ms, the target, and how many results."""
    rows = []

    async def row(name: str, kind: str, call: Callable[[], Awaitable[Any]], count: Callable[[Any], int]) -> int:
        samples, cpu, result = await timed(call, repeat)
        found = count(result)
        rows.append(
            {
                "operation": name,
                "p50_ms": statistics.median(samples),
                "p95_ms": percentile(samples, 0.95),
                "cpu_p50_ms": statistics.median(cpu),
                "cpu_p95_ms": percentile(cpu, 0.95),
                "target_ms": TARGETS_MS[kind],
                "results": found,
            }
        )
        return found

    listed = await row("list (first page)", "list", lambda: store.list_conversations(OWNER), len)
    if listed == 0:
        raise RuntimeError("the list is empty: the database was not built")
    opened = await row(
        f"open ({size.big:,} messages)",
        "open",
        lambda: store.get_conversation(OWNER, BIG_ID),
        lambda conversation: len(conversation["messages"]) if conversation else 0,
    )
    if opened != size.big:
        raise RuntimeError(f"opened {opened} messages, expected {size.big}")
    plain = sqlite3.connect(str(store.sync_engine.url.database))
    try:
        pk = plain.execute("SELECT pk FROM conversations WHERE owner = ? AND id = ?", (OWNER, BIG_ID)).fetchone()[0]

        async def fetch_plain() -> list[Any]:
            return plain.execute(FLOOR_QUERY, (pk,)).fetchall()

        await row("floor: the same rows by plain sqlite3", "floor", fetch_plain, len)
    finally:
        plain.close()
    for name, query, hits in QUERIES:
        found = await row(f"{name}: {query}", "search", lambda q=query: store.search(OWNER, q), len)  # type: ignore[misc]
        if bool(found) != hits:
            raise RuntimeError(f"search {query!r} found {found} results: the data or the search is wrong")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| operation | p50 ms | p95 ms | target p95 ms | CPU p50 / p95 ms | results | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = row["target_ms"]
        met = "–" if target is None else "yes" if row["p95_ms"] < target else "NO"
        shown = "–" if target is None else f"< {target:.0f}"
        lines.append(
            f"| {row['operation']} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {shown} "
            f"| {row['cpu_p50_ms']:.2f} / {row['cpu_p95_ms']:.2f} | {row['results']} | {met} |"
        )
    return "\n".join(lines)


async def run(size: Size, directory: Path, repeat: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build in `directory`, measure: (rows, facts about the build)."""
    path = directory / "bench-store.db"
    limits = StoreLimits(
        max_conversations=size.conversations,
        max_messages=size.messages,
        max_bytes=1 << 40,
        max_message_chars=100_000,
    )
    started = time.monotonic()
    reuse = path.exists()  # --keep: a database built by an earlier run, same size
    store = await open_store(f"sqlite:///{path}", limits)
    try:
        if not reuse:
            await build(store, size)
        built = time.monotonic() - started
        tune_collector()  # as `python -m server` runs once it listens
        rows = await measure(store, size, repeat)
    finally:
        await store.close()
    return rows, {"build_s": built, "file_mb": path.stat().st_size / 1e6, "reused": reuse}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench store")
    parser.add_argument("--conversations", type=int, default=FULL.conversations)
    parser.add_argument("--messages", type=int, default=FULL.messages)
    parser.add_argument("--big", type=int, default=FULL.big, help="messages in the conversation opened")
    parser.add_argument("--repeat", type=int, default=100, help="timed calls per operation")
    parser.add_argument("--keep", type=Path, help="build the database in this folder and keep it (reused if there)")
    args = parser.parse_args(argv)
    size = Size(args.conversations, args.messages, args.big)
    if size.conversations < 2 or size.messages < size.big + size.conversations - 1:
        parser.error("need 2+ conversations and enough messages for one each beyond the long one")
    print(f"… building {size.conversations:,} conversations, {size.messages:,} messages", file=sys.stderr, flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows, facts = asyncio.run(run(size, args.keep, args.repeat))
    else:
        with tempfile.TemporaryDirectory(prefix="rill-bench-store-") as work:
            rows, facts = asyncio.run(run(size, Path(work), args.repeat))
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    made = "reused" if facts["reused"] else "built"
    print(
        f"\nConversation store (SQLite), {size.conversations:,} conversations, {size.messages:,} messages, "
        f"one owner; {made} in {facts['build_s']:.1f} s, {facts['file_mb']:.0f} MB; {args.repeat} calls each; "
        f"{os.cpu_count()} CPUs, load average {load}\n"
    )
    print(table(rows))
    met = all(row["target_ms"] is None or row["p95_ms"] < row["target_ms"] for row in rows)
    print(f"\nTargets of issue 14: {'all met' if met else 'NOT all met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
