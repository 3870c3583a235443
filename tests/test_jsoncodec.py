"""server/jsoncodec.py: orjson's speed, json's answers."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest

from server import jsoncodec


@pytest.mark.parametrize(
    "value",
    [
        {"text": "a\nb 世界 🎉", "n": 3, "none": None, "list": [1.5, True]},
        {"lone": "x\ud800y"},  # a lone surrogate: orjson refuses it, json escapes it
        {"big": 2**70},  # past 64 bits: orjson refuses it
        "</script><b>",
    ],
)
def test_dumps_reads_back_as_json_wrote_it(value: Any) -> None:
    written = jsoncodec.dumps(value)
    written.decode("utf-8")  # always valid UTF-8, whatever the text held
    assert json.loads(written) == value
    assert jsoncodec.loads(written) == value


def test_dumps_writes_utf8_not_escapes() -> None:
    assert jsoncodec.dumps({"a": "世界"}) == '{"a":"世界"}'.encode()
    assert jsoncodec.dumps({"a": "\ud800"}) == b'{"a":"\\ud800"}'


@pytest.mark.parametrize("length", [10, 3_000, 200_000])
def test_dumps_keeps_no_more_memory_than_its_bytes(length: int) -> None:
    """Its results are kept (a request's body while its answer streams): each must cost
    about its own size, not the buffer orjson wrote it in."""
    value = {"messages": [{"role": "user", "content": "x" * length}]}
    size = len(jsoncodec.dumps(value))
    tracemalloc.start()
    try:
        kept = [jsoncodec.dumps(value) for _ in range(20)]
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 20
    assert traced / 20 < size * 1.2 + 200
