"""Who may use this Rill: access tokens (session cookie or Bearer), Origin checks
against cross-site requests, CORS for configured origins, and the Host check that
keeps an open (token-less) Rill out of reach of DNS rebinding."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from .clients import client_address, is_trusted_proxy
from .config import is_loopback_host
from .errors import ApiError, Handler
from .gate import Session
from .keys import CONFIG, GATE, METRICS

log = logging.getLogger(__name__)

PRINCIPAL = web.RequestKey("principal", str)  # the access token's name, once authenticated
_RENEWED = web.RequestKey("renewed_session", Session)

SESSION_COOKIE = "rill_session"
# The page and its files carry nothing secret; the page asks for the token itself.
_PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/api/session"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="rill"'}
_CORS_EXPOSED = "Retry-After, X-Request-ID"
_CORS_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID, X-Request-ID",
    "Access-Control-Max-Age": "600",
}


def client_key(request: web.Request) -> str:
    """Whom per-client limits count against: the access token, else the address."""
    principal = request.get(PRINCIPAL)
    if principal is not None:
        return f"token:{principal}"
    return client_address(request, request.app[CONFIG].limits.trusted_proxies)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    gate = request.app[GATE]
    if not gate.required:
        _check_host(request)
    origin = request.headers.get("Origin")
    if request.method == "OPTIONS" and origin is not None and _cors_allowed(request, origin):
        return web.Response(status=204, headers=_CORS_PREFLIGHT)
    if request.method not in _SAFE_METHODS:
        _check_origin(request, origin)
    if gate.required and not _is_public(request.path):
        request[PRINCIPAL] = authenticate(request)
    response = await handler(request)
    renewed = request.get(_RENEWED)
    if renewed is not None and not response.prepared:
        set_session_cookie(request, response, renewed)
    return response


def _is_public(path: str) -> bool:
    return path in _PUBLIC_PATHS or path.startswith("/static/")


def authenticate(request: web.Request) -> str:
    """The access token's name from `Authorization: Bearer` or the session cookie."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return check_access_token(request, credentials.strip())
    # Other schemes (a proxy's Basic auth) are not ours: fall through to the cookie.
    session = current_session(request)
    if session is None:
        raise ApiError(
            401,
            "auth_required",
            "Sign in with an access token first: the page asks for one, API clients send "
            "Authorization: Bearer <token>.",
            headers=_CHALLENGE,
        )
    gate = request.app[GATE]
    if gate.needs_renewal(session, time.time()):
        request[_RENEWED] = gate.issue(session.name, time.time())
    return session.name


def current_session(request: web.Request) -> Session | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    return request.app[GATE].verify(cookie, time.time()) if cookie else None


def check_access_token(request: web.Request, given: str) -> str:
    """The name of the token, after the per-client limit on wrong guesses."""
    app = request.app
    gate, metrics = app[GATE], app[METRICS]
    client = client_address(request, app[CONFIG].limits.trusted_proxies)
    now = asyncio.get_running_loop().time()
    wait = gate.failures.wait(client, now)
    if wait:
        metrics.token_checks.labels(outcome="limited").inc()
        raise ApiError(
            429,
            "too_many_attempts",
            f"Too many wrong access tokens from your address. Try again in {wait} s.",
            headers={"Retry-After": str(wait)},
        )
    name = gate.check_token(given)
    if name is None:
        gate.failures.add(client, now)
        metrics.token_checks.labels(outcome="bad_token").inc()
        log.warning("wrong access token from %s", client)
        raise ApiError(401, "bad_token", "That access token is not valid.", headers=_CHALLENGE)
    metrics.token_checks.labels(outcome="ok").inc()
    return name


def set_session_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    gate = request.app[GATE]
    response.set_cookie(
        SESSION_COOKIE,
        gate.cookie_value(session),
        max_age=gate.session_seconds,
        path="/",
        httponly=True,  # page scripts (and so any injected one) cannot read it
        samesite="Strict",  # never sent with a request another site starts
        secure=is_https(request),
    )


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path="/", secure=is_https(request), httponly=True, samesite="Strict")


def is_https(request: web.Request) -> bool:
    """Whether the browser used https: directly, or as its trusted proxy says."""
    if request.secure:
        return True
    proxies = request.app[CONFIG].limits.trusted_proxies
    if request.remote is None or not is_trusted_proxy(request.remote, proxies):
        return False
    return request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower() == "https"


def own_origin(request: web.Request) -> str:
    """This server's origin as the browser sees it (what its Origin header should say)."""
    scheme = "https" if is_https(request) else "http"
    return normalise_origin(f"{scheme}://{request.headers.get('Host', '')}")


def normalise_origin(origin: str) -> str:
    origin = origin.strip().rstrip("/").lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin.removesuffix(port)
    return origin


def _cors_allowed(request: web.Request, origin: str) -> bool:
    return normalise_origin(origin) in request.app[CONFIG].access.cors_origins


def _check_origin(request: web.Request, origin: str | None) -> None:
    """Refuses requests another web page made the browser send (CSRF)."""
    if origin is None:
        # Browsers send Origin with every POST and DELETE; without one this is curl or
        # a script, which cookies do not authenticate anyway. Sec-Fetch-Site still tells.
        if request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none"):
            return
        raise ApiError(403, "cross_site_request", "Requests started by another web site are not accepted.")
    if normalise_origin(origin) == own_origin(request) or _cors_allowed(request, origin):
        return
    shown = origin[:200]
    log.warning("%s %s refused: Origin %s is not %s", request.method, request.path, shown, own_origin(request))
    raise ApiError(
        403,
        "origin_not_allowed",
        f"Requests from {shown} are not accepted here (this server is {own_origin(request)}). "
        "Behind a proxy, list it in [limits] trusted_proxies and have it send Host and X-Forwarded-Proto; "
        "other sites can be allowed in [access] cors_origins.",
    )


def _check_host(request: web.Request) -> None:
    """Without tokens, answer only to loopback names: a web page whose DNS name was
    rebound to 127.0.0.1 could otherwise use this Rill from the visitor's browser."""
    host = request.headers.get("Host")
    if host is None:
        return
    name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    name = name.lower()
    if is_loopback_host(name) or name in request.app[CONFIG].access.allowed_hosts:
        return
    raise ApiError(
        403,
        "host_not_allowed",
        f"This Rill has no access tokens, so it only answers to localhost, not to {name[:100]!r}. "
        "Set access tokens, or add the name to [access] allowed_hosts.",
    )


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin")
    if origin is not None and _cors_allowed(request, origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED
        response.headers.add("Vary", "Origin")
