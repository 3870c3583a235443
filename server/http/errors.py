"""Errors with a stable machine-readable code and a human message, and the middleware
that turns every failure into a JSON body (never a stack trace)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from server.http.responses import json_response

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request we refuse: HTTP status, stable code, message a person can act on."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error_body(code, message), status=status, headers=headers)


# aiohttp's own HTTP exceptions (no route, wrong method, body too large) get our codes.
_HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This address does not accept that HTTP method."),
    413: ("body_too_large", "The request body is larger than the server accepts."),
}

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.empty_body:
            raise
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        log.info("%s %s -> %d %s", request.method, request.path, exc.status, code)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error_response(exc.status, code, message, headers)
    except ConnectionError:
        # The client left before its answer (a reload, a closed tab): routine, not a fault.
        log.debug("%s %s: client disconnected", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except Exception:
        # Stays in the server log; the client gets a stable code and no internals.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "Something went wrong inside Rill.")
