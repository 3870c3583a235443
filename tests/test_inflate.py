"""Inflating: a compressed body reaches the sink inflated, in order, at most a piece per
loop turn, with reading paused while inflated bytes wait; bad or cut streams end with
BadEncoding; inflate_some never returns more than asked."""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib

import pytest

from server.relay.inflate import PIECE_BYTES, BadEncoding, Inflating, inflate_some

from .fakes import Sink


class Flow:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def inflating(sink: Sink, flow: Flow, encoding: str = "gzip", done: bool = False) -> Inflating:
    return Inflating(sink, encoding, pause=flow.pause, resume=flow.resume, done=lambda: done)


async def test_a_large_body_is_inflated_a_piece_per_loop_turn_with_reading_paused() -> None:
    plain = os.urandom(1000) * 1000  # 1 MB, compresses well
    sink, flow = Sink(), Flow()
    body = inflating(sink, flow)
    body.body_data(gzip.compress(plain))
    assert sum(map(len, sink.pieces)) == PIECE_BYTES  # one piece now, the rest on later turns
    assert flow.calls == ["pause"]
    body.body_end(None)
    assert sink.ends == []  # the end waits for the bytes before it
    await asyncio.wait_for(sink.ended.wait(), 2.0)
    assert b"".join(sink.pieces) == plain
    assert max(map(len, sink.pieces)) <= PIECE_BYTES
    assert flow.calls == ["pause", "resume"]
    assert sink.ends == [None]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
async def test_each_encoding_byte_by_byte(encoding: str) -> None:
    plain = b"data: " + "中文 🎉".encode() * 50 + b"\n\n"
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
    deflate = zlib.compressobj(6, zlib.DEFLATED, wbits)
    data = deflate.compress(plain) + deflate.flush()
    sink, flow = Sink(), Flow()
    body = inflating(sink, flow, "gzip" if encoding == "gzip" else "deflate")
    for i in range(len(data)):
        body.body_data(data[i : i + 1])
    body.body_end(None)
    await asyncio.wait_for(sink.ended.wait(), 2.0)
    assert b"".join(sink.pieces) == plain
    assert sink.ends == [None]


async def test_gzip_members_back_to_back_are_one_body() -> None:
    sink = Sink()
    body = inflating(sink, Flow())
    body.body_data(gzip.compress(b"one, ") + gzip.compress(b"two"))
    body.body_end(None)
    await asyncio.wait_for(sink.ended.wait(), 2.0)
    assert (b"".join(sink.pieces), sink.ends) == (b"one, two", [None])


async def test_a_corrupt_body_ends_with_bad_encoding_after_what_came_whole() -> None:
    """(zlib keeps nothing of a call that fails: what came in an earlier read is kept.)"""
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
    sink = Sink()
    body = inflating(sink, Flow())
    body.body_data(deflate.compress(b"whole") + deflate.flush(zlib.Z_SYNC_FLUSH))
    body.body_data(b"\xff" * 16)
    await asyncio.wait_for(sink.ended.wait(), 2.0)
    assert b"".join(sink.pieces) == b"whole"
    assert len(sink.ends) == 1
    assert isinstance(sink.ends[0], BadEncoding)
    body.body_data(b"more")  # after the end: ignored
    body.body_end(None)
    assert len(sink.ends) == 1


async def test_a_body_cut_short_ends_with_bad_encoding() -> None:
    sink = Sink()
    body = inflating(sink, Flow())
    body.body_data(gzip.compress(b"x" * 1000)[:-10])
    body.body_end(None)
    await asyncio.wait_for(sink.ended.wait(), 2.0)
    assert isinstance(sink.ends[0], BadEncoding)


async def test_nothing_is_inflated_once_the_sink_is_done() -> None:
    sink, flow = Sink(), Flow()
    body = inflating(sink, flow, done=True)
    body.body_data(gzip.compress(bytes(10_000_000)))
    body.body_end(None)
    assert sink.pieces == []
    assert sink.ends == [None]  # the body's own end still settles the connection


async def test_close_stops_the_work_left() -> None:
    sink, flow = Sink(), Flow()
    body = inflating(sink, flow)
    body.body_data(gzip.compress(bytes(10_000_000)))
    body.close()
    assert flow.calls == ["pause", "resume"]  # a connection is never left paused
    await asyncio.sleep(0.01)
    assert len(sink.pieces) == 1
    body.body_end(None)
    assert sink.ends == []


def test_inflate_some_returns_at_most_the_limit() -> None:
    assert inflate_some(gzip.compress(bytes(100_000_000)), "gzip", 1000) == bytes(1000)
    assert inflate_some(zlib.compress(b"short"), "deflate", 1000) == b"short"
    assert inflate_some(b"", "gzip", 1000) == b""
    with pytest.raises(BadEncoding):
        inflate_some(b"not gzip at all", "gzip", 1000)
