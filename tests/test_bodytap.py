"""tapped(): the body reaches the sink in aiohttp's own data callback, in order, with
its end or its error, for as long as the block runs; the reader is itself afterwards."""

from __future__ import annotations

import asyncio

from aiohttp import ClientPayloadError, StreamReader
from aiohttp.base_protocol import BaseProtocol

from server.relay.bodytap import tapped

from .fakes import Sink


class Untappable(StreamReader):
    """A reader of another class (a future aiohttp's): read in a task instead."""

    __slots__ = ()


def make_reader(kind: type[StreamReader] = StreamReader) -> StreamReader:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.connection_made(asyncio.Transport())  # connected: a reader in a task checks
    return kind(protocol, 2**16, loop=loop)


async def test_each_piece_reaches_the_sink_inside_feed_data() -> None:
    reader, sink = make_reader(), Sink()
    reader.feed_data(b"came with the headers")
    async with tapped(reader, sink):
        assert sink.pieces == [b"came with the headers"]
        reader.feed_data(b"one")
        assert sink.pieces[-1] == b"one"  # no task step in between: nothing is buffered
        reader.feed_data(b"two")
        reader.feed_eof()
        assert sink.ends == [None]
    assert sink.pieces == [b"came with the headers", b"one", b"two"]
    assert reader.total_bytes == len(b"came with the headersonetwo")
    assert type(reader) is StreamReader


async def test_an_error_reaches_the_sink() -> None:
    reader, sink = make_reader(), Sink()
    async with tapped(reader, sink):
        reader.feed_data(b"part")
        cut = ClientPayloadError("cut")
        reader.set_exception(cut)
    assert sink.ends == [cut]


async def test_a_body_that_ended_before_the_tap_is_still_seen() -> None:
    reader, sink = make_reader(), Sink()
    reader.feed_data(b"all of it")
    reader.feed_eof()
    async with tapped(reader, sink):
        pass
    assert (sink.pieces, sink.ends) == ([b"all of it"], [None])


async def test_an_error_before_the_tap_is_still_seen() -> None:
    reader, sink = make_reader(), Sink()
    cut = ClientPayloadError("cut")
    reader.set_exception(cut)
    async with tapped(reader, sink):
        pass
    assert sink.ends == [cut]


async def test_the_reader_is_restored_when_the_block_is_left_early() -> None:
    reader, sink = make_reader(), Sink()
    try:
        async with tapped(reader, sink):
            raise asyncio.CancelledError  # Stop, shutdown: the caller then closes the connection
    except asyncio.CancelledError:
        pass
    assert type(reader) is StreamReader
    reader.feed_data(b"late")
    assert sink.pieces == []


async def test_a_reader_of_another_class_is_read_in_a_task_with_the_same_result() -> None:
    reader, sink = make_reader(Untappable), Sink()
    reader.feed_data(b"first")
    async with tapped(reader, sink):
        reader.feed_data(b"second")
        reader.feed_eof()
        await asyncio.wait_for(sink.ended.wait(), 1.0)
    assert (b"".join(sink.pieces), sink.ends) == (b"firstsecond", [None])  # in the pieces the task read
    assert type(reader) is Untappable


class RefillingProtocol(BaseProtocol):
    """Like aiohttp's client protocol when reading resumes: what it held back while paused
    is parsed at once, inside the call that took from the reader's buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, held_back: list[bytes]) -> None:
        super().__init__(loop)
        self.reader: StreamReader | None = None
        self.held_back = held_back

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self.reader is not None and self.held_back:
            pieces, self.held_back = self.held_back, []
            for piece in pieces:
                self.reader.feed_data(piece)
            self.reader.feed_eof()


async def test_what_aiohttp_parses_while_the_tap_takes_the_buffer_is_not_lost() -> None:
    loop = asyncio.get_running_loop()
    protocol = RefillingProtocol(loop, [b"held back 1, ", b"held back 2"])
    protocol.connection_made(asyncio.Transport())
    reader = StreamReader(protocol, 2**16, loop=loop)
    protocol.reader = reader
    reader.feed_data(b"buffered, ")
    sink = Sink()
    async with tapped(reader, sink):
        pass
    assert b"".join(sink.pieces) == b"buffered, held back 1, held back 2"
    assert sink.ends == [None]


async def test_an_error_aiohttp_finds_while_the_tap_takes_the_buffer_reaches_the_sink() -> None:
    loop = asyncio.get_running_loop()
    protocol = RefillingProtocol(loop, [])
    protocol.connection_made(asyncio.Transport())
    reader = StreamReader(protocol, 2**16, loop=loop)
    cut = ClientPayloadError("cut")
    protocol.resume_reading = lambda resume_parser=True: reader.set_exception(cut)  # type: ignore[method-assign]
    reader.feed_data(b"buffered")
    sink = Sink()
    async with tapped(reader, sink):
        pass
    assert (sink.pieces, sink.ends) == ([b"buffered"], [cut])
