"""An access log that never writes query strings: they can hold prompts (/stream?prompt=)."""

from __future__ import annotations

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from server.ops.logs import REQUEST_ID_KEY


class PathOnlyAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.3fs',
            request.remote or "-",
            request.method,
            request.path,  # path only: never request.path_qs
            response.status,
            response.body_length,
            time,
            extra={"request_id": request.get(REQUEST_ID_KEY, "-")},  # the handler's id, now out of context
        )
