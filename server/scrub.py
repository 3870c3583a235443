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
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}", re.IGNORECASE)
# What may sit between two characters of an echoed secret.
_GAP = r"[\s\u200b-\u200d\u2060\ufeff]*"
# Shorter runs of base64 could turn up by chance in ordinary text.
_MIN_BASE64_CORE = 8


def scrub(text: str, secrets: Sequence[str]) -> str:
    """Every form of every secret, and anything shaped like a key, masked."""
    pattern = _pattern(tuple(secret for secret in secrets if secret))
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return _KEY_LIKE.sub("sk-" + MASK, text)


@functools.lru_cache(maxsize=16)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for all the secrets' forms; built once per set of secrets (errors only)."""
    if not secrets:
        return None
    forms: list[str] = []
    for secret in sorted(set(secrets), key=len, reverse=True):
        forms.append(_GAP.join(_char(c) for c in secret))
        forms.append(_GAP.join(f"{byte:02x}" for byte in secret.encode()))  # hex
        for core in sorted(_base64_cores(secret)):
            forms.append("(?-i:" + _GAP.join(re.escape(c) for c in core) + ")")  # base64 has case
    return re.compile("|".join(forms), re.IGNORECASE)


def _char(c: str) -> str:
    """One character of a secret in any of its echoed forms (the regex ignores case)."""
    code = ord(c)
    utf8 = c.encode("utf-8", errors="surrogatepass")
    forms = {
        re.escape(c),
        "".join(f"%(?:25)?{byte:02x}" for byte in utf8),  # percent-encoded, once or twice
        "".join(rf"\\x{byte:02x}" for byte in utf8),
        f"&#0*{code};",
        f"&#x0*{code:x};",
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
