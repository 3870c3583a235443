"""Logging set-up: a request id on every log line written while a request is handled
(and in its X-Request-ID response header), and optional JSON lines for log shippers."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

from aiohttp import web
from multidict import istr

from server.http.errors import Handler

REQUEST_ID: ContextVar[str] = ContextVar("rill_request_id", default="-")
REQUEST_ID_KEY = web.RequestKey("request_id", str)
X_REQUEST_ID = istr("X-Request-ID")  # an istr costs a response no copies (see security.py)
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a proxy's id is kept if it looks like one


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-ID", "")
    # Unique, not secret: a random 64-bit number, without uuid4's system call per request.
    request_id = incoming if _ACCEPTED_ID.fullmatch(incoming) else f"{random.getrandbits(64):016x}"
    request[REQUEST_ID_KEY] = request_id
    token = REQUEST_ID.set(request_id)
    try:
        return await handler(request)
    finally:
        REQUEST_ID.reset(token)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        response.headers[X_REQUEST_ID] = request_id


class RequestIdFilter(logging.Filter):
    """Adds record.request_id ("-" outside a request) for the formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


# What could end a log line or disguise one, from anywhere a client reaches (a URL path,
# a header, an exception's message): C0 controls (LF, CR, ESC...), DEL, C1 controls (NEL),
# the Unicode line and paragraph separators, the bidi controls that reorder what a
# terminal shows, and lone surrogates (not text; they cannot even be written as UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# The lines after a record's first (a traceback) start with this: no text, however it is
# made, can start a line that passes for a record of its own.
CONTINUATION = "  | "


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """The text on one line, each unsafe character written as a Python-style escape."""
    return _UNSAFE.sub(_escape, text)


def escape_block(text: str) -> str:
    """Multi-line text of ours (a traceback): its lines kept, each escaped, and every one
    after the first marked as a continuation, so that an exception message with line
    breaks in it cannot start what looks like a record."""
    return f"\n{CONTINUATION}".join(escape_controls(line) for line in text.rstrip("\n").split("\n"))


def _details(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The record's traceback and stack, as logging.Formatter.format would add them."""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)  # cached raw, as logging does
    parts = [record.exc_text] if record.exc_text else []
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)


class TextFormatter(logging.Formatter):
    """logging.Formatter, with every field escaped: one record, one line (plus a marked
    continuation line per traceback line)."""

    _second: int | None = None
    _second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As logging's ("2026-12-06 18:27:44,988"), with the date and time formatted once a
        second rather than once a line."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = escape_controls(self.formatMessage(record))
        details = _details(self, record)
        return f"{line}\n{CONTINUATION}{escape_block(details)}" if details else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; its values escaped the same way as the text format's, so
    a log viewer that prints a message or a traceback cannot be fooled either."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": escape_controls(record.name),
            "message": escape_controls(record.getMessage()),
            "request_id": escape_controls(str(getattr(record, "request_id", "-"))),
        }
        if details := _details(self, record):
            line["exception"] = escape_block(details)
        return json.dumps(line, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def log_handler(json_lines: bool, stream: TextIO | None = None) -> logging.Handler:
    """The handler configure_logging installs (tests build theirs the same way)."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, json_lines: bool) -> None:
    """Once, in __main__: text lines (the default) or one JSON object per line."""
    # Fields no line shows, not gathered per record (the logging HOWTO's "Optimization"):
    # a few lines per answer otherwise cost thread and process lookups each.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the caller's file and line, found by walking the stack: never shown
    logging.basicConfig(level=level.upper(), handlers=[log_handler(json_lines)])
