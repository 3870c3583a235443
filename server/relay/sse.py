"""Incremental parser for the server-sent events wire format (WHATWG rules).

Feed it bytes split at any point; it yields the same events as if the stream had
arrived in one piece. Used on the upstream side, where the model API speaks SSE.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class SSEProtocolError(Exception):
    """The stream broke a limit we rely on (a line longer than allowed).

    `events` holds what the same chunk yielded before the bad line, so nothing that
    arrived intact is lost whatever the chunk boundaries were.
    """

    def __init__(self, message: str, events: list[SSEEvent] | None = None) -> None:
        super().__init__(message)
        self.events = events or []


class SSEEventTooLarge(SSEProtocolError):
    """One event's data lines together passed the limit: it is never built."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs three times as much to make, per token
class SSEEvent:
    data: str
    event: str = "message"
    id: str = ""


class SSEParser:
    """Turns chunks of bytes into SSEEvents; comments are counted, not returned."""

    __slots__ = (
        "_data",
        "_data_chars",
        "_decoder",
        "_event",
        "_has_data",
        "_holds_nothing",
        "_last_id",
        "_max_event",
        "_max_line",
        "_max_single",
        "_partial",
        "_skip_lf",
        "_started",
        "comments",
        "retry_ms",
    )

    def __init__(self, max_line_chars: int = 1_048_576, max_event_chars: int = 2_097_152) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_line = max_line_chars
        # An event's data is kept until its blank line: bounded on its own, not only per line.
        self._max_event = max_event_chars
        self._max_single = min(max_line_chars, max_event_chars)
        self._partial = ""  # text after the last line break
        self._skip_lf = False  # last chunk ended in CR: a leading LF belongs to it
        self._started = False  # the BOM is only stripped at the very start
        # Started, with nothing held between chunks: no partial line or event, no CR or
        # half a character waiting. Kept up to date by feed(), so that single_data(),
        # asked once per token, need not look at all of that.
        self._holds_nothing = False
        self._data: list[str] = []
        self._data_chars = 0  # the event's data so far, with the line breaks that join it
        self._has_data = False
        self._event = ""
        self._last_id = ""
        self.comments = 0
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        try:
            return self._collect(self._decoder.decode(chunk))
        finally:
            self._holds_nothing = (
                self._started
                and not self._partial
                and not self._has_data
                and not self._event
                and not self._skip_lf
                and not self._decoder.getstate()[0]
            )

    @property
    def last_event_id(self) -> str:
        """The id an event dispatched now would carry (the spec's last event ID buffer)."""
        return self._last_id

    def single_data(self, chunk: bytes) -> bytes | None:
        """The usual chunk from a model API, `data: <one line>` and a blank line, seen
        without parsing: its data, undecoded, or None (then call feed()). Only when the
        parser holds nothing, so it stands for the one event feed() would give, named
        `message` with `last_event_id`, and feed() would leave the parser as it is.
        """
        if (
            self._holds_nothing
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
            and chunk.count(b"\n") == 2
            and b"\r" not in chunk
            and len(chunk) <= self._max_single
        ):
            return chunk[6:-2]
        return None

    def _collect(self, text: str) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        try:
            self._lines_to_events(text, events)
        except SSEProtocolError as exc:
            exc.events = events + exc.events
            raise
        return events

    def feed_eof(self) -> list[SSEEvent]:
        """End of stream: an event without its blank line is dropped, except `[DONE]`.

        Some servers (older llama.cpp) end with `data: [DONE]` and no blank line.
        """
        self._holds_nothing = False  # nothing comes after the end
        events = self._collect(self._decoder.decode(b"", final=True))
        if self._partial:
            self._process_line(self._partial)
            self._partial = ""
        if self._has_data and "\n".join(self._data) == "[DONE]":
            events.append(SSEEvent(data="[DONE]", event=self._event or "message", id=self._last_id))
        self._reset_event()
        return events

    def _lines_to_events(self, text: str, events: list[SSEEvent]) -> None:
        """Appends to `events` as lines complete (so they are there if a later line raises)."""
        if not text:
            return
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        buffer = self._partial + text if self._partial else text
        if "\r" in buffer:
            lines = []
            start = 0
            for match in _LINE_BREAK.finditer(buffer):
                if match.group() == "\r" and match.end() == len(buffer):
                    self._skip_lf = True  # maybe the first half of a CRLF split across chunks
                lines.append(buffer[start : match.start()])
                start = match.end()
            partial = buffer[start:]
        else:  # the usual case: LF only, no regex needed
            lines = buffer.split("\n")
            partial = lines.pop()
        max_line = self._max_line
        for line in lines:
            if line.startswith("data: ") and len(line) <= max_line:  # the usual line, made short
                self._data.append(line[6:])
                self._has_data = True
                self._data_chars += len(line) - 5
                if self._data_chars > self._max_event:
                    self._event_too_large()
            elif (event := self._process_line(line)) is not None:
                events.append(event)
        self._partial = partial
        if len(partial) > max_line:
            raise SSEProtocolError(f"line longer than {max_line} characters")

    def _process_line(self, line: str) -> SSEEvent | None:
        if len(line) > self._max_line:
            raise SSEProtocolError(f"line longer than {self._max_line} characters")
        if not line:
            return self._dispatch()
        if line[0] == ":":
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
            self._data_chars += len(value) + 1
            if self._data_chars > self._max_event:
                self._event_too_large()
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._has_data:
            self._event = ""
            return None
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._last_id)
        self._reset_event()
        return event

    def _event_too_large(self) -> None:
        self._reset_event()  # what it held goes now, not when the parser does
        raise SSEEventTooLarge(f"event longer than {self._max_event} characters")

    def _reset_event(self) -> None:
        self._data = []
        self._data_chars = 0
        self._has_data = False
        self._event = ""
