"""SQLite full-text search: the text the short-query index sees.

Two FTS5 indexes cover every query length (migration 0002_search): a trigram index finds
any substring of 3+ characters in any script; trigrams cannot find 1 or 2 characters, so
a second, unicode61 index holds the same text with every character of a script written
without spaces (CJK, Kana, Hangul, Thai...) as a token of its own, and every symbol or
emoji as a token spelled in ASCII hex (unicode61 would drop it as a separator). A 1-2
character query is a phrase of those tokens there: 世界 is the phrase 世 界, found inside
你好世界. The triggers that keep that index in sync call `search_text` as the SQL function
`rill_search_text`, so every SQLite connection must have it registered (`register`):
the store's engine does it on connect."""

from __future__ import annotations

import unicodedata
from typing import Any

FUNCTION = "rill_search_text"
# Private use: a token character for unicode61 (category Co) that text never yields as a
# token prefix, since private-use characters in text are themselves spelled in hex.
MARK = "\ue000"


def _token(char: str) -> str:
    """How one non-ASCII character appears in the short-query index."""
    category = unicodedata.category(char)
    if category.startswith("Z"):
        return " "
    if category[0] in "LN":
        code = ord(char)
        # Scripts written without spaces between words: one token per character.
        if code >= 0x2E80 or 0x0E00 <= code < 0x1800:
            return f" {char} "
        return char  # é, ж, α...: part of a word, as unicode61 has it
    # Symbols, emoji, punctuation, marks, joiners: fixed width, so no token is a prefix of another.
    return f" {MARK}{ord(char):06x} "


class _Tokens(dict[int, str]):
    """str.translate's table, filled as characters are met (ASCII maps to itself): a
    C-speed pass over the text, which the triggers run on every save of an answer."""

    def __missing__(self, code: int) -> str:
        if len(self) > 16384:
            self.clear()  # bounded: text may hold any of Unicode's characters
        token = chr(code) if code < 0x80 else _token(chr(code))
        self[code] = token
        return token


_TOKENS = _Tokens()


def search_text(text: str | None) -> str:
    """The text as indexed for 1-2 character queries (deterministic: triggers delete by it)."""
    if not text:
        return ""
    return text.translate(_TOKENS)


def in_word(char: str) -> bool:
    """Whether the character continues a word in the short-query index (ASCII or Latin
    letters and digits); CJK characters, emoji and punctuation never do."""
    if char.isascii():
        return char.isalnum()
    return char.isalnum() and _token(char) == char


def indexed(char: str) -> bool:
    """Whether the short-query index holds the character at all (ASCII punctuation and
    spaces are separators)."""
    return char.isalnum() if char.isascii() else not char.isspace()


def ends_in_word(query: str) -> bool:
    """Whether the query's last character belongs to a word (ASCII, Latin...) rather than
    a single-character token: then the last token is searched as a prefix (ok in okay)."""
    return in_word(query[-1])


def register(dbapi_connection: Any) -> None:
    """Make `rill_search_text` available on one SQLite DB-API connection (sqlite3 or
    SQLAlchemy's pool proxy around one)."""
    dbapi_connection.create_function(FUNCTION, 1, search_text, deterministic=True)
