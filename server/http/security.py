"""Security headers on every response: the page may only run our own scripts, only
write HTML through DOMPurify (Trusted Types), and never be framed."""

from __future__ import annotations

from aiohttp import hdrs, web

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        # Only DOMPurify's policy may turn strings into HTML: an innerHTML with unsanitised
        # text throws instead of running.
        "require-trusted-types-for 'script'",
        "trusted-types dompurify",
    )
)

# Names as aiohttp's istr constants: a response's headers keep a plain str name with a
# case-folded copy, plus an istr made when they are written (~250 bytes per header
# for as long as the response lives: a whole event stream).
SECURITY_HEADERS = {
    hdrs.CONTENT_SECURITY_POLICY: CONTENT_SECURITY_POLICY,
    hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff",
    hdrs.REFERRER_POLICY: "no-referrer",
    hdrs.X_FRAME_OPTIONS: "DENY",
    hdrs.CROSS_ORIGIN_OPENER_POLICY: "same-origin",
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
