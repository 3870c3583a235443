"""Search across one owner's conversations: titles and message texts, with a snippet
around the first match and every match in it highlighted.

SQLite asks the FTS5 indexes of migration 0002_search (trigram for 3+ characters, the
one-token-per-CJK-character index for 1-2, see fts.py); PostgreSQL asks ILIKE (pg_trgm's
GIN indexes when present). Either way each hit is confirmed here by a case-insensitive
substring test, which is also what places the snippet and highlights, so both backends
give the same meaning to a query: its text, case aside, never a query language. A query
of 3+ characters matches anywhere; one of 1-2 matches anywhere when it starts with a CJK
character or emoji (世界 in 你好世界), and at a word's start when it starts with a letter
of a spaced script ("ok" finds "okay", not "took"): what the short-query index can
answer without scanning, kept the same on PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from . import fts, shapes

SNIPPET_CHARS = 160  # window shown around the first match
BEFORE_CHARS = 50  # of which before it, when the text allows
SHORT_QUERY = 3  # below this many characters the trigram index cannot answer
ELLIPSIS = "…"
_SPACE = re.compile(r"\s")  # one for one, so offsets survive


def search(connection: Connection, backend: str, owner: str, query: str, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` SearchResults, most recently updated first: title hits (`message`
    None) and message hits."""
    needle = shapes.storable(query).strip()  # NUL and lone surrogates as the stored text has them
    if not needle or limit <= 0:
        return []
    short = len(needle) < SHORT_QUERY
    if short and not any(fts.indexed(char) for char in needle):
        return []  # "%", "?!": punctuation alone is not in the index
    fetch = limit + 10  # spare rows for hits the substring test turns down
    if backend == "sqlite":
        titles, messages = _sqlite_rows(connection, owner, needle, fetch)
    else:
        titles, messages = _postgresql_rows(connection, owner, needle, fetch)
    folded = fold(needle)
    results = [
        result
        for result in (
            *(_result(row, row.title, None, folded, short) for row in titles),
            *(_result(row, row.content, row.message, folded, short) for row in messages),
        )
        if result is not None
    ]
    results.sort(key=lambda result: result["updated"], reverse=True)
    return results[:limit]


def _sqlite_rows(connection: Connection, owner: str, needle: str, fetch: int) -> tuple[list[Any], list[Any]]:
    if len(needle) >= SHORT_QUERY:
        suffix = ""
        match = _fts_string(needle)
    else:
        tokens = fts.search_text(needle).split()
        if not tokens:
            return [], []  # punctuation only: nothing an index holds
        suffix = "_short"
        match = _fts_string(" ".join(tokens)) + ("*" if fts.ends_in_word(needle) else "")
    # The FTS index drives (newest rows first, stopping at the limit); the owner check
    # joins by primary key.
    titles = connection.execute(
        text(
            f"SELECT c.id AS conversation, c.title, c.updated FROM search_titles{suffix} AS s "
            "JOIN conversations AS c ON c.pk = s.rowid "
            f"WHERE search_titles{suffix} MATCH :match AND c.owner = :owner "
            "ORDER BY s.rowid DESC LIMIT :fetch"
        ),
        {"match": match, "owner": owner, "fetch": fetch},
    )
    messages = connection.execute(
        text(
            "SELECT c.id AS conversation, c.title, m.id AS message, m.role, m.content, m.updated "
            f"FROM search_messages{suffix} AS s JOIN messages AS m ON m.pk = s.rowid "
            "JOIN conversations AS c ON c.pk = m.conversation_pk "
            f"WHERE search_messages{suffix} MATCH :match AND m.owner = :owner "
            "ORDER BY s.rowid DESC LIMIT :fetch"
        ),
        {"match": match, "owner": owner, "fetch": fetch},
    )
    return list(titles), list(messages)


def _postgresql_rows(connection: Connection, owner: str, needle: str, fetch: int) -> tuple[list[Any], list[Any]]:
    pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    # 1-2 letters match at a word's start (as on SQLite): said in SQL too, so the limit
    # is not spent on rows the substring test would turn down ("e" inside every word).
    regex = None
    if len(needle) < SHORT_QUERY and fts.in_word(needle[0]):
        regex = "(^|[^[:alnum:]])" + "".join(char if char.isalnum() else "\\" + char for char in needle)
    where = "ILIKE :pattern ESCAPE '\\'" + ("" if regex is None else " AND {column} ~* :regex")
    values = {"pattern": pattern, "regex": regex, "owner": owner, "fetch": fetch}
    titles = connection.execute(
        text(
            "SELECT c.id AS conversation, c.title, c.updated FROM conversations AS c "
            f"WHERE c.owner = :owner AND c.title {where.format(column='c.title')} "
            "ORDER BY c.updated DESC LIMIT :fetch"
        ),
        values,
    )
    messages = connection.execute(
        text(
            "SELECT c.id AS conversation, c.title, m.id AS message, m.role, m.content, m.updated "
            "FROM messages AS m JOIN conversations AS c ON c.pk = m.conversation_pk "
            # As on SQLite, whose index takes an answer in once it has ended (0004).
            f"WHERE m.owner = :owner AND m.status != 'streaming' AND m.content {where.format(column='m.content')} "
            "ORDER BY m.pk DESC LIMIT :fetch"
        ),
        values,
    )
    return list(titles), list(messages)


def _fts_string(value: str) -> str:
    """An FTS5 string: everything inside is text to tokenize, nothing is syntax."""
    return '"' + value.replace('"', '""') + '"'


def _result(row: Any, haystack: str, message: str | None, folded_needle: str, short: bool) -> dict[str, Any] | None:
    found = snippet(haystack, folded_needle, word_start=short)
    if found is None:
        return None
    text_, highlights = found
    return {
        "conversation": row.conversation,
        "title": row.title,
        "message": message,
        "role": row.role if message is not None else None,
        "snippet": text_,
        "highlights": highlights,
        "updated": row.updated,
    }


def fold(value: str) -> str:
    """Lower case, one character for one (İ lowers to two: kept as is), so positions in
    the folded text are positions in the original. Final sigma is sigma, as in Unicode
    case folding (str.lower picks ς by context, SQLite's indexes fold both to σ)."""
    lowered = value.lower()
    if len(lowered) != len(value):
        lowered = "".join(char.lower() if len(char.lower()) == 1 else char for char in value)
    return lowered.replace("ς", "σ")


def matches(folded_haystack: str, folded_needle: str, word_start: bool = False) -> Iterable[int]:
    """Start of every non-overlapping occurrence; with `word_start`, only where the
    short-query index finds one: 1-2 letters at the start of a word (ok in "okay", not in
    "took"), while a CJK character or emoji matches anywhere."""
    start = folded_haystack.find(folded_needle)
    anywhere = not word_start or not fts.in_word(folded_needle[0])
    while start >= 0:
        if anywhere or start == 0 or not fts.in_word(folded_haystack[start - 1]):
            yield start
            start = folded_haystack.find(folded_needle, start + len(folded_needle))
        else:
            start = folded_haystack.find(folded_needle, start + 1)


def snippet(haystack: str, folded_needle: str, word_start: bool = False) -> tuple[str, list[list[int]]] | None:
    """(window of about SNIPPET_CHARS around the first match, with … where cut; every
    whole match in it as [start, end] in UTF-16 code units), or None: no match."""
    folded = fold(haystack)
    starts = list(matches(folded, folded_needle, word_start))
    if not starts:
        return None
    size = len(folded_needle)
    first = starts[0]
    begin = max(0, first - BEFORE_CHARS)
    end = min(len(haystack), max(begin + SNIPPET_CHARS, first + size))
    begin = max(0, min(begin, end - SNIPPET_CHARS))  # near the end: show more before it
    lead = ELLIPSIS if begin > 0 else ""
    window = lead + _SPACE.sub(" ", haystack[begin:end]) + (ELLIPSIS if end < len(haystack) else "")
    highlights = []
    for start in starts:
        if begin <= start and start + size <= end:
            offset = len(lead) + utf16_length(haystack[begin:start])
            highlights.append([offset, offset + utf16_length(haystack[start : start + size])])
    return window, highlights


def utf16_length(value: str) -> int:
    """Length in UTF-16 code units, as a JavaScript string counts: astral characters
    (most emoji) are two."""
    return len(value) + sum(1 for char in value if ord(char) > 0xFFFF)
