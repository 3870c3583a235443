"""Honest endings and refusals: finish reasons that mean failure, unknown ones passed on,
refused TLS certificates, redirects that would carry the request elsewhere, and who is
told what when the model API rejects the key."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer

from .conftest import KEY_ENV, SENTINEL_KEY, Rill, StartRill
from .fakes import FakeUpstream, Reply, answer, chunk, terminal, text_of
from .test_metrics import scrape, value
from .test_upstream_faults import assert_still_serves, error_of, names, run_chat, with_good_provider

# --- finish reasons ---------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["abort", "error", "ABORT", "cancelled"])
@pytest.mark.parametrize("done", [True, False], ids=["done", "no_done"])
async def test_a_failure_finish_reason_is_a_retryable_error_with_the_text_kept(
    rill: Rill, reason: str, done: bool
) -> None:
    chunks = answer(["Half", " an"], finish=reason)
    if not done:
        chunks = chunks[:-1]  # the body ends after the usage chunk, without [DONE]
    rill.fake.script(Reply(chunks=chunks))
    events = await run_chat(rill)

    assert text_of(events) == "Half an"
    assert names(events)[-2:] == ["usage", "error"]  # what was used is still reported
    error = error_of(events)
    assert error["code"] == "upstream_aborted"
    assert error["retryable"] is True
    assert "kept" in error["message"]
    assert reason in error["message"]
    assert len(rill.fake.requests) == 1  # the text so far is kept: asking again is the user's call
    await assert_still_serves(rill)


@pytest.mark.parametrize("reason", ["tool_calls", "end_turn", "STOP", "eos_token", "recitation"])
async def test_an_unknown_finish_reason_is_passed_on_verbatim(rill: Rill, reason: str) -> None:
    rill.fake.script(Reply(chunks=answer(["All", " there"], finish=reason)))
    events = await run_chat(rill)

    assert names(events) == ["meta", "delta", "delta", "usage", "done"]
    assert terminal(events).data == {"finish_reason": reason}


async def test_a_hostile_finish_reason_is_cut_scrubbed_and_counted_as_other(rill: Rill) -> None:
    long = "x" * 1000
    hostile = [long, f"leak {SENTINEL_KEY} here", "two\nlines\x1b[31m", *(f"vendor_{i}" for i in range(30))]
    seen = []
    for reason in hostile:
        rill.fake.script(Reply(chunks=answer(["ok"], finish=reason)))
        events = await run_chat(rill)
        assert text_of(events) == "ok"
        seen.append(terminal(events).data["finish_reason"])

    assert seen[0] == "x" * 63 + "…"
    assert seen[1] == "leak *** here"
    assert seen[2] == "two lines\ufffd[31m"
    assert seen[3:] == [f"vendor_{i}" for i in range(30)]
    samples = await scrape(rill)
    outcomes = {dict(labels)["outcome"] for name, labels in samples if name == "rill_generations_total"}
    assert outcomes == {"other"}  # the upstream's words do not become label values
    assert value(samples, "rill_generations_total", outcome="other") == len(hostile)


async def test_whitespace_only_finish_reason_counts_as_none(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=[chunk("Cut"), chunk("", finish="  ")], end="cut"))
    events = await run_chat(rill)
    assert error_of(events)["code"] == "upstream_cut"


# --- TLS ------------------------------------------------------------------------------------


@asynccontextmanager
async def tls_upstream(configure: Callable[[ssl.SSLContext], None]) -> AsyncIterator[tuple[FakeUpstream, list[int]]]:
    """A fake upstream over TLS on loopback; the list counts TLS handshakes begun."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    configure(context)
    handshakes: list[int] = []
    context.sni_callback = lambda *_: handshakes.append(1)  # called for every ClientHello
    fake = FakeUpstream()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"https://{host}:{port}/v1"
    try:
        yield fake, handshakes
    finally:
        await runner.cleanup()


def self_signed(ca: trustme.CA) -> Callable[[ssl.SSLContext], None]:
    """The CA's own certificate as the server's: self-signed, as `openssl req -x509` makes."""

    def configure(context: ssl.SSLContext) -> None:
        with ca.cert_pem.tempfile() as cert, ca.private_key_pem.tempfile() as key:
            context.load_cert_chain(cert, key)

    return configure


@pytest.mark.parametrize("kind", ["self_signed", "unknown_ca"])
async def test_a_refused_certificate_is_a_tls_error_and_not_retried(
    start_rill: StartRill, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    ca = trustme.CA()
    configure = self_signed(ca) if kind == "self_signed" else ca.issue_cert("127.0.0.1").configure_cert
    async with tls_upstream(configure) as (tls_fake, handshakes):
        # The TLS upstream works for a client that trusts its certificate.
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        client_context.check_hostname = kind != "self_signed"  # the CA's certificate names no host
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{tls_fake.url}/chat/completions", json={}, ssl=client_context) as response,
        ):
            assert response.status == 200
        assert len(handshakes) == 1
        tls_fake.requests.clear()

        caplog.set_level(logging.INFO)
        rill = await start_rill(upstream_url=tls_fake.url, **with_good_provider(fake_upstream))
        events = await run_chat(rill)

        assert names(events) == ["meta", "error"]
        error = error_of(events)
        assert error["code"] == "upstream_tls"
        assert error["retryable"] is False
        message = error["message"]
        assert "refused the TLS certificate" in message
        assert tls_fake.url.removeprefix("https://").removesuffix("/v1") in message
        assert "running" not in message  # not "Check that it is running"
        why = "self-signed certificate" if kind == "self_signed" else "unable to get local issuer certificate"
        assert why in message.replace("self signed", "self-signed")  # OpenSSL 1.1 spells it without the hyphen
        assert len(handshakes) == 2  # one attempt (retries = 2 would make three)
        assert tls_fake.requests == []
        assert not [r for r in caplog.records if "retry" in r.getMessage()]
        assert any(r.levelno == logging.WARNING and "TLS" in r.getMessage() for r in caplog.records)
        await assert_still_serves(rill, model="good-chat")


async def test_https_to_a_plain_http_port_is_a_tls_error_and_not_retried(
    start_rill: StartRill, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    https_url = fake_upstream.url.replace("http://", "https://")
    rill = await start_rill(upstream_url=https_url, **with_good_provider(fake_upstream))
    events = await run_chat(rill)

    error = error_of(events)
    assert error["code"] == "upstream_tls"
    assert error["retryable"] is False
    assert "TLS handshake" in error["message"]
    assert "wrong version number" in error["message"]
    assert not [r for r in caplog.records if "retry" in r.getMessage()]
    assert rill.fake.requests == []
    await assert_still_serves(rill, model="good-chat")


# --- redirects --------------------------------------------------------------------------------


@pytest.fixture
async def other_upstream(aiohttp_server: AiohttpServer) -> FakeUpstream:
    """A second fake upstream on another port: another origin."""
    fake = FakeUpstream()
    fake.app.router.add_route("*", "/{tail:.*}", fake._handle)  # any method, any path
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))
    return fake


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_origin_is_refused(rill: Rill, other_upstream: FakeUpstream, status: int) -> None:
    port = other_upstream.url.split(":")[2].split("/")[0]
    target = f"http://127.0.0.1:{port}/steal/{SENTINEL_KEY.upper()}/chat/completions?key={SENTINEL_KEY}#frag"
    rill.fake.script(Reply(status=status, headers={"Location": target}))
    events = await run_chat(rill)

    assert names(events) == ["meta", "error"]
    error = error_of(events)
    assert error["code"] == "upstream_redirect"
    assert error["retryable"] is False
    assert f"127.0.0.1:{port}/steal/***/chat/completions" in error["message"]  # named, scrubbed
    assert "key=" not in error["message"]
    assert "base_url" in error["message"]
    assert SENTINEL_KEY.upper() not in error["message"]
    assert other_upstream.requests == []  # the other host never heard of it
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


@pytest.mark.parametrize(
    "location",
    [
        "http://localhost:{port}/v1/chat/completions",  # the same server, but another host name
        "https://127.0.0.1:{port}/v1/chat/completions",  # another scheme
        "http://127.0.0.1:1/v1/chat/completions",  # another port
    ],
    ids=["host", "scheme", "port"],
)
async def test_origin_is_scheme_host_and_port(rill: Rill, location: str) -> None:
    port = rill.fake.url.split(":")[2].split("/")[0]
    rill.fake.script(Reply(status=307, headers={"Location": location.format(port=port)}))
    events = await run_chat(rill)

    assert error_of(events)["code"] == "upstream_redirect"
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


async def test_a_same_origin_307_is_followed_with_the_same_request(rill: Rill) -> None:
    rill.fake.script(
        Reply(status=307, headers={"Location": "/v1/chat/completions?moved=1"}),
        Reply(status=308, headers={"Location": f"{rill.fake.url}/chat/completions?moved=2"}),
        Reply(chunks=answer(["moved", " here"])),
    )
    events = await run_chat(rill)

    assert text_of(events) == "moved here"
    assert terminal(events).data == {"finish_reason": "stop"}
    first, *others = rill.fake.requests
    assert len(others) == 2
    for other in others:
        assert other.body == first.body
        assert other.headers["Authorization"] == f"Bearer {SENTINEL_KEY}"


async def test_same_origin_redirects_are_bounded(rill: Rill) -> None:
    rill.fake.script(*[Reply(status=307, headers={"Location": "/v1/chat/completions"})] * 10)
    events = await run_chat(rill)

    error = error_of(events)
    assert error["code"] == "upstream_redirect"
    assert error["retryable"] is False
    assert "more than 2 times" in error["message"]
    assert len(rill.fake.requests) == 3  # the request and two redirects; not retried
    await assert_still_serves(rill)


@pytest.mark.parametrize(
    ("status", "headers", "said"),
    [
        (303, {"Location": "/v1/chat/completions"}, "HTTP 303 with a redirect to http://127.0.0.1"),
        (301, {"Location": "/v2/chat/completions"}, "/v2/chat/completions"),
        (307, {}, "names no usable address"),
        (302, {"Location": "http://[bad"}, "names no usable address"),
    ],
    ids=["303", "301", "no_location", "bad_location"],
)
async def test_other_same_origin_redirects_are_refused(
    rill: Rill, status: int, headers: dict[str, str], said: str
) -> None:
    rill.fake.script(Reply(status=status, headers=headers))
    events = await run_chat(rill)

    error = error_of(events)
    assert error["code"] == "upstream_redirect"
    assert said in error["message"]
    assert len(rill.fake.requests) == 1
    await assert_still_serves(rill)


# --- the rejected key: who is told what --------------------------------------------------------

TOKEN = "alice-0123456789abcdefghij"


async def test_a_rejected_key_tells_visitors_to_tell_the_operator(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    rill = await start_rill(environ={"RILL_ACCESS_TOKENS": f"alice:{TOKEN}"})
    await rill.session.close()
    rill.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
    caplog.set_level(logging.INFO)
    body = b'{"error": {"message": "Authentication Fails, Your api key is invalid"}}'
    rill.fake.script(Reply(status=401, body=body))
    events = await run_chat(rill)

    error = error_of(events)
    assert error["code"] == "upstream_auth"
    assert error["retryable"] is False
    message = error["message"]
    assert "this server's API key" in message
    assert "tell whoever runs this Rill" in message
    assert KEY_ENV not in message
    assert "restart" not in message
    assert "Authentication Fails" in message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(KEY_ENV in w and "restart" in w and "401" in w for w in warnings), warnings


async def test_a_rejected_key_tells_a_local_user_what_to_fix(rill: Rill, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rill.fake.script(Reply(status=403, body=b"{}"))
    events = await run_chat(rill)

    message = error_of(events)["message"]
    assert f"Check {KEY_ENV} and restart Rill" in message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(KEY_ENV in w and "403" in w for w in warnings), warnings
