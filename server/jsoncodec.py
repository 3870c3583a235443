"""JSON parsing by orjson when it is installed (it is in requirements.txt, but optional):
a quarter of the stdlib's time for the model API's chunks and for the stored JSON read
back with each message. What orjson refuses and json accepts (NaN, escaped lone
surrogates) goes to json, so the answers are json's."""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:
    orjson = None  # type: ignore[assignment]


def loads(data: str | bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def loads_fast(data: bytes) -> Any:
    """orjson straight from bytes; None when it is missing or refuses them (also bytes
    that are not UTF-8): the caller's general path then gives the answer json would."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return None


def dumps(value: Any) -> bytes:
    """UTF-8 JSON. orjson takes a fifth of json's time on a long conversation (1 MB); what
    it refuses (a lone surrogate, an int past 64 bits) json writes, escaped to ASCII (a
    lone surrogate as \\udXXX: valid JSON, unlike its UTF-8)."""
    if orjson is not None:
        try:
            # Copied out: orjson's bytes keep the buffer it wrote into, 4 KB at the least
            # and about ten times the JSON's size for larger values (3.13; resident, not
            # just reserved), for as long as the result is kept.
            return bytes(memoryview(orjson.dumps(value)))
        except (orjson.JSONEncodeError, TypeError):
            pass
    return json.dumps(value, separators=(",", ":")).encode("ascii")
