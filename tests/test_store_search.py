"""Search across an owner's conversations, on both backends (a SQLite file with its FTS5
indexes, and a real PostgreSQL): CJK at every query length, emoji, case, query text that
looks like FTS syntax, owners kept apart, answers re-indexed as they are saved, and
nothing left in the index after a delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection

from server.store import Store, StoreLimits, fts, open_store
from server.store.database import connect, engine_url
from server.store.migrate import alembic_config
from server.store.search import SNIPPET_CHARS, fold, snippet

LIMITS = StoreLimits(max_conversations=50, max_messages=500, max_bytes=1_000_000, max_message_chars=10_000)
FTS_TABLES = ("search_messages", "search_messages_short", "search_titles", "search_titles_short")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url, LIMITS)
    yield opened
    await opened.close()


async def say(store: Store, owner: str, cid: str, content: str, *, title: str = "", role: str = "user") -> str:
    """A conversation `cid` (made if new) with one more message; its id."""
    await store.create_conversation(owner, {"id": cid, "title": title})
    conversation = await store.get_conversation(owner, cid)
    assert conversation is not None
    parent = conversation["active"]
    message = await store.add_message(owner, cid, {"role": role, "content": content, "parent": parent})
    return str(message["id"])


def marked(result: dict[str, Any]) -> list[str]:
    """The highlighted pieces of a snippet, sliced as JavaScript does (UTF-16 code units)."""
    units = result["snippet"].encode("utf-16-le")
    return [units[start * 2 : end * 2].decode("utf-16-le") for start, end in result["highlights"]]


async def hits(store: Store, query: str, owner: str = "ann") -> list[tuple[str, str | None]]:
    return [(result["conversation"], result["message"]) for result in await store.search(owner, query)]


async def test_chinese_at_every_length(store: Store) -> None:
    mid = await say(store, "ann", "c1", "我说：你好世界，hello World！")
    await say(store, "ann", "c2", "今天天气很好")
    for query in ("世界", "界", "你", "你好世界", "好世界，h", "世界，hello wor"):
        results = await store.search("ann", query)
        assert [(r["conversation"], r["message"]) for r in results] == [("c1", mid)], query
        assert [piece.lower() for piece in marked(results[0])] == [query], query
    [result] = await store.search("ann", "世界")
    assert result["snippet"] == "我说：你好世界，hello World！"
    assert result["highlights"] == [[5, 7]]
    assert result["role"] == "user"
    assert await hits(store, "天") == [("c2", await _only_message(store, "c2"))]
    assert await hits(store, "天天") != []
    assert await hits(store, "界你") == []  # both characters are there, not in this order
    assert await hits(store, "世 界") == []
    assert await hits(store, "地球") == []


async def _only_message(store: Store, cid: str) -> str:
    conversation = await store.get_conversation("ann", cid)
    assert conversation is not None
    return str(conversation["messages"][0]["id"])


async def test_every_match_in_the_snippet_is_highlighted(store: Store) -> None:
    await say(store, "ann", "c1", "的确，这是我的书，也是你的书")
    [result] = await store.search("ann", "的")
    assert result["highlights"] == [[0, 1], [6, 7], [12, 13]]
    [result] = await store.search("ann", "的书")
    assert marked(result) == ["的书", "的书"]


async def test_emoji_counts_in_utf16(store: Store) -> None:
    mid = await say(store, "ann", "c1", "launch 🚀 now, thumbs 👍🏻 up, family 👨‍👩‍👧 too")
    for query, expected in (("🚀", [[7, 9]]), ("👍🏻", [[22, 26]]), ("🚀 now", [[7, 13]]), ("👨‍👩‍👧", [[38, 46]])):
        results = await store.search("ann", query)
        assert [(r["message"], r["highlights"]) for r in results] == [(mid, expected)], query
        assert marked(results[0]) == [query]
    await say(store, "ann", "c1", "🚀 first")
    assert len(await store.search("ann", "🚀")) == 2


async def test_english_is_case_insensitive(store: Store) -> None:
    mid = await say(
        store, "ann", "c1", "Deploy the Database to PRODUCTION, then the database again", title="Database NOTES"
    )
    results = await store.search("ann", "DATABASE")
    assert [(r["message"], marked(r)) for r in results] == [(None, ["Database"]), (mid, ["Database", "database"])]
    assert [marked(r) for r in await store.search("ann", "production")] == [["PRODUCTION"]]
    assert [marked(r) for r in await store.search("ann", "Notes")] == [["NOTES"]]
    # 1-2 Latin letters: the start of a word ("De" in "Deploy"; "da" in both "Database"), not anywhere
    [deploy] = await store.search("ann", "De")
    assert (deploy["message"], marked(deploy)) == (mid, ["De"])
    assert [(r["message"], marked(r)) for r in await store.search("ann", "da")] == [
        (None, ["Da"]),
        (mid, ["Da", "da"]),
    ]
    assert await hits(store, "oy") == []  # inside "Deploy" only: the same on both backends
    assert await hits(store, "ab") == []


async def test_query_text_is_never_syntax(store: Store) -> None:
    mid = await say(store, "ann", "c1", 'he said "AND (" then NEAR(a b) * 100% of col:x -y ^z; d_o and \\path\' ok')
    await say(store, "ann", "c2", "dao and dxo")
    syntax = ['"', '""', "AND (", "*", "NEAR(a b)", "a OR b", "'", "%", "_", "\\", "^z", "col:x", "-y"]
    for query in [*syntax, ")", "(", "\x00", "a\x00b", "\x00\x00x", "\ud800", "x\udfff"]:
        await store.search("ann", query)  # no error, whatever it finds
    for query in ('"AND ("', "NEAR(a b)", "100%", "col:x", "d_o", "\\path'", "^z;"):
        results = await store.search("ann", query)
        assert [r["message"] for r in results] == [mid], query
        assert marked(results[0]) == [query]
    assert await hits(store, "d_o and") == [("c1", mid)]  # _ is not LIKE's wildcard
    assert await hits(store, "00% o") == [("c1", mid)]
    assert await hits(store, "10%") == []
    assert await hits(store, "0%  of") == []
    assert await hits(store, "") == []
    assert await hits(store, "   ") == []


async def test_owners_are_kept_apart(store: Store) -> None:
    mine = await say(store, "ann", "c1", "the secret plan", title="Secret")
    theirs = await say(store, "bob", "c1", "the secret plan", title="Secret")
    assert await hits(store, "secret", "ann") == [("c1", None), ("c1", mine)]
    assert await hits(store, "secret", "bob") == [("c1", None), ("c1", theirs)]
    assert await hits(store, "秘", "bob") == []
    assert await hits(store, "secret", "eve") == []


async def test_titles_are_found_and_renames_reindexed(store: Store) -> None:
    await say(store, "ann", "c1", "body text", title="旅行计划 Trip")
    [result] = await store.search("ann", "计划")
    assert (result["message"], result["role"], result["title"]) == (None, None, "旅行计划 Trip")
    assert marked(result) == ["计划"]
    await store.update_conversation("ann", "c1", {"title": "Budget"})
    assert await hits(store, "计划") == []
    assert await hits(store, "旅行计划") == []
    assert await hits(store, "trip") == []
    assert await hits(store, "budg") == [("c1", None)]


async def test_answers_are_found_once_ended(store: Store) -> None:
    """An answer enters the index when it ends (not at each save while it streams), leaves
    it while Continue streams it again, and comes back with its new text."""
    question = await say(store, "ann", "c1", "question")
    answer = await store.add_message(
        "ann", "c1", {"role": "assistant", "content": "", "parent": question, "status": "streaming"}
    )
    await store.save_answer("ann", "c1", answer["id"], content="partial zebra 世界", reasoning="", last_event_id=3)
    for query in ("partial", "世", "zebra"):
        assert await hits(store, query) == [], query
    await index_holds(store, set(), only=False)  # the question is in
    await store.save_answer(
        "ann", "c1", answer["id"], content="final 地球 zebra", reasoning="", last_event_id=9, status="stopped"
    )
    for gone in ("partial", "世", "世界", "pa"):
        assert await hits(store, gone) == [], gone
    for found in ("final 地", "地", "地球", "fi", "ZEBRA"):
        assert await hits(store, found) == [("c1", answer["id"])], found
    [result] = await store.search("ann", "地球")
    assert result["role"] == "assistant"
    await index_holds(store, {"zebra"})
    # Continue: the same message streams again; out of the index until it ends again.
    await store.save_answer(
        "ann",
        "c1",
        answer["id"],
        content="final 地球 zebra",
        reasoning="",
        last_event_id=0,
        status="streaming",
        generation="g2",
    )
    assert await hits(store, "zebra") == []
    await index_holds(store, set(), only=False)
    await store.save_answer(
        "ann", "c1", answer["id"], content="final 地球 zebra quokka", reasoning="", last_event_id=5, status="done"
    )
    assert await hits(store, "quokka") == [("c1", answer["id"])]
    await index_holds(store, {"zebra", "quokka"})
    # The ending's status change alone (no new text) leaves the index as it is.
    await store.save_answer(
        "ann", "c1", answer["id"], content="final 地球 zebra quokka", reasoning="", last_event_id=5, status="error"
    )
    await index_holds(store, {"zebra", "quokka"})
    assert await store.delete_conversation("ann", "c1")
    await index_holds(store, set())


async def test_a_streaming_answer_deleted_leaves_the_index_whole(store: Store) -> None:
    question = await say(store, "ann", "c1", "zebra question")
    answer = await store.add_message(
        "ann", "c1", {"role": "assistant", "content": "", "parent": question, "status": "streaming"}
    )
    await store.save_answer("ann", "c1", answer["id"], content="quokka so far", reasoning="", last_event_id=3)
    await index_holds(store, {"zebra"})  # the question only
    assert await store.delete_conversation("ann", "c1")  # no 'delete' for a row never indexed
    await index_holds(store, set())


async def test_deletes_leave_nothing_in_the_index(store: Store) -> None:
    await say(store, "ann", "c1", "zebra 斑马 crossing", title="Zebra 斑马")
    await say(store, "ann", "c1", "another zebra 斑马")
    await say(store, "ann", "c2", "quokka 袋鼠", title="Quokka")
    await say(store, "bob", "c1", "bob's quokka 袋鼠", title="Quokka")
    await index_holds(store, {"斑马", "zebra", "袋鼠", "quokka"})
    assert await store.delete_conversation("ann", "c1")
    for query in ("zebra", "斑马", "斑", "ze"):
        assert await hits(store, query) == [], query
    await index_holds(store, {"袋鼠", "quokka"})
    await store.delete_owner("ann")
    assert await hits(store, "quokka") == []
    assert await hits(store, "quokka", "bob") == [("c1", None), ("c1", await _first(store, "bob", "c1"))]
    await store.delete_owner("bob")
    await index_holds(store, set())


async def _first(store: Store, owner: str, cid: str) -> str:
    conversation = await store.get_conversation(owner, cid)
    assert conversation is not None
    return str(conversation["messages"][0]["id"])


async def index_holds(store: Store, expected: set[str], *, only: bool | None = None) -> None:
    """Which of the test's words the FTS tables still answer for, asked of the FTS
    tables themselves (SQLite), without the joins that would hide orphan entries.
    PostgreSQL has no separate index to ask: search reads the tables. `only`: the index
    holds no other term at all (by default when `expected` is empty)."""
    if store.backend != "sqlite":
        return

    def ask(connection: Connection) -> tuple[set[str], int]:
        found = set()
        for table in FTS_TABLES:
            for word, short in (("zebra", "zebra"), ("斑马", "斑 马"), ("quokka", "quokka"), ("袋鼠", "袋 鼠")):
                query = f'"{short}"' if table.endswith("_short") else f'"{word}"'
                rows = connection.execute(text(f"SELECT rowid FROM {table} WHERE {table} MATCH :q"), {"q": query})
                if rows.first() is not None:
                    found.add(word)
        # And no term at all is left once everything is deleted: the vocabulary is empty.
        total = 0
        for table in FTS_TABLES:
            connection.execute(text(f"CREATE VIRTUAL TABLE temp.v_{table} USING fts5vocab(main, {table}, 'row')"))
            total += connection.execute(text(f"SELECT count(*) FROM temp.v_{table}")).scalar_one()
            connection.execute(text(f"DROP TABLE temp.v_{table}"))
        return found, total

    found, total = await store.database.write(ask)
    assert found == expected
    if not expected if only is None else only:
        assert total == 0


async def test_results_most_recent_first_and_limited(store: Store) -> None:
    for index in range(8):
        await say(store, "ann", f"c{index}", f"note number {index}")
    results = await store.search("ann", "note", limit=5)
    assert [r["conversation"] for r in results] == ["c7", "c6", "c5", "c4", "c3"]
    assert [r["updated"] for r in results] == sorted((r["updated"] for r in results), reverse=True)


async def test_migration_indexes_existing_rows_and_downgrades(store_url: str) -> None:
    """0001 -> write -> 0002 finds what was there; downgrade to 0001 removes it all."""

    def old_rows(connection: Connection) -> None:
        command.upgrade(alembic_config(connection), "0001_conversations")
        connection.execute(
            text(
                "INSERT INTO conversations (pk, owner, id, title, created, updated, bytes) "
                "VALUES (1, 'ann', 'c1', '老的标题', 1, 1, 0)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO messages (pk, conversation_pk, owner, id, role, content, reasoning, status, "
                "last_event_id, created, updated) VALUES (1, 1, 'ann', 'm1', 'user', '你好世界 before', '', "
                "'done', 0, 1, 1)"
            )
        )

    database = connect(engine_url(store_url))
    try:
        await database.write(old_rows)
        await database.write(lambda c: command.upgrade(alembic_config(c), "0002_search"))
    finally:
        await database.close()
    opened = await open_store(store_url, LIMITS)
    try:
        assert await hits(opened, "世界") == [("c1", "m1")]
        assert await hits(opened, "before") == [("c1", "m1")]
        assert await hits(opened, "标") == [("c1", None)]
    finally:
        await opened.close()
    database = connect(engine_url(store_url))
    try:
        await database.write(lambda c: command.downgrade(alembic_config(c), "0001_conversations"))
        assert await database.read(_search_objects) == []
        await database.write(lambda c: command.upgrade(alembic_config(c), "head"))
        assert await database.read(_search_objects) != []
    finally:
        await database.close()


def _search_objects(connection: Connection) -> list[str]:
    if connection.dialect.name == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE name LIKE 'search%'"
    else:
        query = "SELECT indexname FROM pg_indexes WHERE indexname LIKE '%trgm%'"
    return [row[0] for row in connection.execute(text(query))]


def test_snippet_window() -> None:
    body = "x" * 300 + " Needle " + "y" * 300 + " needle " + "z" * 20
    window, highlights = snippet(body, "needle") or ("", [])
    assert window.startswith("…")
    assert window.endswith("…")
    assert len(window) == SNIPPET_CHARS + 2
    assert [window[start:end] for start, end in highlights] == ["Needle"]  # the second is outside the window
    near_end = snippet("a" * 300 + " needle", "needle")
    assert near_end is not None
    assert near_end[0].startswith("…")
    assert not near_end[0].endswith("…")
    assert len(near_end[0]) == SNIPPET_CHARS + 1
    short = snippet("one\ntwo\tneedle", "needle")
    assert short == ("one two needle", [[8, 14]])  # whitespace made one line, offsets kept
    astral = snippet("😀😀 İstanbul needle", "needle")
    assert astral == ("😀😀 İstanbul needle", [[14, 20]])
    assert snippet("İSTANBUL", "stanbul") == ("İSTANBUL", [[1, 8]])  # İ lowers to two: kept, offsets hold
    assert snippet("took okay ok", "ok", word_start=True) == ("took okay ok", [[5, 7], [10, 12]])
    assert snippet("你好世界", "世", word_start=True) == ("你好世界", [[2, 3]])
    assert snippet("ΟΔΟΣ οδος", fold("ΟΔΟΣ")) == ("ΟΔΟΣ οδος", [[0, 4], [5, 9]])  # final sigma folds to sigma
    assert snippet("no match here", "needle") is None


async def test_postgresql_without_pg_trgm_still_searches(postgres_server: Any, postgres_url: str) -> None:
    """A role that may not create extensions: the migration goes on without the trigram
    indexes (a warning, no error), and search gives the same answers by scanning."""
    database = postgres_url.rsplit("/", 1)[1]
    role = f"r_{database}"
    postgres_server.psql(f"CREATE ROLE {role} LOGIN")
    postgres_server.psql(
        f"REVOKE CREATE ON DATABASE {database} FROM PUBLIC; GRANT ALL ON SCHEMA public TO {role}", database
    )
    limited = postgres_url.replace(f"//{postgres_server.user}@", f"//{role}@")
    opened = await open_store(limited, LIMITS)
    try:
        assert await opened.database.read(_search_objects) == []
        extensions = await opened.database.read(
            lambda c: c.execute(text("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'")).all()
        )
        assert extensions == []
        mid = await say(opened, "ann", "c1", "你好世界 and 100% d_o")
        for query in ("世界", "界", "100%", "d_o", "D_O"):
            assert await hits(opened, query) == [("c1", mid)], query
        assert await hits(opened, "dxo") == []
    finally:
        await opened.close()


async def test_postgresql_search_uses_the_trigram_index(postgres_url: str) -> None:
    opened = await open_store(postgres_url, LIMITS)
    try:
        assert sorted(await opened.database.read(_search_objects)) == [
            "ix_conversations_title_trgm",
            "ix_messages_content_trgm",
        ]

        def plan(connection: Connection) -> str:
            connection.execute(text("SET enable_seqscan = off"))  # a tiny table: make the planner show its choice
            rows = connection.execute(
                text("EXPLAIN SELECT pk FROM messages WHERE content ILIKE :pattern"), {"pattern": "%needle%"}
            )
            return "\n".join(row[0] for row in rows)

        assert "ix_messages_content_trgm" in await opened.database.read(plan)
    finally:
        await opened.close()


async def test_short_latin_queries_are_not_crowded_out(store: Store) -> None:
    """ "e" inside 45 newer messages' words does not use up the limit: the one message
    with a word starting with e is found on both backends."""
    eel = await say(store, "ann", "c1", "an eel")
    for _ in range(45):
        await say(store, "ann", "c1", "the tree")
    assert await hits(store, "e") == [("c1", eel)]
    assert await hits(store, "EE") == [("c1", eel)]
    assert await hits(store, "tr") != []


def test_short_index_text_is_pinned() -> None:
    """The short-query index holds this text: the delete triggers remove exactly what was
    inserted, so changing it needs a migration that rebuilds the index."""
    assert fts.search_text("Hi 你好 café 🚀👍🏻。\u3000ok") == (
        "Hi  你  好  café  \ue00001f680  \ue00001f44d  \ue00001f3fb  \ue000003002  ok"
    )
    assert fts.search_text("") == fts.search_text(None) == ""
    assert fts.search_text("plain ASCII, kept: as is!") == "plain ASCII, kept: as is!"
