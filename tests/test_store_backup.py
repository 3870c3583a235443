"""Backups of the SQLite database while Rill writes to it (`python -m server.store
backup`, which `make backup` runs), and restoring one."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from server.store import Store, open_store
from server.store.schema import conversations, messages

from .store_helpers import LIMITS, assistant, user

ROOMY = replace(LIMITS, max_conversations=100_000, max_messages=1_000_000, max_bytes=10**10)

ROOT = Path(__file__).resolve().parent.parent


async def backup(url: str, target: Path) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "RILL_DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.store",
        f"--url={url}",
        "backup",
        str(target),
        cwd=ROOT,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def consistent(store: Store) -> tuple[int, int]:
    """Counts, after checking the copy is one snapshot: every conversation's byte count
    matches its messages (a torn copy would have one without the other)."""

    def counts(connection: Connection) -> tuple[int, int]:
        for row in connection.execute(select(conversations.c.pk, conversations.c.bytes)):
            texts = connection.execute(
                select(messages.c.content, messages.c.reasoning).where(messages.c.conversation_pk == row.pk)
            )
            assert row.bytes == sum(len(t.content.encode()) + len(t.reasoning.encode()) for t in texts)
        count = connection.execute(select(func.count()).select_from(messages)).scalar_one()
        total = connection.execute(select(func.count()).select_from(conversations)).scalar_one()
        return int(total), int(count)

    return await store.database.read(counts)


async def test_backup_while_writing_then_restore(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/live/rill.db"
    store = await open_store(url, ROOMY)
    written = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal written
        while not stop.is_set():
            cid = f"c{written}"
            await store.create_conversation("ann", {"id": cid, "title": f"Conversation {written}"})
            await store.add_message("ann", cid, user("question " * 200, id="q"))
            await store.add_message("ann", cid, assistant("", "q", id="a", status="streaming"))
            await store.save_answer("ann", cid, "a", content="answer " * 300, reasoning="", last_event_id=7)
            written += 1

    try:
        for index in range(20):
            await store.create_conversation("ann", {"id": f"early{index}"})
            await store.add_message("ann", f"early{index}", user("before the backup"))
        task = asyncio.create_task(writer())
        await asyncio.sleep(0.2)
        during = written
        status, out, err = await backup(url, tmp_path / "backups/rill-copy.db")
        assert status == 0, err
        assert "backed up" in out
        after = written
        stop.set()
        await task
        assert after > during  # the writer was not held up by the backup
    finally:
        await store.close()
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == ["rill-copy.db"]  # no temp file left

    # Restore: Rill stopped, the copy put in place of the database (its -wal and -shm
    # removed), Rill started: everything up to the backup is there.
    live = tmp_path / "live"
    for name in ("rill.db", "rill.db-wal", "rill.db-shm"):
        (live / name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "backups/rill-copy.db", live / "rill.db")
    restored = await open_store(url, ROOMY)
    try:
        count, message_count = await consistent(restored)
        assert 20 + during <= count <= 20 + after + 1
        assert message_count >= 20 + 2 * during
        early = await restored.get_conversation("ann", "early0")
        assert early is not None
        assert early["messages"][0]["content"] == "before the backup"
        await restored.add_message("ann", "early0", user("after the restore", early["messages"][0]["id"]))
    finally:
        await restored.close()


async def test_backup_refusals(tmp_path: Path) -> None:
    status, _, err = await backup(f"sqlite:///{tmp_path}/missing.db", tmp_path / "copy.db")
    assert status == 2
    assert "no such database file" in err
    store = await open_store(f"sqlite:///{tmp_path}/rill.db", LIMITS)
    await store.close()
    status, _, err = await backup(f"sqlite:///{tmp_path}/rill.db", tmp_path / "rill.db")
    assert status == 2
    assert "another file" in err
