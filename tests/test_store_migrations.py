"""The store's schema: migrations from an empty database and from every earlier revision
with data in it, and the databases Rill must refuse to start on (corrupt, newer than this
code, unreachable), on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import column, inspect, table, text
from sqlalchemy.engine import Connection

from server.store import StoreOpenError, migrate, open_store
from server.store.database import connect, engine_url
from server.store.migrate import current, downgrade, revisions, upgrade
from server.store.schema import metadata

from .conftest import PostgresServer, free_port
from .store_helpers import LIMITS, dump

ROOT = Path(__file__).resolve().parent.parent

# The tables as revision 0001 made them: data written by an old Rill, before later migrations.
OLD_CONVERSATIONS = table(
    "conversations",
    *(column(name) for name in ("owner", "id", "title", "system", "created", "updated", "bytes", "active")),
)
OLD_MESSAGES = table(
    "messages",
    *(
        column(name)
        for name in ("conversation_pk", "owner", "id", "parent_pk", "role", "content", "status", "created", "updated")
    ),
)


async def migrate_to(url: str, revision: str) -> None:
    database = connect(engine_url(url))
    try:
        await database.write(lambda c: upgrade(c, revision))
    finally:
        await database.close()


def _old_rows(connection: Connection) -> None:
    connection.execute(
        OLD_CONVERSATIONS.insert().values(
            owner="ann", id="old", title="From before", system="", created=1, updated=2, bytes=25, active="a"
        )
    )
    pk = connection.execute(text("SELECT pk FROM conversations WHERE id = 'old'")).scalar_one()
    connection.execute(
        OLD_MESSAGES.insert().values(
            conversation_pk=pk,
            owner="ann",
            id="q",
            parent_pk=None,
            role="user",
            content="你好世界 question",
            status="done",
            created=1,
            updated=1,
        )
    )
    parent = connection.execute(text("SELECT pk FROM messages WHERE id = 'q'")).scalar_one()
    counted = "message_count" in {column["name"] for column in inspect(connection).get_columns("conversations")}
    connection.execute(
        OLD_MESSAGES.insert().values(
            conversation_pk=pk,
            owner="ann",
            id="a",
            parent_pk=parent,
            role="assistant",
            content="answer",
            status="streaming",
            created=2,
            updated=2,
        )
    )
    if counted:  # a revision from 0003 on: what Rill then kept up to date with each message
        connection.execute(text("UPDATE conversations SET message_count = 2"))


async def write_old_data(url: str) -> None:
    database = connect(engine_url(url))
    try:
        await database.write(_old_rows)
    finally:
        await database.close()


def schema_differences(connection: Connection) -> list[Any]:
    """How the migrated database differs from schema.py's tables. The search index
    (0002_search: FTS5 tables and triggers, pg_trgm indexes) is raw SQL outside the
    Core metadata: it is left out here and tested by test_store_search."""

    def ours(_object: Any, name: str | None, kind: str, reflected: bool, _compare_to: Any) -> bool:
        if kind == "table":
            return name in metadata.tables
        return not (kind == "index" and reflected and name is not None and name.endswith("_trgm"))

    context = MigrationContext.configure(connection, opts={"include_object": ours})
    return list(compare_metadata(context, metadata))


async def test_empty_database_migrates_to_the_schema(store_url: str) -> None:
    store = await open_store(store_url, LIMITS)
    try:
        assert await store.database.read(current) == (revisions()[-1],)
        # What the migrations built is what the code is written against.
        assert await store.database.read(schema_differences) == []
    finally:
        await store.close()
    # Opening again is a no-op.
    store = await open_store(store_url, LIMITS)
    await store.close()


@pytest.mark.parametrize("start", revisions()[:-1] or ["(only one revision)"])
async def test_each_earlier_revision_with_data_upgrades(store_url: str, start: str) -> None:
    if start not in revisions():
        start = revisions()[0]  # with a single revision, "earlier" is the empty database below
    await migrate_to(store_url, start)
    await write_old_data(store_url)
    # One revision at a time, as upgrades from release to release would run them...
    later = revisions()[revisions().index(start) + 1 :]
    for revision in later[:-1]:
        await migrate_to(store_url, revision)
    store = await open_store(store_url, LIMITS)  # ...and the last one at start-up
    try:
        assert await store.database.read(current) == (revisions()[-1],)
        conversation = await store.get_conversation("ann", "old")
        assert conversation is not None
        assert conversation["title"] == "From before"
        assert [m["content"] for m in conversation["messages"]] == ["你好世界 question", "answer"]
        assert [m["id"] for m in await store.path("ann", "old", "a")] == ["q", "a"]
        # What was stored before the search index existed is found too (2 and 3+ characters).
        for query in ("世界", "question"):
            assert [hit["message"] for hit in await store.search("ann", query)] == ["q"], query
        usage = await store.usage("ann")
        assert (usage["conversations"], usage["messages"], usage["bytes"]) == (1, 2, 25)
        assert await store.mark_interrupted() == 1
        await store.add_message("ann", "old", {"role": "user", "content": "new", "parent": "a"})
    finally:
        await store.close()


def test_revisions_form_one_line() -> None:
    names = revisions()
    assert names[0] == "0001_conversations"
    assert len(set(names)) == len(names)
    # Every file in versions/ is one of them (a stray second head would break upgrades).
    files = sorted(p.stem for p in (ROOT / "server/store/migrations/versions").glob("0*.py"))
    assert files == sorted(names)


def test_head_constant_is_the_newest_revision() -> None:
    """open_store skips Alembic for a database at migrate.HEAD: it must be the real head."""
    assert migrate.HEAD == revisions()[-1] == migrate.script_directory().get_current_head()


def test_an_up_to_date_start_does_not_import_alembic(tmp_path: Path) -> None:
    """The second start on a database (at HEAD) reads its revision without Alembic."""
    database = tmp_path / "rill.db"
    program = (
        "import asyncio, sys\n"
        "from server.store import open_store\n"
        "from server.store.validation import StoreLimits\n"
        "async def main():\n"
        f"    store = await open_store('sqlite:///{database}', StoreLimits(10, 10, 10**6, 1000))\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
        "print('alembic' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True)
    again = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True)
    assert (first.stdout.strip(), again.stdout.strip()) == ("True", "False")


async def test_newer_revision_is_refused_untouched(store_url: str) -> None:
    store = await open_store(store_url, LIMITS)
    await store.create_conversation("ann", {"id": "c"})
    await store.database.write(
        lambda c: c.execute(text("UPDATE alembic_version SET version_num = '0999_from_the_future'"))
    )
    before = await dump(store)
    await store.close()
    with pytest.raises(StoreOpenError, match=r"0999_from_the_future.*newer than this Rill knows") as caught:
        await open_store(store_url, LIMITS)
    assert "\n" not in str(caught.value)
    reopened = await _open_without_migrating(store_url)
    assert await reopened.database.read(current) == ("0999_from_the_future",)
    assert await dump(reopened) == before
    await reopened.close()


async def _open_without_migrating(url: str) -> Any:
    from server.store.store import Store

    return Store(connect(engine_url(url)), LIMITS)


def test_not_a_database_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "rill.db"
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    result = _cli("upgrade", url=f"sqlite:///{path}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "not a SQLite database" in result.stderr
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rill.db"]


async def test_damaged_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/rill.db"
    store = await open_store(url, LIMITS)
    await store.create_conversation("ann", {"id": "c"})
    for index in range(200):
        await store.add_message("ann", "c", {"role": "user", "content": f"message {index} " * 50})
    await store.close()
    path = tmp_path / "rill.db"
    data = bytearray(path.read_bytes())
    assert len(data) > 20 * 4096
    # The header and the schema page stay; pages in the middle are overwritten.
    data[8 * 4096 : 12 * 4096] = os.urandom(4 * 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreOpenError, match="corrupt") as caught:
        await open_store(url, LIMITS)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == bytes(data)
    # Larger files are not read whole at start-up (a restart's downtime); `check` reads them.
    checked = _cli("check", url=url)
    assert checked.returncode == 2
    assert "corrupt" in checked.stderr
    assert checked.stderr.count("\n") == 1
    assert path.read_bytes() == bytes(data)


async def test_check_command_on_a_sound_database(store_url: str) -> None:
    store = await open_store(store_url, LIMITS)
    await store.close()
    checked = _cli("check", url=store_url)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok, at ")


async def test_unreachable_postgresql_is_refused() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StoreOpenError, match="cannot open the conversation store") as caught:
        await open_store(f"postgresql://rill:secret-password@127.0.0.1:{port}/rill", LIMITS)
    message = str(caught.value)
    assert "\n" not in message
    assert "secret-password" not in message
    assert str(port) in message


async def test_missing_postgresql_database_is_refused(postgres_server: PostgresServer) -> None:
    with pytest.raises(StoreOpenError, match="does not exist"):
        await open_store(f"postgresql://rill@127.0.0.1:{postgres_server.port}/no_such_database", LIMITS)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////var/lib/rill/rill.db", "sqlite+pysqlite:////var/lib/rill/rill.db"),
        ("sqlite:///relative.db", "sqlite+pysqlite:///relative.db"),
        ("sqlite+pysqlite:////x.db", "sqlite+pysqlite:////x.db"),
        ("sqlite+aiosqlite:////x.db", "sqlite+pysqlite:////x.db"),  # what earlier versions took
        ("postgresql://u:p@db:5433/rill", "postgresql+asyncpg://u:p@db:5433/rill"),
        ("postgresql+asyncpg://u@db/rill", "postgresql+asyncpg://u@db/rill"),
        ("postgres://u@db/rill", "postgresql+asyncpg://u@db/rill"),
    ],
)
def test_engine_url(url: str, expected: str) -> None:
    assert engine_url(url).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "sqlite://", "sqlite:///:memory:", "postgresql+psycopg2://u@h/db", "not a url"]
)
def test_engine_url_refuses(url: str) -> None:
    with pytest.raises(StoreOpenError):
        engine_url(url)


def _cli(*args: str, url: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.store", *([f"--url={url}"] if url else []), *args]
    environ = {k: v for k, v in os.environ.items() if k != "RILL_DATABASE_URL"} | (env or {})
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=environ, check=False)


async def test_cli_upgrade_and_current(store_url: str, tmp_path: Path) -> None:
    if store_url.startswith("sqlite"):
        missing = _cli("current", url=store_url)
        assert missing.returncode == 2
        assert "no such database file" in missing.stderr
    upgraded = _cli("upgrade", url=store_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert revisions()[-1] in upgraded.stdout
    shown = _cli("current", env={"RILL_DATABASE_URL": store_url})  # the URL from the environment
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(revisions()[-1])
    if store_url.startswith("postgresql"):
        refused = _cli("backup", str(tmp_path / "copy.db"), url=store_url)
        assert refused.returncode == 2
        assert "pg_dump" in refused.stderr


async def test_downgrade_one_step_and_up_again(store_url: str) -> None:
    """The newest migration can be undone and redone with data present (what an operator
    does when an upgrade is rolled back before a backup is restored)."""
    if len(revisions()) < 2:
        pytest.fail("needs two revisions")
    store = await open_store(store_url, LIMITS)
    try:
        await store.create_conversation("ann", {"id": "c", "title": "Greetings"})
        await store.add_message("ann", "c", {"role": "user", "content": "你好世界", "id": "q"})
        before = await dump(store)
    finally:
        await store.close()
    database = connect(engine_url(store_url))
    try:
        await database.write(lambda c: downgrade(c, revisions()[-2]))
        assert await database.read(current) == (revisions()[-2],)
    finally:
        await database.close()
    store = await open_store(store_url, LIMITS)  # up again at start-up
    try:
        assert await dump(store) == before
        assert [hit["message"] for hit in await store.search("ann", "世界")] == ["q"]
    finally:
        await store.close()
