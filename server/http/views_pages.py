"""The HTML page and its static files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from server import __version__
from server.http.errors import ApiError
from server.keys import CATALOG

STATIC_DIR = Path(__file__).resolve().parents[2] / "web" / "static"


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    return {"demo": request.app[CATALOG].demo, "version": __version__}


async def static_file(request: web.Request) -> web.StreamResponse:
    # Our own lookup rather than add_static: a missing file must be a JSON 404 through the
    # error middleware, and aiohttp's static route only finds out after it has started.
    try:
        path = (STATIC_DIR / request.match_info["path"]).resolve()
        found = path.is_relative_to(STATIC_DIR) and path.is_file()
    except (ValueError, OSError):  # a NUL byte (ValueError), a name too long for the file system
        found = False
    if not found:
        raise ApiError(404, "not_found", "There is nothing at this address.")
    # no-cache: revalidate (ETag) every time, so an upgrade never mixes old and new modules.
    return WholeFile(path, headers={"Cache-Control": "no-cache"})


class WholeFile(web.FileResponse):
    """A FileResponse that ignores Range, If-Range, If-Match and If-Unmodified-Since.

    With them, FileResponse answers a range it cannot serve (416) or a failed
    precondition (412) with an empty body, after the error middleware has had its turn.
    These files are small and no page of ours asks for parts of them, so the headers are
    ignored (RFC 9110 lets a server do so) and the file is sent whole."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        kept = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _IGNORED)
        return await super().prepare(request.clone(headers=kept))


_IGNORED = frozenset({"range", "if-range", "if-match", "if-unmodified-since"})
