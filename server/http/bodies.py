"""Reading a request body, and undoing its Content-Encoding ourselves.

aiohttp's own decoding is switched off (`auto_decompress=False` in app.runner_options):
it decodes as the bytes arrive, and a body that says gzip but is not fails inside the
connection, where no handler can answer it; aiohttp then logs an ERROR traceback after
the response, even for a handler that never reads the body. Here a bad body is a 400
`bad_encoding`, and the decoded size is held to the same limit as a plain body."""

from __future__ import annotations

import zlib

from aiohttp import hdrs, web

from server.http.errors import ApiError
from server.relay.inflate import ENCODINGS, decompressor


def bad_encoding(message: str) -> ApiError:
    return ApiError(400, "bad_encoding", message)


async def read_body(request: web.Request) -> bytes:
    raw = await request.read()  # aiohttp enforces client_max_size here (413), on the bytes as sent
    return decode_body(raw, ",".join(request.headers.getall(hdrs.CONTENT_ENCODING, ())), request.client_max_size)


def decode_body(raw: bytes, content_encoding: str, limit: int) -> bytes:
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return raw
    if coding not in ENCODINGS:
        shown = ascii(content_encoding[:40])
        raise bad_encoding(f"Content-Encoding {shown} is not supported: send the body as it is, or gzip it.")
    if not raw:
        return raw
    decoder = decompressor(coding, raw)
    try:
        body = decoder.decompress(raw, limit + 1)  # bounded: a small bomb stops at the limit
    except zlib.error:
        raise bad_encoding(f"The request body is not valid {coding} data.") from None
    if len(body) > limit:
        raise ApiError(413, "body_too_large", "The request body is larger than the server accepts.")
    if not decoder.eof or decoder.unused_data:
        raise bad_encoding(f"The request body is not valid {coding} data (cut short or followed by more).")
    return body
