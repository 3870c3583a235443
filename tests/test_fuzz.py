"""Property-based fuzzing of every endpoint: arbitrary JSON and bytes, odd content types
and encodings, odd paths, query strings and header values, against an open Rill and one
with access tokens (both with the compat GET /stream on). Whatever arrives, the answer
is never a 5xx, every error is the one JSON error shape with a documented code, nothing
is logged at ERROR or with a traceback, and the server serves normally afterwards.

Hypothesis runs examples as plain synchronous calls, so each test's Rill (and its fake
upstream and client session) lives on an event loop of its own in a thread, and every
example of the test reuses it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import threading
import traceback
import zlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from server.app import create_app

from .conftest import make_config, serve
from .fakes import FakeUpstream, StreamReader, terminal, text_of

ROOT = Path(__file__).resolve().parent.parent
ALICE = "alice-0123456789abcdefghij"
TOKENS = {"RILL_ACCESS_TOKENS": f"alice:{ALICE}"}
JSON = "application/json"
T = TypeVar("T")

# Limits high enough that the fuzz reaches the handlers rather than the rate limits
# (which have tests of their own); a 429 would still be a fine answer.
SECTIONS: dict[str, Any] = {
    "compat": {"get_stream": True},
    "limits": {
        "generations_per_minute": 1_000_000,
        "max_streams_per_client": 1_000_000,
        "max_concurrent_per_client": 1_000_000,
        "max_concurrent_total": 1_000_000,
        "max_message_chars": 200,
        "max_total_chars": 400,
    },
    "stream": {"resume_grace": 0.5, "finished_ttl": 5.0},
}
TOKEN_SECTIONS: dict[str, Any] = {"access": {"failed_sign_ins_per_minute": 1_000_000, "daily_token_budget": 10**9}}


def documented_codes() -> frozenset[str]:
    """Every error code README.md's "Event reference" lists: an undocumented one fails."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Event reference", 1)[1].split("\n## ", 1)[0]
    return frozenset(re.findall(r"`([a-z][a-z_]+)`", section))


CODES = documented_codes()


class Records(logging.Handler):
    """Every log record from every thread, for the no-ERROR/no-traceback check."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def bad(self) -> list[str]:
        return [
            f"{r.levelname} {r.name}: {r.getMessage()[:200]} {_exception(r)}"
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info is not None or r.stack_info
        ]


def _exception(record: logging.LogRecord) -> str:
    if not record.exc_info:
        return ""
    return "".join(traceback.format_exception(*record.exc_info)[-6:])


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Served:
    """A Rill in front of a fake upstream, on its own loop in a thread."""

    tokens: bool
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    url: URL = field(default_factory=URL)
    generation_ids: list[str] = field(default_factory=list)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop.run_forever, name="rill-fuzz", daemon=True)
        self._thread.start()
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.fake = FakeUpstream()
        self._fake_runner = web.AppRunner(self.fake.app, access_log=None)
        await self._fake_runner.setup()
        site = web.TCPSite(self._fake_runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._fake_runner.addresses[0][:2]
        self.fake.url = f"http://{host}:{port}/v1"
        sections = SECTIONS | (TOKEN_SECTIONS if self.tokens else {})
        config = make_config(self.fake.url, environ=TOKENS if self.tokens else None, **sections)
        self.app = create_app(config)
        self._runner, self.url = await serve(self.app, config)
        self.session = aiohttp.ClientSession()
        for _ in range(2):  # real ids, for the id-taking routes to find
            status, body = await self._chat()
            assert status == 201, body
            self.generation_ids.append(body["id"])

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ALICE}"} if self.tokens else {}

    async def _chat(self) -> tuple[int, Any]:
        body = {"messages": [{"role": "user", "content": "Hi"}]}
        async with self.session.post(self.url / "api/chat", json=body, headers=self.auth()) as response:
            return response.status, await response.json()

    async def request(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None, skip: frozenset[str]
    ) -> Answer:
        url = URL(str(self.url) + target, encoded=True)
        async with (
            asyncio.timeout(20),
            self.session.request(
                method, url, headers=headers, data=body, skip_auto_headers=skip, allow_redirects=False
            ) as response,
        ):
            return Answer(response.status, CIMultiDict(response.headers), await response.read())

    async def still_serves(self) -> None:
        """A whole answer, start to end, and the health check."""
        status, body = await self._chat()
        assert status == 201, body
        async with self.session.get(self.url / f"api/chat/{body['id']}/events", headers=self.auth()) as response:
            assert response.status == 200
            events = await StreamReader(response).read_all()
        assert text_of(events) == "Hello world"
        assert terminal(events).data == {"finish_reason": "stop"}
        async with self.session.get(self.url / "healthz") as response:
            assert response.status == 200

    async def _stop(self) -> None:
        await self.session.close()
        await self._runner.cleanup()
        await self._fake_runner.cleanup()

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def records() -> Iterator[Records]:
    """Collects records at INFO and above from Rill and aiohttp, in every thread."""
    handler = Records()
    root = logging.getLogger()
    loggers = [logging.getLogger("server"), logging.getLogger("aiohttp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@pytest.fixture(params=["open", "tokens"])
def served(request: pytest.FixtureRequest, records: Records) -> Iterator[Served]:
    """One Rill for all the examples of a test; after the last, it must still serve."""
    served = Served(tokens=request.param == "tokens")
    served.start()
    try:
        yield served
        finish(served, records)
    finally:
        served.stop()


def check(answer: Answer, method: str) -> None:
    assert answer.status < 500, (answer.status, answer.body[:300])
    if answer.status < 400 or method == "HEAD":
        return
    assert answer.headers.get("Content-Type", "").startswith(JSON), (answer.status, answer.headers, answer.body[:300])
    body = json.loads(answer.body)
    assert isinstance(body, dict)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict)
    assert isinstance(error.get("message"), str)
    assert error["message"].strip()
    assert error.get("code") in CODES, f"undocumented error code {error.get('code')!r}"
    assert b"Traceback" not in answer.body


def exchange(
    served: Served,
    records: Records,
    method: str,
    target: str,
    headers: dict[str, str] | CIMultiDict[str],
    body: bytes | None = None,
    skip: frozenset[str] = frozenset(),
) -> Answer:
    before = len(records.records)
    answer = served.run(served.request(method, target, CIMultiDict(headers), body, skip))
    check(answer, method)
    assert records.bad() == []
    if answer.status >= 400:  # every refusal is logged, at INFO or WARNING, by Rill itself
        logged = records.records[before:]
        assert any(r.name.startswith("server.") and r.levelno in (logging.INFO, logging.WARNING) for r in logged)
    return answer


def finish(served: Served, records: Records) -> None:
    served.run(served.still_serves())
    served.run(asyncio.sleep(0.2))  # room for a late log record (a connection's epilogue)
    assert records.bad() == []


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

# ---------------------------------------------------------------- strategies

# Characters that break naive code: controls, line separators, bidi overrides, BOM,
# lone surrogates (valid JSON escapes, not text), astral and combining characters.
ODD = "\x00\x01\x1b\x7f\x85\n\r\t \u2028\u2029\u202e\u2066\ufeff\ud800\udc00\udfff\U0001f600e\u0301é世"
odd_text = st.text(st.sampled_from(ODD), max_size=12)
text = st.text(max_size=30) | odd_text
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities included: json.dumps writes NaN/Infinity literals
    | text
)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4), max_leaves=12
)
roles = st.sampled_from(["user", "system", "assistant", "tool", "User"]) | json_values
message = st.fixed_dictionaries(
    {}, optional={"role": roles, "content": st.sampled_from(["Hi", ""]) | text | json_values, "name": json_values}
)
options = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(min_value=-1, max_value=3) | json_values,
        "max_tokens": st.integers(min_value=-5, max_value=10**6) | json_values,
        "top_p": json_values,
    },
)
chat_body = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3) | json_values},
    optional={
        "model": st.sampled_from(["fake-chat", "fake-reasoner", "fake-model", ""]) | json_values,
        "client_id": st.uuids().map(str) | json_values,
        "options": options | json_values,
        "stream": json_values,
    },
)
session_body = st.fixed_dictionaries({}, optional={"token": st.sampled_from([ALICE, "", " "]) | text, "x": scalars})


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


# JSON text json.dumps would not write: numbers past float range, NaN, duplicate keys,
# invalid UTF-8 inside strings, escaped lone surrogates, a BOM, huge integers, nesting.
RAW_BODIES = [
    b'{"messages": [{"role": "user", "content": "Hi"}], "options": {"temperature": 1e999}}',
    b'{"messages": [{"role": "user", "content": "Hi"}], "options": {"max_tokens": 1e999}}',
    b'{"messages": [{"role": "user", "content": "Hi"}], "options": {"temperature": -Infinity}}',
    b'{"messages": [{"role": "user", "content": "Hi"}], "options": {"temperature": NaN}}',
    b'{"messages": [{"role": "user", "content": "Hi"}], "messages": [{"role": "user", "content": "Hi"}]}',
    b'{"messages": [{"role": "user", "role": "assistant", "content": "Hi"}]}',
    b'{"messages": [{"role": "user", "content": "Hi \xff\xfe there"}]}',
    b'{"messages": [{"role": "user", "content": "Hi \\udc00\\ud800"}]}',
    b'{"messages": [{"role": "\\ud800", "content": "Hi"}]}',
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "Hi"}]}',
    b'{"\\ud800": 1, "messages": [{"role": "user", "content": "Hi"}]}',
    b'{"token": "\\ud800"}',
    b"\xef\xbb\xbf" + encode({"messages": [{"role": "user", "content": "Hi"}]}),
    encode({"messages": [{"role": "user", "content": "Hi"}], "options": {"max_tokens": 10**4000}}),
    b'{"messages": [{"role": "user", "content": "Hi"}], "options": {"max_tokens": 1' + b"0" * 5000 + b"}}",
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"messages": ' + b"[" * 900 + b"]" * 900 + b"}",
    b'{"messages": [{"role": ' + b"[" * 900 + b"]" * 900 + b', "content": "Hi"}]}',
    b'{"messages": [{"role": {"a": ' * 300 + b"1" + b"}" * 600 + b"]}",
]


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid body with a few bytes inserted, replaced or cut."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "replace", "cut"]))
        byte = draw(st.integers(0, 255))
        if action == "insert" or at == len(data):
            data.insert(at, byte)
        elif action == "replace":
            data[at] = byte
        else:
            del data[at:]
    return bytes(data)


def bodies(shape: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        shape.map(encode),
        json_values.map(encode),
        st.sampled_from(RAW_BODIES),
        mutated(shape.map(encode)),
        st.binary(max_size=200),
    )


CONTENT_TYPES = [
    JSON,
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/json; charset=utf-16",
    "application/json;;;",
    "application/jsonx",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "",
    "*/*",
]
content_types = st.none() | st.sampled_from(CONTENT_TYPES)


@dataclass(frozen=True)
class Coding:
    header: str
    encode: Callable[[bytes], bytes]


def _deflate_raw(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


CODINGS = [
    Coding("gzip", gzip.compress),
    Coding("gzip", lambda data: data),  # says gzip, is not
    Coding("gzip", lambda data: gzip.compress(data)[:-6]),  # cut short
    Coding("gzip", lambda data: gzip.compress(data) + b"trailing"),
    Coding("x-gzip", gzip.compress),
    Coding("GZIP", gzip.compress),
    Coding("deflate", zlib.compress),
    Coding("deflate", _deflate_raw),
    Coding("deflate", lambda data: data),
    Coding("br", lambda data: data),
    Coding("zstd", lambda data: data),
    Coding("identity", lambda data: data),
    Coding("gzip, gzip", lambda data: gzip.compress(gzip.compress(data))),
    Coding("compress", lambda data: data),
    Coding("gzip", lambda data: gzip.compress(b" " * 3_000_000)),  # a bomb: 3 MB from 3 KB
]
codings = st.none() | st.sampled_from(CODINGS)

# Header values the HTTP parser accepts (no CR, LF or NUL; the parser's own refusals
# are another test's business): long, empty, non-ASCII, separators, bidi overrides.
header_text = st.text(
    st.characters(exclude_categories=["Cs", "Cc"]) | st.sampled_from("\t ,;=\"'\\\u2028\u202e"), max_size=60
)
header_values = (
    header_text
    | st.sampled_from(["", " ", "-1", "0", "1e3", "٣", "0x10", "99999999999999999999", "null", "*"])
    | st.integers(min_value=-(10**20), max_value=10**20).map(str)
    | st.builds(lambda n: "a" * n, st.integers(1000, 7000))
)
HEADER_NAMES = [
    "If-Match",
    "Authorization",
    "Cookie",
    "Origin",
    "Sec-Fetch-Site",
    "Last-Event-ID",
    "X-Request-ID",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "Forwarded",
    "Accept",
    "Accept-Encoding",
    "Range",
    "If-Range",
    "If-None-Match",
    "If-Modified-Since",
    "If-Unmodified-Since",
    "User-Agent",
    "Referer",
    "Content-Type",
    "Access-Control-Request-Method",
]
odd_headers = st.lists(
    st.tuples(st.sampled_from(HEADER_NAMES), header_values)
    | st.tuples(st.just("Authorization"), st.builds(lambda v: f"Bearer {v}", header_values))
    | st.tuples(st.just("Cookie"), st.builds(lambda v: f"rill_session={v}", header_values)),
    max_size=4,
)

# Paths: route templates with percent-encoded bytes of any value, long segments, dots.
ROUTES = [
    "/",
    "/api/chat",
    "/api/chat/{id}/events",
    "/api/chat/{id}",
    "/api/models",
    "/api/session",
    "/healthz",
    "/readyz",
    "/metrics",
    "/stream",
    "/static/{file}",
    "/{file}",
]
STATIC_FILES = [
    "app.css",
    "icon.svg",
    "js/app.js",
    "js",
    "vendor",
    "../templates/index.html",
    "..%2f..%2fREADME.md",
    "%2e%2e/x",
]


def _percent(data: bytes) -> str:
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in data)


segments = (
    st.binary(max_size=20).map(_percent)
    | st.sampled_from(["%00", "a%00b", "%0A", "%ED%A0%80", "%FF", "%C0%AE", "..", ".", "", "%2F", "%25"])
    | st.builds(lambda n: "x" * n, st.integers(250, 1000))
)


@st.composite
def paths(draw: st.DrawFn, served_ids: list[str]) -> str:
    route = draw(st.sampled_from(ROUTES))
    if "{id}" in route:
        route = route.replace("{id}", draw(st.sampled_from(served_ids) | segments))
    if "{file}" in route:
        route = route.replace("{file}", draw(st.sampled_from(STATIC_FILES) | segments))
    extra: list[str] = draw(st.lists(segments, max_size=2))
    return route + "".join(f"/{s}" for s in extra)


query_parts = st.tuples(
    st.sampled_from(["prompt", "last_event_id", "x", "", "prompt[]"]) | segments,
    st.sampled_from(["Hi", "", "1", "-1", "99999999999999", "%ED%A0%80", "%00", "%0A"]) | segments,
)
queries = st.lists(query_parts, max_size=3).map(lambda parts: "&".join(f"{k}={v}" for k, v in parts))
# Methods the HTTP parser knows: it refuses the others itself (another test's business).
METHODS = ["GET", "GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH", "PROPFIND"]

# ---------------------------------------------------------------- the tests


@dataclass(frozen=True)
class BodyCase:
    target: str
    body: bytes
    content_type: str | None = JSON
    coding: Coding | None = None
    method: str = "POST"


def send_body(served: Served, records: Records, case: BodyCase, auth: bool = True) -> Answer:
    headers: dict[str, str] = served.auth() if auth else {}
    skip: frozenset[str] = frozenset()
    body = case.body
    if case.content_type is None:
        skip = frozenset({"Content-Type"})
    else:
        headers["Content-Type"] = case.content_type
    if case.coding is not None:
        headers["Content-Encoding"] = case.coding.header
        body = case.coding.encode(body)
    return exchange(served, records, case.method, case.target, headers, body, skip)


def chat_cases() -> st.SearchStrategy[BodyCase]:
    return st.builds(
        BodyCase,
        target=st.sampled_from(["/api/chat", "/api/chat", "/api/session"]),
        body=bodies(chat_body) | bodies(session_body),
        content_type=content_types,
        coding=codings,
        method=st.sampled_from(["POST", "POST", "POST", "DELETE", "PUT"]),
    )


NOT_GZIP = CODINGS[1]
HI = encode({"messages": [{"role": "user", "content": "Hi"}]})
# What outside testing found, with the answer each must get (None: any 2xx).
KNOWN: list[tuple[BodyCase, int, str | None]] = [
    (BodyCase("/api/chat", encode({"messages": [{"role": ["user"], "content": "Hi"}]})), 400, "invalid_role"),
    (BodyCase("/api/chat", encode({"messages": [{"role": {"a": 1}, "content": "Hi"}]})), 400, "invalid_role"),
    (BodyCase("/api/chat", b"[" * 100_000), 400, "bad_json"),
    (BodyCase("/api/session", b"[" * 100_000), 400, "bad_json"),
    (BodyCase("/api/chat", HI, coding=NOT_GZIP), 400, "bad_encoding"),
    (BodyCase("/api/session", encode({"token": ALICE}), coding=NOT_GZIP), 400, "bad_encoding"),
    (BodyCase("/api/session", b"not gzip", coding=NOT_GZIP, method="DELETE"), 200, None),
    (BodyCase("/api/chat", HI, coding=CODINGS[0]), 201, None),  # real gzip still works
    (BodyCase("/api/chat", HI, coding=CODINGS[7]), 201, None),  # and raw deflate
    (BodyCase("/api/chat", HI, coding=CODINGS[-1]), 413, "body_too_large"),  # a gzip bomb
]


@FUZZ
@given(case=chat_cases(), auth=st.booleans())
@example(case=KNOWN[0][0], auth=True)
@example(case=KNOWN[1][0], auth=True)
@example(case=KNOWN[2][0], auth=True)
@example(case=KNOWN[3][0], auth=True)
@example(case=KNOWN[4][0], auth=True)
@example(case=KNOWN[5][0], auth=True)
@example(case=KNOWN[6][0], auth=True)
def test_any_body_is_answered_cleanly(served: Served, records: Records, case: BodyCase, auth: bool) -> None:
    send_body(served, records, case, auth)


def test_known_bad_bodies_get_their_codes(served: Served, records: Records) -> None:
    """The stable codes for what outside testing found (the fuzz only checks the shape)."""
    for case, status, code in KNOWN:
        if case.target == "/api/session" and case.method == "POST" and not served.tokens:
            continue  # an open Rill has nothing to sign in to (404 access_not_configured)
        answer = send_body(served, records, case)
        got = json.loads(answer.body)["error"]["code"] if answer.status >= 400 else None
        assert (answer.status, got) == (status, code), case


@FUZZ
@given(data=st.data())
@example(data=None)
def test_any_path_query_and_method_is_answered_cleanly(served: Served, records: Records, data: Any) -> None:
    if data is None:  # the known ones first
        for target in ["/static/a%00b", "/static/" + "x" * 300, "/static/%00", "/" + "y" * 300]:
            exchange(served, records, "GET", target, served.auth())
        return
    path = data.draw(paths(served.generation_ids), label="path")
    query = data.draw(queries, label="query")
    method = data.draw(st.sampled_from(METHODS), label="method")
    headers = served.auth() if data.draw(st.booleans(), label="auth") else {}
    body = data.draw(st.none() | bodies(chat_body), label="body") if method in ("POST", "PUT", "PATCH") else None
    if body is not None:
        headers["Content-Type"] = JSON
    exchange(served, records, method, path + (f"?{query}" if query else ""), headers, body)


# Each endpoint with its own method and a body it would accept: the odd headers are then
# the only thing wrong. {id} is a real generation's.
ENDPOINTS = [
    ("GET", "/"),
    ("POST", "/api/chat"),
    ("GET", "/api/chat/{id}/events"),
    ("DELETE", "/api/chat/{id}"),
    ("GET", "/api/models"),
    ("GET", "/api/session"),
    ("POST", "/api/session"),
    ("DELETE", "/api/session"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/stream?prompt=Hi"),
    ("GET", "/static/app.css"),
    ("HEAD", "/static/js/app.js"),
    ("OPTIONS", "/api/chat"),
]
BODIES = {"/api/chat": HI, "/api/session": encode({"token": ALICE})}


@settings(FUZZ, max_examples=60)
@given(headers=odd_headers, auth=st.booleans())
@example(headers=[("Range", "bytes=999999-")], auth=True)
@example(headers=[("Range", "bytes=0-1,3-4")], auth=True)
@example(headers=[("If-Match", "nope")], auth=True)
@example(headers=[("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")], auth=True)
@example(headers=[("Last-Event-ID", "٣")], auth=True)
@example(headers=[("Last-Event-ID", "99999999999999999999")], auth=True)
def test_any_header_value_is_answered_cleanly(
    served: Served, records: Records, headers: list[tuple[str, str]], auth: bool
) -> None:
    """The same odd headers at every endpoint."""
    for method, target in ENDPOINTS:
        sent = CIMultiDict(served.auth() if auth else {})
        body = BODIES.get(target) if method == "POST" else None
        if body is not None:
            sent["Content-Type"] = JSON
        for name, value in headers:
            sent[name] = value  # replaced, never repeated: the parser refuses a second User-Agent itself
        exchange(served, records, method, target.replace("{id}", served.generation_ids[0]), sent, body)


# ---------------------------------------------------------------- raw requests
# What no HTTP client library will send: any method token, header lines with bare CR,
# NUL, non-ASCII bytes, no colon, repeated singleton headers, overlong lines, and bodies
# whose framing lies. aiohttp's parser refuses most of it (Rill answers those as JSON
# bad_request, see httpserver.py); whatever gets through must be handled as above.

raw_bytes = st.binary(max_size=40)
token_chars = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&'*+-.^_`|~0123456789"))
raw_methods = st.sampled_from([b"GET", b"POST", b"DELETE", b"HEAD", b"OPTIONS", b"BREW", b"G\x00T", b""]) | (
    token_chars.map(str.encode)
)
raw_targets = st.sampled_from(
    [b"/", b"/api/chat", b"/api/session", b"/stream?prompt=Hi", b"/static/app.css", b"*", b"http://x/", b""]
) | raw_bytes.map(lambda b: b"/" + b)
raw_header_lines = st.lists(
    st.sampled_from(
        [
            b"Host: localhost",
            b"Host: localhost\r",  # the CRLF-file token: a bare CR inside the line
            b"Content-Length: 5",
            b"Content-Length: -1",
            b"Content-Length: 99999999999999999999",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: gzip, chunked",
            b"Content-Type: application/json",
            b"User-Agent: a",
            b"Authorization: Bearer " + ALICE.encode() + b"\r",
            b"Cookie: rill_session=v1.alice.1.x.y",
            b"Last-Event-ID: \xff\xfe",
            b"X-Request-ID: \x00",
            b"no colon here",
            b" folded: continuation",
            b"X-Long: " + b"a" * 9000,
        ]
    )
    | raw_bytes.map(lambda b: b"X-Fuzz: " + b),
    max_size=6,
)
raw_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b""])


async def _send_raw(served: Served, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(served.url.host, served.url.port)
    try:
        writer.write(request)
        await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(3):
                return await reader.read(65536)  # the first answer is all this checks
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def check_raw(reply: bytes, method: bytes) -> None:
    """No answer at all (the connection held or closed) is fine; an answer is checked."""
    if not reply:
        return
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    assert parts[0].startswith("HTTP/"), status_line  # aiohttp answers in the request's version
    status = int(parts[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(": ")
        headers.add(name, value)
    if headers.get("Transfer-Encoding") == "chunked" or status < 400 or method == b"HEAD":
        check(Answer(status, headers, b""), "HEAD")  # the status is what matters here
        return
    check(Answer(status, headers, body[: int(headers.get("Content-Length", len(body)))]), "GET")


@settings(FUZZ, max_examples=200)
@given(method=raw_methods, target=raw_targets, version=raw_versions, lines=raw_header_lines, body=raw_bytes)
@example(method=b"GET", target=b"/", version=b"HTTP/1.1", lines=[b"Host: localhost\r"], body=b"")
@example(method=b"BREW", target=b"/", version=b"HTTP/1.1", lines=[b"Host: localhost"], body=b"")
@example(method=b"GET", target=b"/", version=b"HTTP/1.1", lines=[b"User-Agent: a", b"User-Agent: a"], body=b"")
def test_any_raw_request_is_answered_cleanly(
    served: Served, records: Records, method: bytes, target: bytes, version: bytes, lines: list[bytes], body: bytes
) -> None:
    request = b" ".join(part for part in (method, target, version) if part) + b"\r\n"
    request += b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body
    reply = served.run(_send_raw(served, request))
    check_raw(reply, method)
    assert ALICE.encode() not in reply
    assert records.bad() == []
    assert not any(ALICE in r.getMessage() for r in records.records)
