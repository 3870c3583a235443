"""What one answer may cost: a size cap on the answer and on one upstream event, a
compressed upstream inflated a bounded piece at a time, and an idle limit that only the
answer itself holds off once it has started (issue 13, items 5 and 8)."""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
import json
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from server.relay.upstream import ANSWER_BYTES_MIN, ANSWER_BYTES_PER_TOKEN, ChatRequest, answer_limit

from .conftest import Rill, StartRill, make_config
from .fakes import Chunk, Reply, answer, chunk, compressed, sse, text_of
from .test_upstream_faults import assert_still_serves, error_of, names, run_chat

MB = 1024 * 1024


@functools.cache
def _member(kind: str) -> bytes:
    """16 MB of zeros (or of small token chunks) as one gzip member, made once per run."""
    if kind == "zeros":
        plain = bytes(16 * MB)
    else:
        token = chunk("bomb ")
        plain = token * (16 * MB // len(token))
    return gzip.compress(plain, 9)


def bomb(kind: str, gigabytes: float = 1.0) -> Iterator[Chunk]:
    """A gzip body that inflates to `gigabytes` GB: 16 MB members back to back (a valid
    multi-member gzip stream), sent a member at a time. Made here, never stored."""
    member = _member(kind)
    for _ in range(int(gigabytes * 1024 / 16)):
        yield member
        yield 0.0


def token_text(i: int) -> str:
    return f"t{i} "


def endless_tokens() -> Iterator[Chunk]:
    """An upstream that never ends its answer (each 500 tokens, a turn of the loop)."""
    for i in itertools.count():
        yield chunk(token_text(i))
        if i % 500 == 0:
            yield 0.0


class PeakMemory:
    """The most Python memory allocated at once, above what was in use at the start."""

    def __enter__(self) -> PeakMemory:
        tracemalloc.start()
        self.start, _ = tracemalloc.get_traced_memory()
        self.peak = 0
        return self

    def __exit__(self, *exc: object) -> None:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.peak = peak - self.start


# --- the size of one answer ----------------------------------------------------------------


def test_the_answer_limit_is_derived_from_max_tokens() -> None:
    config = make_config("http://127.0.0.1:9/v1", limits={"max_tokens": 8192})
    provider = config.providers[0]
    request = ChatRequest(provider, provider.models[0], [{"role": "user", "content": "Hi"}])
    assert answer_limit(request, config) == 8192 * ANSWER_BYTES_PER_TOKEN  # the server's ceiling
    assert answer_limit(ChatRequest(provider, provider.models[0], [], max_tokens=4000), config) == 4000 * 1024
    assert answer_limit(ChatRequest(provider, provider.models[0], [], max_tokens=5), config) == ANSWER_BYTES_MIN
    fixed = make_config("http://127.0.0.1:9/v1", limits={"max_answer_bytes": 12345})
    assert answer_limit(ChatRequest(provider, provider.models[0], [], max_tokens=4000), fixed) == 12345


async def test_an_endless_answer_ends_at_the_cap_and_keeps_its_text(start_rill: StartRill) -> None:
    rill = await start_rill()
    rill.fake.script(Reply(stream=endless_tokens(), end="hang"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await run_chat(rill, options={"max_tokens": 2048})  # 2 MiB of stream
    elapsed = loop.time() - started

    error = error_of(events)
    assert error["code"] == "answer_too_large"
    assert error["retryable"] is False
    assert "kept" in error["message"]
    assert "2 MB" in error["message"]
    deltas = [e for e in events if e.event == "delta"]
    assert text_of(events) == "".join(token_text(i) for i in range(len(deltas)))  # every token, in order
    relayed = sum(len(chunk(token_text(i))) for i in range(len(deltas)))
    assert 2 * MB - 300 * 1024 <= relayed <= 2 * MB  # up to the cap, never past it
    assert elapsed < 10
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)  # the upstream was hung up on
    await assert_still_serves(rill)


async def test_the_cap_can_be_set(start_rill: StartRill) -> None:
    rill = await start_rill(limits={"max_answer_bytes": 100_000})
    rill.fake.script(Reply(stream=endless_tokens(), end="hang"))
    events = await run_chat(rill)

    assert error_of(events)["code"] == "answer_too_large"
    relayed = sum(len(chunk(token_text(i))) for i in range(len([e for e in events if e.event == "delta"])))
    assert 50_000 <= relayed <= 100_000
    await assert_still_serves(rill)


async def test_an_answer_under_the_cap_is_whole(start_rill: StartRill) -> None:
    rill = await start_rill(limits={"max_answer_bytes": 100_000})
    tokens = [token_text(i) for i in range(200)]  # ~16 KB of stream
    rill.fake.script(Reply(chunks=answer(tokens)))
    events = await run_chat(rill)
    assert text_of(events) == "".join(tokens)
    assert events[-1].data == {"finish_reason": "stop"}


# --- the size of one event -------------------------------------------------------------------


def many_data_lines(count: int, width: int = 100) -> Iterator[Chunk]:
    """One event split over `count` data lines (written 100 lines at a time), never ended."""
    line = b"data: " + b"x" * width + b"\n"
    for _ in range(count // 100):
        yield line * 100
        yield 0.0


async def test_an_event_of_150000_data_lines_is_refused_without_being_built(start_rill: StartRill) -> None:
    rill = await start_rill(upstream={"max_event_chars": 200_000})
    rill.fake.script(Reply(chunks=[chunk("Kept")], stream=many_data_lines(150_000), end="hang"))
    with PeakMemory() as memory:
        events = await run_chat(rill)

    assert text_of(events) == "Kept"
    error = error_of(events)
    assert error["code"] == "upstream_event_too_large"
    assert error["retryable"] is False
    assert "200000" in error["message"]
    # The whole event would be 15 MB of text (and more as 150,000 strings): far under that.
    assert memory.peak < 6 * MB, memory.peak
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)
    await assert_still_serves(rill)


async def test_the_event_limit_defaults_to_twice_the_line_limit(start_rill: StartRill) -> None:
    rill = await start_rill(upstream={"max_line_chars": 1000})
    config = make_config("http://127.0.0.1:9/v1", upstream={"max_line_chars": 1000})
    assert config.upstream.max_event_chars == 2000
    # 100 lines of 30: over 2000 characters in one event, though each line is short
    rill.fake.script(Reply(chunks=[chunk("Kept"), *many_data_lines(100, width=30), b"\n", *answer(["never"])]))
    events = await run_chat(rill)
    assert text_of(events) == "Kept"
    assert error_of(events)["code"] == "upstream_event_too_large"


# --- compressed upstreams -----------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "header"), [("gzip", "gzip"), ("deflate", "deflate"), ("raw-deflate", "deflate")])
async def test_a_compressed_answer_streams_token_by_token(rill: Rill, encoding: str, header: str) -> None:
    tokens = ["Hello", ",", " 世界", " 🎉", " and", " more"]
    rill.fake.script(
        Reply(stream=compressed(answer(tokens, delay=0.05), encoding), headers={"Content-Encoding": header})
    )
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    first = await reader.read_until("delta")
    assert first.data == {"text": "Hello"}
    assert not rill.fake.requests[0].closed.is_set()  # it came while the upstream was still sending
    events = await reader.read_all()

    assert names(events) == ["meta", *["delta"] * len(tokens), "usage", "done"]
    assert text_of(events) == "".join(tokens)
    assert rill.fake.requests[0].headers["Accept-Encoding"] == "identity"


async def test_a_large_compressed_answer_is_read_in_pieces(
    start_rill: StartRill, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MBs of stream in one compressed write: inflated a piece per loop turn, with the
    connection paused meanwhile and resumed after (aiohttp's flow control, the one
    reliance on its internals here), and every token still arrives in order."""
    held: list[bool] = []  # the upstream connection's reading state after each pause and resume
    pause, resume = ResponseHandler.pause_reading, ResponseHandler.resume_reading

    def note(protocol: ResponseHandler) -> None:
        transport = protocol.transport
        if transport is not None and transport.get_extra_info("peername")[1] == URL(rill.fake.url).port:
            held.append(not transport.is_reading())

    def spy_pause(self: ResponseHandler) -> None:
        pause(self)
        note(self)

    def spy_resume(self: ResponseHandler, resume_parser: bool = True) -> None:
        resume(self, resume_parser)
        note(self)

    monkeypatch.setattr(ResponseHandler, "pause_reading", spy_pause)
    monkeypatch.setattr(ResponseHandler, "resume_reading", spy_resume)
    rill = await start_rill(limits={"max_answer_bytes": 64 * MB})
    tokens = [token_text(i) for i in range(20_000)]  # ~1.3 MB of stream
    data = b"".join(c for c in answer(tokens) if isinstance(c, bytes))
    body = gzip.compress(data)
    # the first bytes, then the rest in one write once the body is tapped
    rill.fake.script(Reply(chunks=[body[:100], 0.2, body[100:]], headers={"Content-Encoding": "gzip"}))
    events = await run_chat(rill)
    assert text_of(events) == "".join(tokens)
    assert events[-1].data == {"finish_reason": "stop"}
    assert True in held  # held while inflating (aiohttp's own reader also resumes it once at the start)
    assert held[-1] is False  # and let go
    await assert_still_serves(rill)


async def test_a_gzip_bomb_of_zeros_ends_quickly_in_bounded_memory(start_rill: StartRill) -> None:
    rill = await start_rill(upstream={"max_line_chars": 4 * MB})
    _member("zeros")  # made before measuring
    rill.fake.script(Reply(stream=bomb("zeros"), headers={"Content-Encoding": "gzip"}, end="hang"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with PeakMemory() as memory:
        events = await run_chat(rill, options={"max_tokens": 100})  # a 1 MiB cap
    elapsed = loop.time() - started

    assert error_of(events)["code"] == "answer_too_large"
    assert elapsed < 5
    assert memory.peak < 32 * MB, memory.peak  # the bomb is 1 GB inflated
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)
    await assert_still_serves(rill)


async def test_a_gzip_bomb_of_tokens_keeps_the_text_up_to_the_cap(start_rill: StartRill) -> None:
    rill = await start_rill()
    _member("tokens")
    rill.fake.script(Reply(stream=bomb("tokens"), headers={"Content-Encoding": "gzip"}, end="hang"))
    with PeakMemory() as memory:
        events = await run_chat(rill, options={"max_tokens": 1024})  # 1 MiB of stream

    assert error_of(events)["code"] == "answer_too_large"
    count = len([e for e in events if e.event == "delta"])
    assert text_of(events) == "bomb " * count
    assert MB // 2 <= count * len(chunk("bomb ")) <= MB
    assert memory.peak < 32 * MB, memory.peak
    await assert_still_serves(rill)


async def test_a_corrupt_compressed_stream_is_bad_data_and_keeps_the_text(rill: Rill) -> None:
    deflate = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    good = deflate.compress(chunk("Kept") + chunk(" this")) + deflate.flush(zlib.Z_SYNC_FLUSH)
    bad = b"\xff" * 64  # a block of the reserved type: not deflate
    rill.fake.script(Reply(chunks=[good, 0.05, bad, *answer(["never"])], headers={"Content-Encoding": "gzip"}))
    events = await run_chat(rill)

    assert text_of(events) == "Kept this"
    error = error_of(events)
    assert error["code"] == "upstream_bad_data"
    await assert_still_serves(rill)


async def test_an_encoding_rill_cannot_read_is_bad_data(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=[b"\x1b\x00\x00"], headers={"Content-Encoding": "br"}))
    events = await run_chat(rill)

    assert names(events) == ["meta", "error"]
    error = error_of(events)
    assert error["code"] == "upstream_bad_data"
    assert "br" in error["message"]
    await assert_still_serves(rill)


@pytest.mark.parametrize("size", [200, 10 * MB])
async def test_a_compressed_error_body_is_read_and_kept_short(rill: Rill, size: int) -> None:
    said = "Model Not Exist " + "x" * size
    body = gzip.compress(json.dumps({"error": {"message": said, "type": "invalid_request_error"}}).encode())
    rill.fake.script(Reply(status=400, body=body, headers={"Content-Encoding": "gzip"}))
    events = await run_chat(rill)

    error = error_of(events)
    assert error["code"] == "upstream_bad_request"
    assert "Model Not Exist" in error["message"]
    assert len(error["message"]) < 600
    await assert_still_serves(rill)


# --- what counts as progress (item 8) ---------------------------------------------------------------


def forever(*items: Chunk) -> Iterator[Chunk]:
    while True:
        yield from items


@pytest.mark.parametrize(
    "filler",
    [b": keep-alive\n\n", b"\n\n", chunk(""), sse({"choices": [{"index": 0, "delta": {}}]})],
    ids=["comment", "blank_lines", "empty_delta", "no_delta"],
)
async def test_after_the_first_token_only_the_answer_holds_off_the_idle_limit(
    start_rill: StartRill, filler: bytes
) -> None:
    rill = await start_rill(timeouts={"idle_read": 1.0})
    rill.fake.script(
        Reply(chunks=[chunk("Half"), chunk(" an answer")], stream=itertools.islice(forever(0.2, filler), 200))
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await run_chat(rill)
    elapsed = loop.time() - started

    assert text_of(events) == "Half an answer"
    error = error_of(events)
    assert error["code"] == "upstream_idle_timeout"
    assert error["retryable"] is True
    assert "kept" in error["message"]
    assert elapsed < 3.0  # not the 40 s of keep-alives, nor max_generation
    await asyncio.wait_for(rill.fake.requests[0].closed.wait(), 2.0)
    await assert_still_serves(rill)


async def test_keep_alives_before_the_first_token_hold_a_queued_request(start_rill: StartRill) -> None:
    """DeepSeek queues a request under load, sending keep-alives: longer than idle_read is
    fine, up to first_token."""
    rill = await start_rill(timeouts={"idle_read": 0.5, "first_token": 5.0})
    queued: list[Chunk] = [chunk("", reasoning="")]  # the role chunk is not a token either
    for _ in range(8):
        queued += [0.2, b": keep-alive\n\n"]
    rill.fake.script(Reply(chunks=[*queued, *answer(["Served", " at last"])]))
    events = await run_chat(rill)
    assert text_of(events) == "Served at last"
    assert events[-1].data == {"finish_reason": "stop"}


async def test_usage_and_the_finish_reason_count_as_progress(start_rill: StartRill) -> None:
    rill = await start_rill(timeouts={"idle_read": 0.5})
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    rill.fake.script(
        Reply(
            chunks=[
                chunk("Text"),
                0.3,
                chunk("", finish="stop"),
                0.3,
                sse({"choices": [], "usage": usage}),
                0.3,
                b"data: [DONE]\n\n",
            ]
        )
    )
    events = await run_chat(rill)
    assert text_of(events) == "Text"
    assert events[-1].data == {"finish_reason": "stop"}
