"""Signing in with an access token: the page's session cookie."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from server.access.clients import client_address
from server.access.middleware import check_access_token, clear_session_cookie, current_session, set_session_cookie
from server.http.errors import ApiError
from server.http.responses import json_response
from server.http.validation import invalid, read_json_object
from server.keys import CONFIG, GATE

log = logging.getLogger(__name__)


def _state(required: bool, name: str | None) -> web.Response:
    """The answer of every /api/session method: without tokens everyone counts as signed in."""
    return json_response({"required": required, "signed_in": not required or name is not None, "name": name})


async def session_state(request: web.Request) -> web.Response:
    """Whether this server wants a token, and whether this browser has signed in."""
    required = request.app[GATE].required
    session = current_session(request) if required else None
    return _state(required, session.name if session else None)


async def sign_in(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    if not gate.required:
        raise ApiError(404, "access_not_configured", "This Rill has no access tokens: there is nothing to sign in to.")
    body = await read_json_object(request)
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise invalid("invalid_token_field", 'Send the access token as {"token": "..."}.')
    if set(body) != {"token"}:
        raise invalid("unknown_field", f"Unknown field {sorted(set(body) - {'token'})[0]!r} in the request body.")
    name = await check_access_token(request, token.strip())
    session = gate.issue(name, time.time())
    response = _state(True, name)
    set_session_cookie(request, response, session)
    log.info(
        "signed in with access token %s from %s",
        name,
        client_address(request, request.app[CONFIG].limits.trusted_proxies),
    )
    return response


async def sign_out(request: web.Request) -> web.Response:
    """Ends this browser's session for good: a copy of the cookie stops working too."""
    gate = request.app[GATE]
    required = gate.required
    if required and (session := current_session(request)) is not None:
        gate.revoke(session, time.time())
        log.info("signed out a session of access token %s", session.name)
    response = _state(required, None)
    clear_session_cookie(request, response)
    return response
