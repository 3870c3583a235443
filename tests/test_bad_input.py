"""Bad input to the API: a 4xx JSON error with a stable code, a log line, no stack
trace, no upstream request, no generation, and a server that keeps serving."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from server.http.bodies import decode_body
from server.http.errors import ApiError

from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, answer, chunk, terminal, text_of

# Small limits so every "too much" case fits in a small request.
LIMITS: dict[str, Any] = {
    "max_body_bytes": 2000,
    "max_messages": 4,
    "max_message_chars": 100,
    "max_total_chars": 250,
    "max_tokens": 1000,
}

JSON = "application/json"


def user(content: str = "Hi") -> dict[str, str]:
    return {"role": "user", "content": content}


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def chat(**fields: Any) -> bytes:
    """A valid chat body with some fields added or replaced."""
    return encode({"messages": [user()], **fields})


def options(**values: Any) -> bytes:
    return chat(options=values)


def raw_option(name: str, literal: bytes) -> bytes:
    """An option whose JSON text json.dumps would not write (e.g. 1e999)."""
    return options(**{name: "@@"}).replace(b'"@@"', literal)


@dataclass(frozen=True)
class Bad:
    body: bytes
    status: int
    code: str
    content_type: str | None = JSON  # None: no Content-Type header at all


CASES: dict[str, Bad] = {
    # the body as a whole
    "not_json": Bad(b'{"messages": [', 400, "bad_json"),
    "not_json_text": Bad(b"hello", 400, "bad_json"),
    "empty_body": Bad(b"", 400, "bad_json"),
    "not_utf8": Bad(b'{"messages": "\xff\xfe\xfa"}', 400, "bad_json"),
    "deep_nesting": Bad(b"[" * 1999, 400, "bad_json"),  # past the JSON parser's recursion limit
    "json_array": Bad(b"[1, 2]", 400, "invalid_body"),
    "json_string": Bad(b'"messages"', 400, "invalid_body"),
    "json_null": Bad(b"null", 400, "invalid_body"),
    "json_number": Bad(b"42", 400, "invalid_body"),
    "text_plain": Bad(chat(), 415, "unsupported_media_type", "text/plain"),
    "form_urlencoded": Bad(b"messages=hi", 415, "unsupported_media_type", "application/x-www-form-urlencoded"),
    "no_content_type": Bad(chat(), 415, "unsupported_media_type", None),
    "too_large": Bad(encode({"messages": [user("x" * 50)], "pad": "y" * 5000}), 413, "body_too_large"),
    "too_large_not_json": Bad(b"z" * 4000, 413, "body_too_large"),
    "unknown_field": Bad(chat(stream=True), 400, "unknown_field"),
    # messages
    "missing_messages": Bad(encode({"model": "fake-chat"}), 400, "missing_messages"),
    "messages_null": Bad(encode({"messages": None}), 400, "missing_messages"),
    "messages_string": Bad(encode({"messages": "Hi"}), 400, "invalid_messages"),
    "messages_object": Bad(encode({"messages": user()}), 400, "invalid_messages"),
    "empty_messages": Bad(encode({"messages": []}), 400, "empty_messages"),
    "too_many_messages": Bad(encode({"messages": [user()] * 5}), 400, "too_many_messages"),
    "message_string": Bad(encode({"messages": ["Hi"]}), 400, "invalid_message"),
    "message_list": Bad(encode({"messages": [["user", "Hi"]]}), 400, "invalid_message"),
    "message_extra_key": Bad(encode({"messages": [{**user(), "name": "bob"}]}), 400, "invalid_message"),
    "second_message_bad": Bad(encode({"messages": [user(), 7]}), 400, "invalid_message"),
    "unknown_role": Bad(encode({"messages": [{"role": "tool", "content": "Hi"}]}), 400, "invalid_role"),
    "role_missing": Bad(encode({"messages": [{"content": "Hi"}]}), 400, "invalid_role"),
    "role_wrong_case": Bad(encode({"messages": [{"role": "User", "content": "Hi"}]}), 400, "invalid_role"),
    "role_list": Bad(encode({"messages": [{"role": ["user"], "content": "Hi"}]}), 400, "invalid_role"),
    "role_object": Bad(encode({"messages": [{"role": {"user": 1}, "content": "Hi"}]}), 400, "invalid_role"),
    "role_deep_list": Bad(
        b'{"messages": [{"role": ' + b"[" * 500 + b"]" * 500 + b', "content": "Hi"}]}', 400, "invalid_role"
    ),
    "content_number": Bad(encode({"messages": [{"role": "user", "content": 5}]}), 400, "invalid_content"),
    "content_missing": Bad(encode({"messages": [{"role": "user"}]}), 400, "invalid_content"),
    "content_list": Bad(encode({"messages": [{"role": "user", "content": ["Hi"]}]}), 400, "invalid_content"),
    "message_too_long": Bad(encode({"messages": [user("x" * 101)]}), 400, "message_too_long"),
    "conversation_too_long": Bad(encode({"messages": [user("x" * 90)] * 3}), 400, "conversation_too_long"),
    # model
    "unknown_model": Bad(chat(model="gpt-imaginary"), 400, "unknown_model"),
    "model_upstream_id": Bad(chat(model="fake-model"), 400, "unknown_model"),  # Rill ids only
    "model_number": Bad(chat(model=3), 400, "invalid_model"),
    "model_list": Bad(chat(model=["fake-chat"]), 400, "invalid_model"),
    # client_id
    "client_id_not_uuid": Bad(chat(client_id="abc"), 400, "invalid_client_id"),
    "client_id_number": Bad(chat(client_id=12345), 400, "invalid_client_id"),
    "client_id_empty": Bad(chat(client_id=""), 400, "invalid_client_id"),
    # options
    "options_list": Bad(chat(options=[1]), 400, "invalid_options"),
    "options_string": Bad(chat(options="fast"), 400, "invalid_options"),
    "unknown_option": Bad(options(top_p=0.5), 400, "unknown_option"),
    "temperature_negative": Bad(options(temperature=-0.1), 400, "invalid_temperature"),
    "temperature_too_high": Bad(options(temperature=2.5), 400, "invalid_temperature"),
    "temperature_bool": Bad(options(temperature=True), 400, "invalid_temperature"),
    "temperature_string": Bad(options(temperature="1"), 400, "invalid_temperature"),
    "temperature_nan_string": Bad(options(temperature="NaN"), 400, "invalid_temperature"),
    "temperature_nan": Bad(options(temperature=float("nan")), 400, "invalid_temperature"),  # NaN literal
    "temperature_infinity": Bad(options(temperature=float("inf")), 400, "invalid_temperature"),
    "temperature_1e999": Bad(raw_option("temperature", b"1e999"), 400, "invalid_temperature"),  # parses as inf
    "temperature_huge_int": Bad(options(temperature=10**400), 400, "invalid_temperature"),
    "max_tokens_zero": Bad(options(max_tokens=0), 400, "invalid_max_tokens"),
    "max_tokens_negative": Bad(options(max_tokens=-5), 400, "invalid_max_tokens"),
    "max_tokens_float": Bad(options(max_tokens=10.0), 400, "invalid_max_tokens"),
    "max_tokens_fraction": Bad(options(max_tokens=10.5), 400, "invalid_max_tokens"),
    "max_tokens_bool": Bad(options(max_tokens=True), 400, "invalid_max_tokens"),
    "max_tokens_string": Bad(options(max_tokens="10"), 400, "invalid_max_tokens"),
    "max_tokens_too_high": Bad(options(max_tokens=1001), 400, "max_tokens_too_high"),
    "max_tokens_huge": Bad(options(max_tokens=10**400), 400, "max_tokens_too_high"),
}


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    text: str


async def send_encoded(rill: Rill, method: str, path: str, body: bytes, coding: str) -> Answer:
    headers = {"Content-Type": JSON, "Content-Encoding": coding}
    async with rill.session.request(method, rill.url / path.lstrip("/"), data=body, headers=headers) as response:
        return Answer(response.status, response.headers, await response.text())


async def send(
    rill: Rill, method: str, path: str, body: bytes | None = None, content_type: str | None = JSON
) -> Answer:
    headers = {}
    skip: list[str] = []
    if content_type is None:
        skip.append("Content-Type")
    elif body is not None:
        headers["Content-Type"] = content_type
    async with rill.session.request(
        method, rill.url / path.lstrip("/"), data=body, headers=headers, skip_auto_headers=skip
    ) as response:
        return Answer(response.status, response.headers, await response.text())


def check_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    """The one error shape: a JSON object {"error": {"code", "message"}} and nothing else."""
    assert answer.status == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in answer.text
    assert 'File "' not in answer.text
    body = json.loads(answer.text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"].strip()
    return dict(error)


def logged(caplog: pytest.LogCaptureFixture, status: int, code: str) -> bool:
    return any(
        record.name == "server.http.errors" and code in record.getMessage() and str(status) in record.getMessage()
        for record in caplog.records
    )


async def assert_nothing_started(rill: Rill, requests: int = 0, generations: int = 0) -> None:
    await asyncio.sleep(0.15)  # room for a wrongly started upstream request to arrive
    assert len(rill.fake.requests) == requests
    assert len(rill.registry) == generations


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_bad_chat_input_is_a_clean_4xx(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, case: Bad
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill(limits=LIMITS)
    answer_ = await send(rill, "POST", "/api/chat", case.body, case.content_type)
    check_error(answer_, case.status, case.code)
    await assert_nothing_started(rill)
    assert logged(caplog, case.status, case.code), [r.getMessage() for r in caplog.records]


async def test_input_right_at_every_limit_is_accepted(start_rill: StartRill) -> None:
    """The limits are inclusive, and the baseline the bad cases change one thing of is valid."""
    rill = await start_rill(limits=LIMITS)
    status, body = await rill.post_chat(
        {
            "messages": [user("x" * 100), {"role": "assistant", "content": "y" * 100}, user("z" * 25), user("w" * 25)],
            "model": "fake-chat",
            "client_id": "6F1C2B1E-1D7C-4A53-9D49-2F2B7F1D2C3E",
            "options": {"temperature": 2, "max_tokens": 1000},
        }
    )
    assert status == 201, body
    status, body = await rill.post_chat(
        {"messages": [{"role": "system", "content": ""}, user()], "options": {"temperature": 0, "max_tokens": 1}}
    )
    assert status == 201, body
    await wait_for(lambda: len(rill.fake.requests) == 2)


async def test_body_size_limit_is_exact(start_rill: StartRill, caplog: pytest.LogCaptureFixture) -> None:
    """max_body_bytes is the largest body accepted; one byte more is 413."""
    caplog.set_level(logging.INFO)
    rill = await start_rill(limits=LIMITS)
    core = chat()
    at_limit = core + b" " * (LIMITS["max_body_bytes"] - len(core))  # JSON allows trailing whitespace
    assert len(at_limit) == LIMITS["max_body_bytes"]

    check_error(await send(rill, "POST", "/api/chat", at_limit + b" "), 413, "body_too_large")
    await assert_nothing_started(rill)
    assert logged(caplog, 413, "body_too_large")

    accepted = await send(rill, "POST", "/api/chat", at_limit)
    assert accepted.status == 201, accepted.text
    await wait_for(lambda: len(rill.fake.requests) == 1)


async def test_chunked_body_over_the_limit_is_413(start_rill: StartRill) -> None:
    """Without a Content-Length the limit still holds."""
    rill = await start_rill(limits=LIMITS)

    async def pieces() -> AsyncIterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "Hi"}], "pad": "'
        for _ in range(10):
            yield b"p" * 500
        yield b'"}'

    async with rill.session.post(rill.url / "api/chat", data=pieces(), headers={"Content-Type": JSON}) as response:
        answer_ = Answer(response.status, response.headers, await response.text())
    check_error(answer_, 413, "body_too_large")
    await assert_nothing_started(rill)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/api"),
        ("GET", "/api/nothing"),
        ("POST", "/api/chats"),
        ("GET", "/api/chat/0123456789abcdef0123456789abcdef/events/more"),
    ],
)
async def test_unknown_route_is_404_json(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill()
    check_error(await send(rill, method, path, chat() if method == "POST" else None), 404, "not_found")
    await assert_nothing_started(rill)
    assert logged(caplog, 404, "not_found")


async def test_missing_static_file_is_404_json(start_rill: StartRill, caplog: pytest.LogCaptureFixture) -> None:
    """/static/ is a route, but a file that is not there is still "nothing at this address"."""
    caplog.set_level(logging.INFO)
    rill = await start_rill()
    check_error(await send(rill, "GET", "/static/missing.css"), 404, "not_found")
    assert logged(caplog, 404, "not_found")


@pytest.mark.parametrize(
    "path",
    [
        "/static/a%00b",  # a NUL: pathlib refuses it with ValueError
        "/static/%00",
        "/static/" + "x" * 300,  # longer than a file name may be: OSError
        "/static/js/" + "y" * 256 + ".js",
        "/static/" + "/".join(["z" * 255] * 20),  # longer than a path may be
        "/static/..%2f..%2fREADME.md",
        "/static/%2e%2e/templates/index.html",
    ],
)
async def test_odd_static_paths_are_404_json(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill()
    async with rill.session.get(URL(str(rill.url) + path, encoded=True)) as response:
        answer_ = Answer(response.status, response.headers, await response.text())
    check_error(answer_, 404, "not_found")
    assert logged(caplog, 404, "not_found")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_static_files_ignore_ranges_and_preconditions(start_rill: StartRill) -> None:
    """FileResponse would answer these with a bare 416/412 no error middleware can reach."""
    rill = await start_rill()
    async with rill.session.get(rill.url / "static/app.css") as response:
        whole = await response.read()
    for headers in (
        {"Range": "bytes=999999-"},
        {"Range": "bytes=0-1,5-6"},
        {"Range": "nonsense"},
        {"Range": "bytes=0-9"},
        {"If-Match": '"nope"'},
        {"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
    ):
        async with rill.session.get(rill.url / "static/app.css", headers=headers) as response:
            assert response.status == 200, headers
            assert await response.read() == whole
    async with rill.session.get(rill.url / "static/app.css") as response:
        etag = response.headers["ETag"]
    async with rill.session.get(rill.url / "static/app.css", headers={"If-None-Match": etag}) as response:
        assert response.status == 304  # revalidation still works


def deflate_raw(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("gzip", gzip.compress(chat())),
        ("x-gzip", gzip.compress(chat())),
        ("GZip", gzip.compress(chat())),
        ("deflate", zlib.compress(chat())),
        ("deflate", deflate_raw(chat())),  # what many clients send as deflate
        ("identity", chat()),
        ("", chat()),
    ],
    ids=["gzip", "x-gzip", "GZip", "deflate-zlib", "deflate-raw", "identity", "none"],
)
async def test_compressed_bodies_are_accepted(start_rill: StartRill, coding: str, body: bytes) -> None:
    """Rill decodes request bodies itself (aiohttp's decoding is off): this fails if an
    aiohttp upgrade stops honouring auto_decompress=False (the body would be decoded twice)."""
    rill = await start_rill()
    async with rill.session.post(
        rill.url / "api/chat", data=body, headers={"Content-Type": JSON, "Content-Encoding": coding}
    ) as response:
        assert response.status == 201, await response.text()


@pytest.mark.parametrize(
    ("coding", "body", "status", "code"),
    [
        ("gzip", chat(), 400, "bad_encoding"),  # says gzip, is not
        ("gzip", gzip.compress(chat())[:-8], 400, "bad_encoding"),  # cut short
        ("gzip", gzip.compress(chat()) + b"more", 400, "bad_encoding"),
        ("deflate", b"\x00\x01garbage", 400, "bad_encoding"),
        ("br", chat(), 400, "bad_encoding"),  # not supported
        ("zstd", chat(), 400, "bad_encoding"),
        ("gzip, gzip", gzip.compress(gzip.compress(chat())), 400, "bad_encoding"),
        ("compress", chat(), 400, "bad_encoding"),
        ("gzip", gzip.compress(b" " * 3000), 413, "body_too_large"),  # a bomb: over max_body_bytes decoded
    ],
    ids=["not-gzip", "gzip-cut", "gzip-trailing", "deflate-garbage", "br", "zstd", "gzip-twice", "compress", "bomb"],
)
async def test_bad_content_encoding_is_a_clean_4xx(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, coding: str, body: bytes, status: int, code: str
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill(limits=LIMITS)
    answer_ = await send_encoded(rill, "POST", "/api/chat", body, coding)
    check_error(answer_, status, code)
    await assert_nothing_started(rill)
    assert logged(caplog, status, code)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # The same connection serves on: nothing broke inside it.
    status_, body_ = await rill.post_chat()
    assert status_ == 201, body_


async def test_bad_gzip_body_is_no_error_where_nothing_reads_it(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp decoded bodies as they arrived: a bad one failed after the response, with
    an ERROR traceback, even on a handler that never reads the body."""
    caplog.set_level(logging.INFO)
    rill = await start_rill()
    for method, path in [("DELETE", "/api/session"), ("GET", "/api/models"), ("GET", "/healthz")]:
        answer_ = await send_encoded(rill, method, path, b"not gzip at all", "gzip")
        assert answer_.status == 200, answer_.text
    await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert (await rill.post_chat())[0] == 201


async def test_sign_in_with_deeply_nested_json_is_bad_json(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    """POST /api/session needs no token: its body parser is open to anyone."""
    caplog.set_level(logging.INFO)
    rill = await start_rill(environ={"RILL_ACCESS_TOKENS": "alice:alice-0123456789abcdefghij"})
    check_error(await send(rill, "POST", "/api/session", b"[" * 100_000), 400, "bad_json")
    check_error(await send_encoded(rill, "POST", "/api/session", b'{"token": "x"}', "gzip"), 400, "bad_encoding")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_decode_body() -> None:
    assert decode_body(b"plain", "", 100) == b"plain"
    assert decode_body(b"", "gzip", 100) == b""  # an empty body is empty in any coding
    assert decode_body(gzip.compress(b"x" * 100), "gzip", 100) == b"x" * 100  # the limit is inclusive
    with pytest.raises(ApiError) as caught:
        decode_body(gzip.compress(b"x" * 101), "gzip", 100)
    assert (caught.value.status, caught.value.code) == (413, "body_too_large")
    with pytest.raises(ApiError) as caught:
        decode_body(b"x", "br\r\nX-Evil: 1" + "z" * 100, 100)
    assert caught.value.code == "bad_encoding"
    assert "\n" not in caught.value.message  # the coding is shown escaped, and cut
    assert len(caught.value.message) < 160


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/chat", "POST"),
        ("GET", "/api/chat", "POST"),
        ("DELETE", "/api/chat", "POST"),
        ("PATCH", "/api/chat/0123456789abcdef0123456789abcdef", "DELETE"),
        ("POST", "/api/models", "GET"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_wrong_method_is_405_json(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, method: str, path: str, allowed: str
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill()
    answer_ = await send(rill, method, path, chat() if method in ("PUT", "POST", "PATCH") else None)
    check_error(answer_, 405, "method_not_allowed")
    assert allowed in answer_.headers["Allow"]
    await assert_nothing_started(rill)
    assert logged(caplog, 405, "method_not_allowed")


def check_retry_after(answer_: Answer) -> None:
    retry_after = answer_.headers.get("Retry-After")
    assert retry_after is not None, "a 429 must say when to come back"
    assert retry_after.isdigit()
    assert int(retry_after) > 0


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        ({"max_concurrent_per_client": 1}, "too_many_generations"),
        ({"max_concurrent_total": 1}, "server_busy"),
    ],
)
async def test_concurrency_limit_is_429_until_a_generation_stops(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture, limits: dict[str, int], code: str
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill(limits=limits)
    rill.fake.script(Reply(chunks=[chunk("still "), chunk("thinking")], end="hang"))
    first = await rill.start_chat()
    await wait_for(lambda: len(rill.fake.requests) == 1)

    refused = await send(rill, "POST", "/api/chat", chat())
    check_error(refused, 429, code)
    check_retry_after(refused)
    assert logged(caplog, 429, code)
    await assert_nothing_started(rill, requests=1, generations=1)
    live = rill.registry.live()
    assert [g.id for g in live] == [first]

    async with rill.session.delete(rill.url / f"api/chat/{first}") as response:
        assert response.status == 200
        stopped = await response.json()
    assert stopped["ended"] == "done"
    assert stopped["result"] == {"finish_reason": "cancelled"}
    async with asyncio.timeout(2):
        await rill.fake.requests[0].closed.wait()  # the hanging upstream request was closed

    second = await rill.start_chat()
    events = await (await rill.open_stream(second)).read_all()
    assert text_of(events) == "Hello world"
    assert terminal(events).data == {"finish_reason": "stop"}
    assert len(rill.fake.requests) == 2


# "\ud800" is valid JSON syntax, but a lone surrogate is not text: it cannot be encoded,
# hashed or sent upstream as UTF-8. Which code says so is the server's choice, among these.
LONE_SURROGATE = b'{"messages": [{"role": "user", "content": "Hi \\ud800 there"}]}'
SURROGATE_CODES = {"invalid_content", "bad_json"}


async def test_lone_surrogate_in_content_is_a_clean_400(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rill = await start_rill(limits=LIMITS)
    answer_ = await send(rill, "POST", "/api/chat", LONE_SURROGATE)
    assert answer_.status == 400, answer_.text
    code = json.loads(answer_.text)["error"]["code"]
    assert code in SURROGATE_CODES, answer_.text
    check_error(answer_, 400, code)
    await assert_nothing_started(rill)
    assert logged(caplog, 400, code)


async def test_server_keeps_serving_after_all_of_it(start_rill: StartRill) -> None:
    """Every bad request against one server, then a normal chat works end to end."""
    rill = await start_rill(limits=LIMITS)
    wrong: list[tuple[str, int, str]] = []
    for name, case in CASES.items():
        answer_ = await send(rill, "POST", "/api/chat", case.body, case.content_type)
        got = (answer_.status, json.loads(answer_.text)["error"]["code"])
        if got != (case.status, case.code):
            wrong.append((name, *got))
    answer_ = await send(rill, "POST", "/api/chat", LONE_SURROGATE)
    if answer_.status != 400 or json.loads(answer_.text)["error"]["code"] not in SURROGATE_CODES:
        wrong.append(("lone_surrogate", answer_.status, json.loads(answer_.text)["error"]["code"]))
    check_error(await send(rill, "GET", "/nope"), 404, "not_found")
    check_error(await send(rill, "PUT", "/api/chat", chat()), 405, "method_not_allowed")
    await assert_nothing_started(rill)

    rill.fake.script(Reply(chunks=answer(["still", " fine"])))
    generation_id = await rill.start_chat()
    events = await (await rill.open_stream(generation_id)).read_all()
    assert text_of(events) == "still fine"
    assert terminal(events).data == {"finish_reason": "stop"}
    assert len(rill.fake.requests) == 1
    async with rill.session.get(rill.url / "healthz") as response:
        assert (await response.json())["status"] == "ok"
    assert wrong == [], "refused with the wrong status or code (name, status, code)"
