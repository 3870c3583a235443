"""Logging set-up: a request id on every log line written while a request is handled
(and in its X-Request-ID response header), and optional JSON lines for log shippers."""

from __future__ import annotations

import json
import logging
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

from aiohttp import web
from multidict import istr

from .errors import Handler

REQUEST_ID: ContextVar[str] = ContextVar("rill_request_id", default="-")
REQUEST_ID_KEY = web.RequestKey("request_id", str)
X_REQUEST_ID = istr("X-Request-ID")  # an istr costs a response no copies (see security.py)
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a proxy's id is kept if it looks like one


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _ACCEPTED_ID.fullmatch(incoming) else uuid.uuid4().hex[:16]
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str, json_lines: bool) -> None:
    """Once, in __main__: text lines (the default) or one JSON object per line."""
    # Fields no line shows, not gathered per record (the logging HOWTO's "Optimization"):
    # a few lines per answer otherwise cost thread and process lookups each.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
