"""JSON responses: UTF-8 bodies written by server.jsoncodec (orjson when installed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from server.jsoncodec import dumps


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(data), status=status, headers=headers, content_type="application/json")
