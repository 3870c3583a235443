"""pipe_body: the body reaches the sink in aiohttp's own data callback, in order, with
its end or its error, and the reader is itself again afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import ClientPayloadError, StreamReader
from aiohttp.base_protocol import BaseProtocol

from server.bodytap import pipe_body


class Sink:
    """Records what it is given; finished after `until` pieces, or at the body's end."""

    def __init__(self, until: int | None = None) -> None:
        self.pieces: list[bytes] = []
        self.ends: list[BaseException | None] = []
        self.until = until
        self.finished: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def body_data(self, data: bytes) -> None:
        self.pieces.append(data)
        if self.until is not None and len(self.pieces) >= self.until:
            self.finished.set_result("enough")

    def body_end(self, error: BaseException | None) -> None:
        self.ends.append(error)
        if not self.finished.done():
            self.finished.set_result("ended")


class Untappable(StreamReader):
    """A reader of another class (a future aiohttp's): read in the task instead."""

    __slots__ = ()


def make_reader(kind: type[StreamReader] = StreamReader) -> StreamReader:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.connection_made(asyncio.Transport())  # connected: a reader in a task checks
    return kind(protocol, 2**16, loop=loop)


async def started(reader: StreamReader, sink: Sink) -> asyncio.Task[Any]:
    task = asyncio.create_task(pipe_body(reader, sink))
    await asyncio.sleep(0)  # the tap is in place once the task first waits
    return task


async def test_each_piece_reaches_the_sink_inside_feed_data() -> None:
    reader, sink = make_reader(), Sink()
    reader.feed_data(b"came with the headers")
    task = await started(reader, sink)
    assert sink.pieces == [b"came with the headers"]
    reader.feed_data(b"one")
    assert sink.pieces[-1] == b"one"  # no task step in between: nothing is buffered
    reader.feed_data(b"two")
    reader.feed_eof()
    assert await task == "ended"
    assert sink.pieces == [b"came with the headers", b"one", b"two"]
    assert sink.ends == [None]
    assert reader.total_bytes == len(b"came with the headersonetwo")


async def test_an_error_reaches_the_sink() -> None:
    reader, sink = make_reader(), Sink()
    task = await started(reader, sink)
    reader.feed_data(b"part")
    cut = ClientPayloadError("cut")
    reader.set_exception(cut)
    assert await task == "ended"
    assert sink.ends == [cut]


async def test_a_body_that_ended_before_the_tap_is_still_seen() -> None:
    reader, sink = make_reader(), Sink()
    reader.feed_data(b"all of it")
    reader.feed_eof()
    assert await pipe_body(reader, sink) == "ended"
    assert (sink.pieces, sink.ends) == ([b"all of it"], [None])


async def test_the_reader_buffers_as_usual_once_the_sink_has_finished() -> None:
    reader, sink = make_reader(), Sink(until=1)
    task = await started(reader, sink)
    reader.feed_data(b"last wanted")
    assert await task == "enough"
    assert type(reader) is StreamReader
    reader.feed_data(b"after")  # e.g. what follows [DONE]: left for release() to drop
    assert sink.pieces == [b"last wanted"]
    assert await reader.readany() == b"after"


async def test_a_cancelled_reader_restores_the_reader() -> None:
    reader, sink = make_reader(), Sink()
    task = await started(reader, sink)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert type(reader) is StreamReader
    reader.feed_data(b"late")
    assert sink.pieces == []


async def test_a_reader_of_another_class_is_read_in_the_task_with_the_same_result() -> None:
    reader, sink = make_reader(Untappable), Sink()
    reader.feed_data(b"first")
    task = await started(reader, sink)
    reader.feed_data(b"second")
    reader.feed_eof()
    assert await task == "ended"
    assert (sink.pieces, sink.ends) == ([b"first", b"second"], [None])
    assert type(reader) is Untappable
