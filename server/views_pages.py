"""The HTML page and its static files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from . import __version__
from .errors import ApiError
from .keys import CATALOG

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    return {"demo": request.app[CATALOG].demo, "version": __version__}


async def static_file(request: web.Request) -> web.FileResponse:
    # Our own lookup rather than add_static: a missing file must be a JSON 404 through the
    # error middleware, and aiohttp's static route only finds out after it has started.
    path = (STATIC_DIR / request.match_info["path"]).resolve()
    if not path.is_relative_to(STATIC_DIR) or not path.is_file():
        raise ApiError(404, "not_found", "There is nothing at this address.")
    # no-cache: revalidate (ETag) every time, so an upgrade never mixes old and new modules.
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
