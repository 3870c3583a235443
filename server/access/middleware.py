"""Who may use this Rill: access tokens (session cookie or Bearer), Origin checks
against cross-site requests, CORS for configured origins, and the Host check that
keeps an open (token-less) Rill out of reach of DNS rebinding."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from ipaddress import IPv6Address, ip_address, ip_network

from aiohttp import hdrs, web

from server.access.clients import client_address, is_trusted_proxy
from server.access.gate import Session
from server.config import is_loopback_host
from server.http.errors import ApiError, Handler
from server.keys import CLUSTER, CONFIG, GATE, METRICS

log = logging.getLogger(__name__)

PRINCIPAL = web.RequestKey("principal", str)  # the access token's name, once authenticated

SESSION_COOKIE = "rill_session"
# Over https the __Host- prefix: the browser then refuses the cookie from a sibling
# subdomain or over plain http, so nobody can plant a session of their own.
SECURE_SESSION_COOKIE = "__Host-rill_session"
_FORWARDING_HEADERS = ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded")
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?\.?")
# The page and its files carry nothing secret; the page asks for the token itself.
_PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/api/session"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="rill"'}
_CORS_EXPOSED = "Retry-After, X-Request-ID"
_CORS_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE",
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
        request[PRINCIPAL] = await authenticate(request)
    return await handler(request)


def _is_public(path: str) -> bool:
    return path in _PUBLIC_PATHS or path.startswith("/static/")


async def authenticate(request: web.Request) -> str:
    """The access token's name from `Authorization: Bearer` or the session cookie."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return await check_access_token(request, credentials.strip())
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
    return session.name


def current_session(request: web.Request) -> Session | None:
    cookie = request.cookies.get(_cookie_name(request))
    return request.app[GATE].verify(cookie, time.time()) if cookie else None


def _cookie_name(request: web.Request) -> str:
    return SECURE_SESSION_COOKIE if is_https(request) else SESSION_COOKIE


async def check_access_token(request: web.Request, given: str) -> str:
    """The name of the token, after the per-client limit on wrong guesses (over every
    process in shared mode)."""
    app = request.app
    gate, metrics = app[GATE], app[METRICS]
    client = rate_key(client_address(request, app[CONFIG].limits.trusted_proxies))
    cluster = app.get(CLUSTER)
    wait: int | None = None
    if cluster is not None:
        # The token is compared first (in constant time, here); then one atomic script
        # counts a wrong one, or tells whether a right one comes from a locked-out client.
        name = gate.check_token(given)
        wait = await cluster.sign_in_wait(client, failed=name is None)
    if wait is None:  # one process, or Redis unreachable: this process's own count
        now = asyncio.get_running_loop().time()
        wait = gate.failures.wait(client, now)
        name = None if wait else gate.check_token(given)
        if not wait and name is None:
            gate.failures.add(client, now)
    if wait:
        metrics.token_checks.labels(outcome="limited").inc()
        raise ApiError(
            429,
            "too_many_attempts",
            f"Too many wrong access tokens from your address. Try again in {wait} s.",
            headers={"Retry-After": str(wait)},
        )
    if name is None:
        metrics.token_checks.labels(outcome="bad_token").inc()
        log.warning("wrong access token from %s", client)
        raise ApiError(401, "bad_token", "That access token is not valid.", headers=_CHALLENGE)
    metrics.token_checks.labels(outcome="ok").inc()
    return name


def set_session_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    gate = request.app[GATE]
    response.set_cookie(
        _cookie_name(request),
        gate.cookie_value(session),
        max_age=max(0, session.expires - int(time.time())),
        path="/",
        httponly=True,  # page scripts (and so any injected one) cannot read it
        samesite="Strict",  # never sent with a request another site starts
        secure=is_https(request),
    )


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(_cookie_name(request), path="/", secure=is_https(request), httponly=True, samesite="Strict")


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
    """Without tokens, answer only to this machine: a web page whose DNS name was
    rebound to 127.0.0.1 could otherwise use this Rill from the visitor's browser, and
    a proxy in front would pass the whole internet through (with any Host it likes)."""
    allowed = request.app[CONFIG].access.allowed_hosts
    name = host_name(request.headers.get("Host", ""))
    if name is not None and name in allowed:
        return
    proxied = any(header in request.headers for header in _FORWARDING_HEADERS)
    if name is not None and is_loopback_host(name) and not proxied:
        return
    if proxied:
        message = (
            "This Rill has no access tokens, so it does not serve requests that came through a proxy. "
            "Set access tokens (or, if the proxy guards access itself, list its host name in [access] allowed_hosts)."
        )
    else:
        message = (
            f"This Rill has no access tokens, so it only answers to localhost, not to {str(name)[:100]!r}. "
            "Set access tokens, or add the name to [access] allowed_hosts."
        )
    raise ApiError(403, "host_not_allowed", message)


@functools.lru_cache(maxsize=64)  # the same few Host values on every request
def host_name(host: str) -> str | None:
    """The name in a Host header without its port, lowercased; None if it is malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return host[1:end] if _is_ip(host[1:end]) else None
    name, _, port = host.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return None
    return name.rstrip(".") if _HOST_NAME.fullmatch(name) else None


def _is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def rate_key(address: str) -> str:
    """Whom wrong guesses count against: an IPv6 client gets a whole /64 (its own
    network), or it could guess from 2^64 addresses, one limit each."""
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped is None:
        return str(ip_network(f"{parsed}/64", strict=False))
    return address


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not request.app[CONFIG].access.cors_origins:
        return
    # Every answer depends on Origin, so caches must not hand one origin's to another.
    response.headers.add(hdrs.VARY, "Origin")
    origin = request.headers.get("Origin")
    if origin is not None and _cors_allowed(request, origin):
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _CORS_EXPOSED
