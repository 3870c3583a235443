"""Access control: tokens from config, the signed session cookie, Bearer, limits on
wrong guesses, Origin (CSRF) and Host checks, CORS, per-token isolation and budgets."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.access.budget import DailyBudget
from server.access.clients import RateWindow
from server.access.gate import Gate
from server.access.middleware import host_name, rate_key
from server.config import AccessConfig, ConfigError, load_config, parse_access_tokens
from server.keys import BUDGET, OPEN_STREAMS

from .conftest import BASE_DOCUMENT, Rill, StartRill, make_config, wait_for
from .fakes import answer

ALICE = "alice-0123456789abcdefghij"
BOB = "bob-0123456789abcdefghijkl"
CAROL = "carol-0123456789abcdefghijk"
TOKENS = {"RILL_ACCESS_TOKENS": f"alice:{ALICE}\nbob:{BOB}"}
SAME_ID = "3f1c0d2e-8a41-4c55-9b1e-7d2f6a0c9e11"
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def browser_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies for 127.0.0.1 (aiohttp's default jar ignores IP hosts)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def sign_in(session: aiohttp.ClientSession, rill: Rill, token: str) -> aiohttp.ClientResponse:
    async with session.post(rill.url / "api/session", json={"token": token}, headers=origin_of(rill)) as response:
        await response.read()
        return response


def origin_of(rill: Rill) -> dict[str, str]:
    return {"Origin": str(rill.url.origin())}


async def status_and_body(response: aiohttp.ClientResponse) -> tuple[int, Any]:
    async with response:
        return response.status, await response.json()


# --- configuration ------------------------------------------------------------------------


def test_tokens_are_read_named_or_bare_by_line_or_comma() -> None:
    tokens = parse_access_tokens(f"# the team\nalice:{ALICE}\n  {BOB} , carol:{CAROL}\n", "RILL_ACCESS_TOKENS")
    assert [(t.name, t.secret.reveal()) for t in tokens] == [("alice", ALICE), ("token2", BOB), ("carol", CAROL)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("short-token", "16 to 256 printable characters"),
        ("Sup3rS3cretPrefix:tail", "16 to 256 printable characters"),
        ("aaaaaaaabbbbbbbbcccccc", "too easy to guess"),
        ("alice:has space in it 123", "16 to 256 printable characters"),
        ("bad.name:0123456789abcdefgh", "a name is 1 to 32"),
        (f"alice:{ALICE}\nalice:{BOB}", "'alice' is used twice"),
        (f"alice:{ALICE}\nbob:{ALICE}", "the same token is listed twice"),
    ],
)
def test_bad_tokens_are_refused_without_showing_them(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_access_tokens(text, "RILL_ACCESS_TOKENS")
    message = str(caught.value)
    assert "RILL_ACCESS_TOKENS: entry" in message
    for secret in ("short-token", "has space", "0123456789abcdefgh", "Sup3rS3cretPrefix", "aaaa", ALICE, BOB):
        assert secret not in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "rill.example.com"])
def test_listening_beyond_loopback_needs_tokens(host: str) -> None:
    document = BASE_DOCUMENT | {"server": {"host": host}}
    with pytest.raises(ConfigError, match="needs access tokens: put one or more in RILL_ACCESS_TOKENS"):
        make_config("http://127.0.0.1:9/v1", **document)
    config = make_config("http://127.0.0.1:9/v1", environ=TOKENS, **document)
    assert config.server.host == host
    assert config.access.required


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_tokens(host: str) -> None:
    config = make_config("http://127.0.0.1:9/v1", server={"host": host})
    assert not config.access.required


def test_tokens_come_from_a_systemd_credential(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "RILL_ACCESS_TOKENS").write_text(f"alice:{ALICE}\n")
    config = load_config(environ={"CREDENTIALS_DIRECTORY": str(credentials), "RILL_HOST": "0.0.0.0"}, cwd=tmp_path)
    assert [t.name for t in config.access.tokens] == ["alice"]
    assert ALICE in config.secrets  # scrubbed from upstream error text like the API keys


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/path", "ftp://x"])
def test_cors_origins_must_be_origins(origin: str) -> None:
    with pytest.raises(ConfigError, match=r"access.cors_origins\[0\]: must be an origin"):
        make_config("http://127.0.0.1:9/v1", access={"cors_origins": [origin]})


# --- tokens and cookies -------------------------------------------------------------------


def gate(tokens: str = TOKENS["RILL_ACCESS_TOKENS"], **settings: Any) -> Gate:
    return Gate(AccessConfig(tokens=parse_access_tokens(tokens, "test"), **settings))


@pytest.mark.parametrize(("given", "name"), [(ALICE, "alice"), (BOB, "bob"), ("x" * 30, None), ("", None)])
def test_token_check_compares_with_every_token(monkeypatch: pytest.MonkeyPatch, given: str, name: str) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("server.access.gate.hmac.compare_digest", counting)
    assert gate().check_token(given) == name
    # Constant time: every token is compared (no early exit), always as 32-byte digests.
    assert len(calls) == 2
    assert all(len(a) == len(b) == 32 for a, b in calls)


def test_session_cookie_round_trip_and_forgeries() -> None:
    keeper = gate()
    session = keeper.issue("alice", 1_000_000.0)
    value = keeper.cookie_value(session)
    assert keeper.verify(value, 1_000_001.0) == session
    version, name, expires, session_id, signature = value.split(".")
    forged = [
        f"{version}.bob.{expires}.{session_id}.{signature}",  # someone else's name
        f"{version}.{name}.{int(expires) + 60}.{session_id}.{signature}",  # a longer life
        f"{version}.{name}.{expires}.other-id.{signature}",
        f"{version}.{name}.{expires}.{session_id}.{signature[:-2]}AA",
        f"v2.{name}.{expires}.{session_id}.{signature}",
        f"{version}.{name}.{expires}.{session_id}",
        f"{version}.{name}.{expires}.{session_id}.{signature}.x",
        f"{version}.{name}.{'9' * 5000}.{session_id}.{signature}",  # int() of it alone would raise
        f"{version}.{name}.{expires}.{session_id}.{signature}\udc80",
        "",
    ]
    assert [keeper.verify(v, 1_000_001.0) for v in forged] == [None] * len(forged)
    assert keeper.verify(value, float(session.expires)) is None  # expired
    # A cookie from a much longer session_days than configured now is refused too.
    assert keeper.verify(value, session.expires - keeper.session_seconds - 120.0) is None
    # Every sign-in is its own session.
    assert keeper.issue("alice", 1_000_000.0).session_id != session.session_id


def test_a_cookie_dies_with_its_token_and_survives_a_restart() -> None:
    keeper = gate()
    value = keeper.cookie_value(keeper.issue("alice", 1_000_000.0))
    assert gate(f"alice:{ALICE}\ncarol:{CAROL}").verify(value, 1_000_001.0) is not None  # restart
    assert gate(f"alice:{CAROL}\nbob:{BOB}").verify(value, 1_000_001.0) is None  # alice's token changed
    assert gate(f"bob:{BOB}").verify(value, 1_000_001.0) is None  # removed


def test_signed_out_sessions_stay_signed_out_across_restarts(tmp_path: Path) -> None:
    keeper = gate(state_dir=tmp_path)
    signed_out, other = keeper.issue("alice", 1_000_000.0), keeper.issue("alice", 1_000_000.0)
    keeper.revoke(signed_out, 1_000_001.0)
    for current in (keeper, gate(state_dir=tmp_path)):
        assert current.verify(current.cookie_value(signed_out), 1_000_002.0) is None
        assert current.verify(current.cookie_value(other), 1_000_002.0) == other
    # Revocations are forgotten once their cookies would have expired anyway.
    keeper.revoke(other, float(signed_out.expires) + 1)
    assert json.loads((tmp_path / "revoked-sessions.json").read_text()) == {other.session_id: other.expires}


# --- the HTTP API with tokens ---------------------------------------------------------------


@pytest.fixture
async def locked(start_rill: StartRill) -> Rill:
    return await start_rill(environ=TOKENS)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "api/models"), ("POST", "api/chat"), ("GET", "metrics"), ("GET", "api/chat/abc/events"), ("GET", "x")],
)
async def test_everything_but_the_page_needs_a_token(locked: Rill, method: str, path: str) -> None:
    async with locked.session.request(method, locked.url / path, json=CHAT) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="rill"'
        body = await response.json()
    assert body["error"]["code"] == "auth_required"
    assert locked.fake.requests == []


@pytest.mark.parametrize("path", ["", "static/js/app.js", "healthz", "readyz", "api/session"])
async def test_the_page_its_files_and_health_checks_are_public(locked: Rill, path: str) -> None:
    async with locked.session.get(locked.url / path) as response:
        assert response.status == 200


async def test_bearer_token_for_api_clients(locked: Rill) -> None:
    async with locked.session.get(locked.url / "api/models", headers=bearer(ALICE)) as response:
        assert response.status == 200
    async with locked.session.post(locked.url / "api/chat", json=CHAT, headers=bearer(BOB)) as response:
        assert response.status == 201
        created = await response.json()
    reader_response = await locked.session.get(locked.url / created["events"].lstrip("/"), headers=bearer(BOB))
    async with reader_response:
        assert reader_response.status == 200
        assert b"event: done" in await reader_response.read()


async def test_wrong_tokens_are_limited_per_client(locked: Rill, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    attacker = {"X-Forwarded-For": "198.51.100.7"}  # via the trusted local proxy
    for guess in range(5):
        response = await locked.session.get(locked.url / "api/models", headers=bearer(f"guess-{guess:020d}") | attacker)
        status, body = await status_and_body(response)
        assert (status, body["error"]["code"]) == (401, "bad_token")
    # Locked out: even the right token waits, and the answer says how long.
    response = await locked.session.get(locked.url / "api/models", headers=bearer(ALICE) | attacker)
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    status, body = await status_and_body(response)
    assert body["error"]["code"] == "too_many_attempts"
    # The sign-in form shares the limit; another client does not.
    response = await locked.session.post(
        locked.url / "api/session", json={"token": ALICE}, headers=attacker | origin_of(locked)
    )
    assert (await status_and_body(response))[0] == 429
    other = {"X-Forwarded-For": "198.51.100.8"}
    async with locked.session.get(locked.url / "api/models", headers=bearer(ALICE) | other) as response:
        assert response.status == 200
    assert "198.51.100.7" in caplog.text
    assert "guess-" not in caplog.text
    assert ALICE not in caplog.text
    async with locked.session.get(locked.url / "metrics", headers=bearer(BOB) | other) as response:
        metrics = await response.text()
    assert 'rill_access_token_checks_total{outcome="bad_token"} 5.0' in metrics
    assert 'rill_access_token_checks_total{outcome="limited"} 2.0' in metrics


async def test_sign_in_sets_a_strict_http_only_cookie(locked: Rill, browser_session: aiohttp.ClientSession) -> None:
    response = await sign_in(browser_session, locked, ALICE)
    assert response.status == 200
    cookie = response.cookies["rill_session"]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/"
    assert int(cookie["max-age"]) == 30 * 86400
    assert not cookie["secure"]
    assert ALICE not in cookie.value
    async with browser_session.get(locked.url / "api/session") as state:
        assert await state.json() == {"required": True, "signed_in": True, "name": "alice"}
    async with browser_session.post(locked.url / "api/chat", json=CHAT, headers=origin_of(locked)) as created:
        assert created.status == 201
        events = (await created.json())["events"]
    async with browser_session.get(locked.url / events.lstrip("/")) as stream:
        assert b"Hello" in await stream.read()
    # Signing out ends it.
    async with browser_session.delete(locked.url / "api/session", headers=origin_of(locked)) as out:
        assert out.status == 200
    async with browser_session.get(locked.url / "api/models") as after:
        assert after.status == 401


async def test_cookie_is_secure_behind_a_trusted_https_proxy(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS)
    https = {"X-Forwarded-Proto": "https", "Host": "chat.example.com", "Origin": "https://chat.example.com"}
    async with rill.session.post(rill.url / "api/session", json={"token": ALICE}, headers=https) as response:
        assert response.status == 200
        cookie = response.cookies["__Host-rill_session"]  # the prefix: no planting from a subdomain
        assert cookie["secure"] is True
        assert "rill_session" not in response.cookies
    with_cookie = https | {"Cookie": f"__Host-rill_session={cookie.value}"}
    async with rill.session.get(rill.url / "api/models", headers=with_cookie) as response:
        assert response.status == 200
    # Over https only the prefixed cookie counts.
    unprefixed = https | {"Cookie": f"rill_session={cookie.value}"}
    async with rill.session.get(rill.url / "api/models", headers=unprefixed) as response:
        assert response.status == 401
    # The header means nothing from a peer that is not a trusted proxy.
    untrusted = await start_rill(environ=TOKENS, limits={"trusted_proxies": ["10.0.0.0/8"]})
    plain = https | {"Origin": "http://chat.example.com"}
    async with untrusted.session.post(untrusted.url / "api/session", json={"token": ALICE}, headers=plain) as response:
        assert response.status == 200
        assert not response.cookies["rill_session"]["secure"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"token": "y" * 20}, 401, "bad_token"),
        ({"token": ""}, 400, "invalid_token_field"),
        ({"token": 5}, 400, "invalid_token_field"),
        ({"token": ALICE, "remember": True}, 400, "unknown_field"),
        ([ALICE], 400, "invalid_body"),
    ],
)
async def test_sign_in_errors(locked: Rill, body: Any, status: int, code: str) -> None:
    async with locked.session.post(locked.url / "api/session", json=body, headers=origin_of(locked)) as response:
        assert response.status == status
        assert "Set-Cookie" not in response.headers
        assert (await response.json())["error"]["code"] == code


async def test_sign_in_without_tokens_configured(rill: Rill) -> None:
    async with rill.session.get(rill.url / "api/session") as state:
        assert await state.json() == {"required": False, "signed_in": True, "name": None}
    async with rill.session.post(rill.url / "api/session", json={"token": ALICE}) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "access_not_configured"


async def test_sign_out_ends_every_copy_of_the_cookie(locked: Rill, browser_session: aiohttp.ClientSession) -> None:
    response = await sign_in(browser_session, locked, ALICE)
    stolen = {"Cookie": f"rill_session={response.cookies['rill_session'].value}"}
    async with locked.session.get(locked.url / "api/models", headers=stolen) as check:
        assert check.status == 200
    async with browser_session.delete(locked.url / "api/session", headers=origin_of(locked)) as out:
        assert out.status == 200
    async with locked.session.get(locked.url / "api/models", headers=stolen) as check:
        assert check.status == 401
    async with locked.session.get(locked.url / "api/session", headers=stolen) as state:
        assert (await state.json())["signed_in"] is False


async def test_a_forged_cookie_is_a_401_not_a_500(locked: Rill) -> None:
    cookie = {"Cookie": f"rill_session=v1.alice.{'9' * 4400}.id.AAAA"}
    async with locked.session.get(locked.url / "api/models", headers=cookie) as response:
        assert response.status == 401


async def test_answers_belong_to_their_token(locked: Rill) -> None:
    created = await locked.session.post(
        locked.url / "api/chat", json=CHAT | {"client_id": SAME_ID}, headers=bearer(ALICE)
    )
    _, alice_chat = await status_and_body(created)
    for method, path in [("GET", alice_chat["events"]), ("DELETE", f"api/chat/{alice_chat['id']}")]:
        response = await locked.session.request(method, locked.url / path.lstrip("/"), headers=bearer(BOB))
        status, body = await status_and_body(response)
        assert (status, body["error"]["code"]) == (404, "generation_not_found")
    # Bob's client_id is his own: the same id starts his own answer, not a view of Alice's.
    response = await locked.session.post(
        locked.url / "api/chat", json=CHAT | {"client_id": SAME_ID}, headers=bearer(BOB)
    )
    status, bob_chat = await status_and_body(response)
    assert status == 201
    assert bob_chat["id"] != alice_chat["id"]
    async with locked.session.get(locked.url / alice_chat["events"].lstrip("/"), headers=bearer(ALICE)) as stream:
        assert stream.status == 200


async def test_limits_count_per_token(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS, limits={"max_concurrent_per_client": 1})
    rill.fake.default.chunks = [*rill.fake.default.chunks[:1], 30.0]  # answers that stay live
    statuses = []
    for token in (ALICE, ALICE, BOB):
        response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(token))
        status, body = await status_and_body(response)
        statuses.append((status, body.get("error", {}).get("code")))
    assert statuses == [(201, None), (429, "too_many_generations"), (201, None)]


# --- cross-site requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # another port is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
async def test_unsafe_requests_from_other_sites_are_refused(rill: Rill, headers: dict[str, str]) -> None:
    async with rill.session.post(rill.url / "api/chat", json=CHAT, headers=headers) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] in ("origin_not_allowed", "cross_site_request")
    assert rill.fake.requests == []


async def test_a_refused_stop_changes_nothing(rill: Rill) -> None:
    rill.fake.default.chunks = [*rill.fake.default.chunks[:1], 30.0]
    generation_id = await rill.start_chat()
    headers = {"Origin": "http://evil.example"}
    async with rill.session.delete(rill.url / f"api/chat/{generation_id}", headers=headers) as response:
        assert response.status == 403
    generation = rill.registry.get(generation_id)
    assert generation is not None
    assert generation.live


@pytest.mark.parametrize(
    "headers", [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": "SAME"}]
)
async def test_same_origin_and_non_browser_requests_pass(rill: Rill, headers: dict[str, str]) -> None:
    if headers.get("Origin") == "SAME":
        headers = origin_of(rill)
    async with rill.session.post(rill.url / "api/chat", json=CHAT, headers=headers) as response:
        assert response.status == 201


async def test_cors_only_for_configured_origins(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS, access={"cors_origins": ["https://app.example.com"]})
    app_origin = {"Origin": "https://app.example.com"}
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with rill.session.options(rill.url / "api/chat", headers=app_origin | preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
    async with rill.session.post(rill.url / "api/chat", json=CHAT, headers=app_origin | bearer(ALICE)) as response:
        assert response.status == 201
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
        assert "Origin" in response.headers.getall("Vary")
    async with rill.session.get(rill.url / "api/models", headers=app_origin) as response:
        assert response.status == 401  # CORS is not a key: the token is still needed,
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"  # and readable
    evil = {"Origin": "https://evil.example"}
    async with rill.session.options(rill.url / "api/chat", headers=evil | preflight) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    async with rill.session.post(rill.url / "api/chat", json=CHAT, headers=evil | bearer(ALICE)) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_no_cors_unless_configured(rill: Rill) -> None:
    async with rill.session.get(rill.url / "api/models", headers={"Origin": "https://app.example.com"}) as response:
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 403),
        ("evil.example:8080", 403),
        ("localhost:8080", 200),
        ("[::1]:8080", 200),
        ("rill.lan", 200),
    ],
)
async def test_without_tokens_only_local_names_are_served(start_rill: StartRill, host: str, status: int) -> None:
    rill = await start_rill(access={"allowed_hosts": ["rill.lan"]})
    async with rill.session.get(rill.url / "api/models", headers={"Host": host}) as response:
        assert response.status == status
        if status == 403:
            assert (await response.json())["error"]["code"] == "host_not_allowed"


async def test_with_tokens_any_host_name_is_served(locked: Rill) -> None:
    headers = {"Host": "chat.example.com"} | bearer(ALICE)
    async with locked.session.get(locked.url / "api/models", headers=headers) as response:
        assert response.status == 200


# --- per-client streams and daily budgets -----------------------------------------------------


async def test_open_streams_are_limited_per_client(start_rill: StartRill) -> None:
    rill = await start_rill(limits={"max_streams_per_client": 2})
    rill.fake.default.chunks = [*rill.fake.default.chunks[:2], 30.0]
    generation_id = await rill.start_chat()
    first = await rill.open_stream(generation_id)
    await rill.open_stream(generation_id)
    async with rill.session.get(rill.url / f"api/chat/{generation_id}/events") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["error"]["code"] == "too_many_streams"
    first.response.close()
    await wait_for(lambda: len(rill.app[OPEN_STREAMS]) == 1)
    await rill.open_stream(generation_id)


async def test_daily_budget_per_token(start_rill: StartRill, tmp_path: Path) -> None:
    # Each fake answer is billed 10 tokens (its usage chunk).
    rill = await start_rill(environ=TOKENS | {"RILL_STATE_DIR": str(tmp_path)}, access={"daily_token_budget": 15})
    for expected_cap in (14, 4):  # the budget left, less "Hi" (about 1 token)
        response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(ALICE))
        status, body = await status_and_body(response)
        assert status == 201
        generation = rill.registry.get(body["id"])
        assert generation is not None
        await wait_for(lambda g=generation: g.terminal is not None)  # type: ignore[misc]
        assert rill.fake.requests[-1].body["max_tokens"] == expected_cap  # never past the budget
    response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(ALICE))
    retry_after = int(response.headers["Retry-After"])
    status, body = await status_and_body(response)
    assert (status, body["error"]["code"]) == (429, "budget_exhausted")
    assert 0 < retry_after <= 86400
    assert "00:00 UTC" in body["error"]["message"]
    assert len(rill.fake.requests) == 2
    response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(BOB))
    assert (await status_and_body(response))[0] == 201  # Bob has his own
    # The ledger outlives a restart.
    again = await start_rill(environ=TOKENS | {"RILL_STATE_DIR": str(tmp_path)}, access={"daily_token_budget": 15})
    response = await again.session.post(again.url / "api/chat", json=CHAT, headers=bearer(ALICE))
    assert (await status_and_body(response))[0] == 429


def test_budget_ledger_starts_afresh_each_day(tmp_path: Path) -> None:
    today = datetime(2026, 11, 25, 23, 59, 30, tzinfo=UTC)
    clock = [today]
    budget = DailyBudget(100, tmp_path, clock=lambda: clock[0])
    budget.charge("alice", 80)
    assert budget.remaining("alice") == 20
    assert budget.seconds_to_reset() == 30
    assert DailyBudget(100, tmp_path, clock=lambda: today).remaining("alice") == 20  # saved
    clock[0] = datetime(2026, 11, 26, 0, 0, 1, tzinfo=UTC)
    assert budget.remaining("alice") == 100
    assert DailyBudget(100, tmp_path, clock=lambda: clock[0]).remaining("alice") == 100


def test_a_corrupt_ledger_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "usage.json").write_text("{not json")
    assert DailyBudget(100, tmp_path).remaining("alice") == 100
    assert "is corrupt" in caplog.text  # and kept aside: tests/test_state.py


async def test_answers_without_usage_are_charged_an_estimate(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS, access={"daily_token_budget": 1000})
    rill.fake.default.chunks = answer(["Hello", " world"], usage=None)  # as after a Stop or a cut
    response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(ALICE))
    _, body = await status_and_body(response)
    await wait_for(lambda: rill.registry.get(body["id"]).terminal is not None)  # type: ignore[union-attr]
    assert rill.app[BUDGET].used("alice") == 1 + 2  # "Hi" is about 1 token, plus 2 pieces of answer


async def test_answers_running_at_once_cannot_pass_the_budget(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS, access={"daily_token_budget": 100})
    rill.fake.default.chunks = [*rill.fake.default.chunks[:2], 30.0]  # answers that stay live
    response = await rill.session.post(
        rill.url / "api/chat", json=CHAT | {"options": {"max_tokens": 60}}, headers=bearer(ALICE)
    )
    assert (await status_and_body(response))[0] == 201
    # 100 - (1 + 60) held by the first: the second gets what is left, the third nothing.
    response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(ALICE))
    assert (await status_and_body(response))[0] == 201
    await wait_for(lambda: len(rill.fake.requests) == 2)
    assert sorted(r.body["max_tokens"] for r in rill.fake.requests) == [100 - 61 - 1, 60]
    response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(ALICE))
    assert response.headers["Retry-After"] == "5"
    status, body = await status_and_body(response)
    assert (status, body["error"]["code"]) == (429, "budget_exhausted")
    assert "answers this access token has running" in body["error"]["message"]
    await asyncio.sleep(0.05)
    assert len(rill.fake.requests) == 2
    # Stopping one gives its hold back (charged what it used instead).
    first = rill.registry.live()[0]
    async with rill.session.delete(rill.url / f"api/chat/{first.id}", headers=bearer(ALICE)) as stopped:
        assert stopped.status == 200
    response = await rill.session.post(rill.url / "api/chat", json=CHAT, headers=bearer(ALICE))
    assert (await status_and_body(response))[0] == 201


async def test_a_prompt_larger_than_the_budget_left_is_refused(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS, access={"daily_token_budget": 100})
    big = {"messages": [{"role": "user", "content": "长" * 200}]}  # about 200 tokens
    response = await rill.session.post(rill.url / "api/chat", json=big, headers=bearer(ALICE))
    status, body = await status_and_body(response)
    assert (status, body["error"]["code"]) == (429, "budget_exhausted")
    assert "needs about 200 tokens" in body["error"]["message"]
    assert rill.fake.requests == []


async def test_the_compat_stream_keeps_to_the_budget(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS, access={"daily_token_budget": 15}, compat={"get_stream": True})
    async with rill.session.get(rill.url / "stream", params={"prompt": "Hi"}, headers=bearer(ALICE)) as response:
        assert b"[STREAM_END]" in await response.read()
    await wait_for(lambda: len(rill.fake.requests) == 1)
    assert rill.fake.requests[-1].body["max_tokens"] == 14
    await wait_for(lambda: rill.app[BUDGET].used("alice") == 10)
    async with rill.session.get(rill.url / "stream", params={"prompt": "Hi"}, headers=bearer(ALICE)) as response:
        assert response.status == 200  # the tutorial format: the error comes as an event
    async with rill.session.get(rill.url / "stream", params={"prompt": "Hi"}, headers=bearer(ALICE)) as response:
        assert response.status == 429
    assert len(rill.fake.requests) == 2


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [("GET", {"Sec-Fetch-Site": "cross-site"}, 403), ("GET", {"Sec-Fetch-Site": "same-site"}, 403), ("HEAD", {}, 405)],
)
async def test_the_compat_stream_starts_nothing_for_other_sites_or_head(
    start_rill: StartRill, method: str, headers: dict[str, str], status: int
) -> None:
    rill = await start_rill(compat={"get_stream": True})
    url = rill.url.with_path("/stream").with_query(prompt="spend")
    async with rill.session.request(method, url, headers=headers) as response:
        assert response.status == status
    await asyncio.sleep(0.1)
    assert rill.fake.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "198.51.100.7"},
        {"X-Forwarded-Proto": "https"},
        {"Forwarded": "for=198.51.100.7"},
        {"X-Forwarded-Host": "localhost"},
        {"Host": "localhost:80@evil.com"},
        {"Host": "[::1]evil.com"},
        {"Host": "localhost:abc"},
    ],
)
async def test_an_open_rill_refuses_proxied_and_malformed_requests(rill: Rill, headers: dict[str, str]) -> None:
    async with rill.session.get(rill.url / "api/models", headers=headers) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "host_not_allowed"


async def test_a_proxy_guarded_open_rill_serves_its_allowed_host(start_rill: StartRill) -> None:
    rill = await start_rill(access={"allowed_hosts": ["rill.lan"]})
    proxied = {"Host": "rill.lan", "X-Forwarded-For": "198.51.100.7"}
    async with rill.session.get(rill.url / "api/models", headers=proxied) as response:
        assert response.status == 200
    async with rill.session.get(rill.url / "api/models", headers=proxied | {"Host": "localhost"}) as response:
        assert response.status == 403


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("LocalHost:8080", "localhost"),
        ("chat.example.com.", "chat.example.com"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("[nonsense]", None),
        ("a b", None),
        ("x:80:80", None),
        ("", None),
    ],
)
def test_host_names_are_parsed_strictly(host: str, name: str | None) -> None:
    assert host_name(host) == name


def test_the_service_unit_requires_tokens() -> None:
    with pytest.raises(ConfigError, match="RILL_REQUIRE_ACCESS_TOKENS"):
        make_config("http://127.0.0.1:9/v1", environ={"RILL_REQUIRE_ACCESS_TOKENS": "1"})
    assert make_config("http://127.0.0.1:9/v1", environ={"RILL_REQUIRE_ACCESS_TOKENS": "1"} | TOKENS).access.required


def test_wrong_guesses_from_ipv6_count_per_network() -> None:
    assert rate_key("2001:db8::1") == rate_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert rate_key("2001:db8:0:1::1") != rate_key("2001:db8::1")
    assert rate_key("198.51.100.7") == "198.51.100.7"


async def test_wrong_guesses_from_one_ipv6_network_share_a_limit(locked: Rill) -> None:
    for host in range(1, 6):
        headers = bearer(f"guess-{host:020d}") | {"X-Forwarded-For": f"2001:db8::{host}"}
        async with locked.session.get(locked.url / "api/models", headers=headers) as response:
            assert response.status == 401
    headers = bearer(f"guess-{6:020d}") | {"X-Forwarded-For": "2001:db8::6"}
    async with locked.session.get(locked.url / "api/models", headers=headers) as response:
        assert response.status == 429


def test_the_rate_window_remembers_a_bounded_number_of_clients() -> None:
    window = RateWindow(limit=1, period=60.0, max_clients=3)
    for client in ("a", "b", "c", "d"):
        assert window.hit(client, 0.0) == 0
    assert len(window) == 3
    assert window.hit("d", 1.0) > 0  # still limited
    assert window.hit("a", 1.0) == 0  # the least recently seen was forgotten


async def test_health_tells_strangers_only_that_it_lives(locked: Rill) -> None:
    async with locked.session.get(locked.url / "healthz") as response:
        assert await response.json() == {"status": "ok"}


async def test_vary_origin_on_every_answer_when_cors_is_configured(start_rill: StartRill) -> None:
    rill = await start_rill(access={"cors_origins": ["https://app.example.com"]})
    async with rill.session.get(rill.url / "api/models") as response:
        assert "Origin" in response.headers.getall("Vary")
        assert "Access-Control-Allow-Origin" not in response.headers
