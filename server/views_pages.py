"""The HTML page."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from . import __version__
from .keys import CATALOG


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    return {"demo": request.app[CATALOG].demo, "version": __version__}
