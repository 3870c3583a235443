"""Decompressing a model API's body as it arrives, a bounded piece at a time.

Rill asks for `Accept-Encoding: identity` and turns aiohttp's own decompression off: a
body inflated in one go can be a bomb (a few MB of gzip become GBs), and even a valid
64 MB one holds the event loop for seconds. An upstream that compresses anyway is read
here: each loop turn inflates at most PIECE_BYTES, and while inflated bytes wait, the
connection stops reading, so neither the output nor the compressed backlog can grow.
Measured with a 64 MB (inflated) gzip answer: aiohttp inflating it held the loop for one
callback of ~0.7 s of CPU (2.5-3.5 s on a busy machine); read here, no turn took over 5 ms.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from collections.abc import Callable

from aiohttp import ClientPayloadError

from server.relay.bodytap import BodySink

# Inflated bytes per loop turn: with the parsing they feed, a few ms (the relay parses
# ~100 MB/s of stream), so no other client waits long for this one.
PIECE_BYTES = 64 * 1024

ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})


class BadEncoding(ClientPayloadError):
    """The compressed body could not be decoded."""


def decompressor(encoding: str, first: bytes) -> zlib._Decompress:
    """For a body in one of ENCODINGS, from its first bytes: "deflate" is the zlib format,
    or raw deflate data without the zlib header, as some servers and clients send it.
    Request bodies (bodies.py) and the model API's (here) are decoded alike."""
    if encoding == "deflate" and (first[0] & 0x0F) != 8:
        return zlib.decompressobj(-zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS)
    return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip, x-gzip


def inflate_some(data: bytes, encoding: str, limit: int) -> bytes:
    """At most `limit` bytes of a compressed body read whole (an error body): never more,
    whatever it holds. Raises BadEncoding when it is not what it says."""
    if not data:
        return b""
    try:
        return decompressor(encoding, data).decompress(data, limit)
    except zlib.error as exc:
        raise BadEncoding(f"not valid {encoding}") from exc


class Inflating:
    """A BodySink in front of another that gets the body inflated, in order, a piece per
    loop turn. `pause` and `resume` stop and restart the connection's reading; `done`
    tells when the sink wants nothing more (the rest is then skipped, not inflated)."""

    __slots__ = (
        "_closed",
        "_decompress",
        "_done",
        "_encoding",
        "_end",
        "_full",
        "_handle",
        "_loop",
        "_pause",
        "_paused",
        "_pending",
        "_resume",
        "_sink",
    )

    def __init__(
        self,
        sink: BodySink,
        encoding: str,
        *,
        pause: Callable[[], None],
        resume: Callable[[], None],
        done: Callable[[], bool],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        self._encoding = encoding
        self._pause = pause
        self._resume = resume
        self._done = done
        self._decompress: zlib._Decompress | None = None  # made at the first byte (deflate is sniffed)
        self._pending: deque[bytes] = deque()  # compressed pieces not yet started on
        self._full = False  # the last piece filled its budget: zlib may hold more output
        self._end: tuple[BaseException | None] | None = None  # the body's end, once it came
        self._handle: asyncio.Handle | None = None
        self._paused = False
        self._closed = False

    def body_data(self, data: bytes) -> None:
        if self._closed:
            return
        self._pending.append(data)
        if self._handle is None:
            self._step()

    def body_end(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._end = (error,)
        if self._handle is None:
            self._step()

    def close(self) -> None:
        """No more work, nothing more to the sink (the tap is over)."""
        self._closed = True
        self._pending.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._paused:
            # aiohttp may have pooled the connection at the body's end: never leave it paused
            self._paused = False
            self._resume()

    def _step(self) -> None:
        self._handle = None
        if self._done():
            self._pending.clear()  # of no use to anyone: not worth inflating
            self._decompress = None
        else:
            try:
                self._inflate(PIECE_BYTES)
            except zlib.error:
                self._closed = True
                self._sink.body_end(BadEncoding(f"not valid {self._encoding}"))
                return
            if self._closed:
                return
            if self._pending or self._full:
                if not self._paused:
                    self._paused = True
                    self._pause()
                self._handle = self._loop.call_soon(self._step)
                return
        if self._paused:
            self._paused = False
            self._resume()  # may hand us more at once (body_data, re-entrantly: _handle is None)
            if self._handle is not None or self._closed:
                return
        if self._end is not None and not self._pending:
            self._finish(self._end[0])

    def _inflate(self, budget: int) -> None:
        """Up to `budget` inflated bytes to the sink."""
        while budget > 0:
            decompress = self._decompress
            if decompress is not None and decompress.eof and decompress.unused_data:
                data = self._next_member(decompress.unused_data)
                decompress = self._decompress = decompressor(self._encoding, data)
            elif decompress is not None and decompress.unconsumed_tail:
                data = decompress.unconsumed_tail
            elif decompress is not None and self._full:
                data = b""  # output zlib held back when the last piece filled up
            elif self._pending:
                data = self._pending.popleft()
                if not data:
                    continue
                if decompress is None or decompress.eof:
                    if decompress is not None:
                        data = self._next_member(data)
                    decompress = self._decompress = decompressor(self._encoding, data)
            else:
                return
            out = decompress.decompress(data, budget)
            self._full = len(out) == budget
            budget -= len(out)
            if out:
                self._sink.body_data(out)
                if self._closed or self._done():
                    self._full = False
                    return

    def _next_member(self, data: bytes) -> bytes:
        """gzip allows several members back to back; anything else after the end is wrong."""
        if self._encoding == "deflate":
            raise zlib.error("data after the end of the deflate stream")
        return data

    def _finish(self, error: BaseException | None) -> None:
        self._closed = True
        decompress = self._decompress
        if error is None and decompress is not None and not decompress.eof and not self._done():
            error = BadEncoding(f"the {self._encoding} body ended early")
        self._sink.body_end(error)
