"""Removing secrets from text we did not write (the model API's error messages, headers,
redirect targets, finish reasons) before it reaches a client or a log.

A broken or hostile upstream may echo a key altered, so each secret is also found in
another case, percent-encoded (once or twice), as JSON `\\u`, `\\x` or HTML escapes,
in full-width letters, with whitespace or zero-width characters between its characters,
as hex, and inside base64 (of the key alone, `Bearer <key>`, `user:<key>`, ...)."""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Sequence

MASK = "***"
# Anything shaped like an API key, configured here or not (another provider's, say).
_KEY_SHAPE = r"\bsk-[a-z0-9_\-]{6,}"
_KEY_TAIL = re.compile(r"[A-Za-z0-9_\-]*")
# Characters that show as nothing: dropped from a message, allowed inside a secret's echo.
_INVISIBLE = "\u00ad\u180e\u200b\u200c\u200d\u2060\ufeff"
# What may sit between two characters of an echoed secret.
_GAP = rf"[\s{_INVISIBLE}]*"
# For a message: invisible characters dropped, control characters that are not whitespace
# (which becomes one space) shown as U+FFFD.
_ONE_LINE = str.maketrans(
    dict.fromkeys(_INVISIBLE)
    | {chr(code): "\ufffd" for code in (*range(0x20), *range(0x7F, 0xA0)) if not chr(code).isspace()}
)
# Shorter runs of base64 could turn up by chance in ordinary text.
_MIN_BASE64_CORE = 8
# The longest form one character of a secret takes (a 4-byte character percent-encoded
# twice: 4 x `%25XX`), plus the one space a gap can be once whitespace is collapsed.
_CHAR_REACH = 21


@functools.lru_cache(maxsize=16)
def _compiled(secrets: tuple[str, ...]) -> tuple[re.Pattern[str], int]:
    """One regex for every form of every secret (and the key shape), and `reach`: the most
    characters a form can span in one-line text. Built once per set of secrets."""
    forms: list[str] = []
    for secret in sorted(set(secrets), key=len, reverse=True):
        forms.append(_GAP.join(_char(c) for c in secret))
        forms.append(_GAP.join(f"{byte:02x}" for byte in secret.encode("utf-8", errors="surrogatepass")))  # hex
        for core in sorted(_base64_cores(secret)):
            forms.append("(?-i:" + _GAP.join(re.escape(c) for c in core) + ")")  # base64 has case
    forms.append(f"(?P<shape>{_KEY_SHAPE})")
    reach = max((_CHAR_REACH * len(secret) for secret in secrets), default=0)
    return re.compile("|".join(forms), re.IGNORECASE), reach


def _char(c: str) -> str:
    """One character of a secret in any of its echoed forms (the regex ignores case)."""
    code = ord(c)
    utf8 = c.encode("utf-8", errors="surrogatepass")
    forms = {
        re.escape(c),
        "".join(f"%(?:25)?{byte:02x}" for byte in utf8),  # percent-encoded, once or twice
        "".join(rf"\\x{byte:02x}" for byte in utf8),
        f"&#0{{0,4}}{code};",
        f"&#x0{{0,4}}{code:x};",
    }
    if code < 0x10000:
        forms.add(rf"\\u{code:04x}")
    else:  # JSON writes it as a surrogate pair
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms.add(rf"\\u{high:04x}\\u{low:04x}")
    if 0x21 <= code <= 0x7E:
        forms.add(re.escape(chr(code + 0xFEE0)))  # full-width form (NFKC folds it back)
    return "(?:" + "|".join(sorted(forms, key=len, reverse=True)) + ")"


def _base64_cores(secret: str) -> set[str]:
    """The base64 text that any encoding of bytes containing the secret must contain, for
    each of the three alignments it can have (standard and URL-safe alphabets): the
    characters whose six bits all come from the secret."""
    data = secret.encode("utf-8", errors="surrogatepass")
    cores: set[str] = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + data).decode()
        core = encoded[(4 * shift + 2) // 3 : 4 * (shift + len(data)) // 3]
        if len(core) >= _MIN_BASE64_CORE:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def _replace(match: re.Match[str]) -> str:
    return "sk-" + MASK if match.group("shape") else MASK


def scrub(text: str, secrets: Sequence[str]) -> str:
    """Every form of every secret, and anything shaped like a key, masked."""
    pattern, _ = _compiled(tuple(secret for secret in secrets if secret))
    return pattern.sub(_replace, text)


def shown(text: str, secrets: Sequence[str], limit: int) -> str:
    """The start of `text` as a message may show it: one line, no control or invisible
    characters, every secret masked, at most `limit` characters (ending in … when cut).

    The work is bounded by `limit` and the secrets' lengths, not by the text (an upstream
    may send a megabyte), and no secret is shown cut in half: only text whose secrets the
    search could see whole is shown."""
    pattern, reach = _compiled(tuple(secret for secret in secrets if secret))
    reach = max(reach, 256)  # a key shape of another provider's, unconfigured here
    raw_limit = 2 * (limit + reach)
    line = " ".join(text[:raw_limit].translate(_ONE_LINE).split())
    # A form cut in half where the raw text was cut lies in the last `reach` characters.
    usable = len(line) - reach if len(text) > raw_limit else len(line)
    pieces: list[str] = []
    size = pos = 0
    while size < limit and pos < usable:
        room = min(limit - size, usable - pos)
        # Any form starting within `room` ends within `reach` after it: the search sees it whole.
        match = pattern.search(line, pos, min(len(line), pos + room + reach))
        if match is None or match.start() >= pos + room:
            pieces.append(line[pos : pos + room])
            pos += room
            break
        mask = _replace(match)
        pieces += [line[pos : match.start()], mask]
        size += match.start() - pos + len(mask)
        pos = match.end()
        if match.group("shape"):  # the search may have stopped inside a long one
            end = _KEY_TAIL.match(line, pos)
            pos = end.end() if end else pos
    out = "".join(pieces)
    if len(out) > limit or pos < len(line) or len(text) > raw_limit:
        out = out[: limit - 1] + "…"
    return out
