"""Hands a streaming aiohttp response body to a sink in the connection's own callback.

aiohttp puts body bytes in a StreamReader, which buffers them and wakes the task that
awaits it: a task step per chunk, the costliest part of relaying a token when every
token arrives on its own. While tapped, the reader passes each piece straight to a
BodySink instead, so a token goes from the upstream's socket to the readers' sockets
in one callback, with nothing buffered.

This leans on aiohttp internals (the version is pinned in requirements.txt): its HTTP
parser calls the reader's feed_data / feed_eof / set_exception, and StreamReader has
__slots__, so a subclass without slots of its own can take over a reader in place.
A reader of any other class is read the ordinary way, with the same result.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Protocol

from aiohttp import StreamReader


class BodySink(Protocol):
    def body_data(self, data: bytes) -> None: ...

    def body_end(self, error: BaseException | None) -> None:
        """The body ended: cleanly (None) or with the reader's exception."""


class _TappedReader(StreamReader):
    __slots__ = ()

    # The readers tapped right now: each leaves when its tap does (the `finally` of tapped()).
    sinks: ClassVar[dict[StreamReader, BodySink]] = {}

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        if data:
            self.total_bytes += len(data)
            self.sinks[self].body_data(data)
        return False  # nothing buffered: never a reason to pause reading

    def begin_http_chunk_receiving(self) -> None:
        pass  # chunk boundaries only matter to readchunk(), which a tapped body skips

    def end_http_chunk_receiving(self) -> None:
        pass

    def feed_eof(self) -> None:
        super().feed_eof()  # runs aiohttp's own end-of-body callbacks (connection release)
        self.sinks[self].body_end(None)

    def set_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        super().set_exception(exc, *args, **kwargs)
        self.sinks[self].body_end(exc)


@asynccontextmanager
async def tapped(reader: StreamReader, sink: BodySink) -> AsyncIterator[None]:
    """Gives `sink` the rest of the body as it arrives, for as long as the block runs.

    Leave the block once the sink has seen the body's end, or close the connection: a
    reader left mid-body has skipped aiohttp's chunk bookkeeping and cannot go on."""
    if type(reader) is not StreamReader:
        reading = asyncio.create_task(_read_in_task(reader, sink))
        try:
            yield
        finally:
            reading.cancel()
            await asyncio.wait({reading})
        return
    buffered, error = _drain(reader)  # what came with the headers
    _TappedReader.sinks[reader] = sink
    reader.__class__ = _TappedReader
    try:
        if buffered:
            sink.body_data(buffered)
        if error is not None:
            sink.body_end(error)
        elif reader.is_eof():
            sink.body_end(None)
        yield
    finally:
        reader.__class__ = StreamReader
        del _TappedReader.sinks[reader]


def _drain(reader: StreamReader) -> tuple[bytes, BaseException | None]:
    """Everything the reader holds, and its error if it has one. One read_nowait() is not
    enough: taking from a paused reader's buffer resumes reading, and aiohttp then parses
    what it held back into the buffer, re-entrantly, even up to the body's end (or its
    error: read_nowait() raises it, as readany() would, before the bytes still held)."""
    pieces = []
    try:
        while piece := reader.read_nowait():
            pieces.append(piece)
    except Exception as exc:
        return b"".join(pieces), exc
    return b"".join(pieces), None


async def _read_in_task(reader: StreamReader, sink: BodySink) -> None:
    try:
        while chunk := await reader.readany():
            sink.body_data(chunk)
    except Exception as exc:  # the reader's failure is the sink's to judge, as when tapped
        sink.body_end(exc)
    else:
        sink.body_end(None)
