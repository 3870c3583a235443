"""Rill behind a real nginx (Debian's nginx-light) with deploy/nginx/rill.conf, on
loopback: tokens are not held back by the proxy, resume by Last-Event-ID works, and the
site's streaming directives prevent what its comments say they do."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, StreamReader, answer, chunk, free_port, text_of

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "deploy" / "nginx" / "rill.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

MAIN_CONFIG = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {proxy_temp};
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    gzip on;                  # as in Debian's nginx.conf: the site must turn it off for streams
    gzip_types text/event-stream application/json;
    gzip_min_length 1;
    # Ignore Rill's own X-Accel-Buffering: no, so the site's settings alone must stream.
    proxy_ignore_headers X-Accel-Buffering;
    include {dir}/site.conf;
}}
"""


StartProxy = Callable[..., Awaitable[URL]]


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[StartProxy]:
    processes: list[asyncio.subprocess.Process] = []
    # Run as root, nginx's workers are nobody: the temp files they write need a directory
    # nobody can reach (tmp_path's parents are root's only).
    proxy_temp = tempfile.mkdtemp(prefix="rill-nginx-proxy-")
    os.chmod(proxy_temp, 0o777)

    async def start(rill: Rill, site_text: str | None = None) -> URL:
        """nginx in front of `rill` with the shipped site, or with `site_text` instead."""
        port = free_port()
        assert rill.url.port is not None
        site = (
            (SITE.read_text() if site_text is None else site_text)
            .replace("127.0.0.1:8080", f"127.0.0.1:{rill.url.port}")
            .replace("listen 80;", f"listen 127.0.0.1:{port};")
            .replace("listen [::]:80;", "")
        )
        (tmp_path / "site.conf").write_text(site)
        (tmp_path / "nginx.conf").write_text(MAIN_CONFIG.format(dir=tmp_path, proxy_temp=proxy_temp))
        process = await asyncio.create_subprocess_exec(
            NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"
        )
        processes.append(process)
        url = URL.build(scheme="http", host="127.0.0.1", port=port)
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    assert process.returncode is None, (tmp_path / "error.log").read_text()
                    await asyncio.sleep(0.05)
        return url

    yield start
    for process in processes:
        process.terminate()
        await process.wait()
    shutil.rmtree(proxy_temp)


TOKENS = [f"tok{i} " for i in range(12)]
# Without access tokens Rill refuses proxied requests unless told the host is guarded.
PROXY_GUARDED = {"allowed_hosts": ["127.0.0.1"]}


async def test_the_first_token_passes_nginx_before_the_upstream_has_sent_the_last(
    start_rill: StartRill, nginx: StartProxy
) -> None:
    rill = await start_rill(access=PROXY_GUARDED)
    proxy = await nginx(rill)
    rill.fake.script(Reply(chunks=answer(TOKENS, delay=0.15)))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(proxy / "api/chat", json={"messages": [{"role": "user", "content": "Hi"}]}) as r:
            assert r.status == 201
            generation_id = (await r.json())["id"]
        response = await session.get(proxy / f"api/chat/{generation_id}/events", headers={"Accept-Encoding": "gzip"})
        assert response.status == 200
        assert "Content-Encoding" not in response.headers
        reader = StreamReader(response)
        first = await reader.read_until("delta")
        assert first.data["text"] == "tok0 "
        assert not rill.fake.requests[0].closed.is_set(), "the proxy held the first token back"
        events = await reader.read_all()  # every event of the stream, the first one included
        assert text_of(events) == "".join(TOKENS)
        response.close()


async def test_resume_by_last_event_id_through_nginx(start_rill: StartRill, nginx: StartProxy) -> None:
    rill = await start_rill(access=PROXY_GUARDED)
    proxy = await nginx(rill)
    rill.fake.script(Reply(chunks=answer(TOKENS, delay=0.05)))
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy / "api/chat", json={"messages": [{"role": "user", "content": "Hi"}]}) as r:
            generation_id = (await r.json())["id"]
        events_url = proxy / f"api/chat/{generation_id}/events"
        reader = StreamReader(await session.get(events_url))
        seen = [await reader.read_until("delta") for _ in range(3)]
        reader.response.close()  # the connection drops mid-answer

        resumed = StreamReader(await session.get(events_url, headers={"Last-Event-ID": str(seen[-1].id)}))
        rest = await resumed.read_all()  # only what the resumed stream sent
        resumed.response.close()
    assert int(rest[0].id) == int(seen[-1].id) + 1
    assert text_of(seen) + text_of(rest) == "".join(TOKENS)
    assert len(rill.fake.requests) == 1


async def test_sign_in_and_same_origin_checks_work_through_nginx(start_rill: StartRill, nginx: StartProxy) -> None:
    # nginx must pass the browser's Host with its port, or no Origin would ever match.
    token = "alice-0123456789abcdefghij"
    rill = await start_rill(environ={"RILL_ACCESS_TOKENS": f"alice:{token}"})
    proxy = await nginx(rill)
    browser = {"Origin": str(proxy.origin())}
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.post(proxy / "api/session", json={"token": token}, headers=browser) as r:
            assert r.status == 200, await r.text()
        async with session.post(proxy / "api/chat", json=chat, headers=browser) as r:
            assert r.status == 201, await r.text()
            generation_id = (await r.json())["id"]
        reader = StreamReader(await session.get(proxy / f"api/chat/{generation_id}/events"))
        assert text_of(await reader.read_all()) == "Hello world"
        reader.response.close()
        other_port = {"Origin": str(proxy.with_port(proxy.port + 1 if proxy.port else 1).origin())}
        async with session.post(proxy / "api/chat", json=chat, headers=other_port) as r:
            assert r.status == 403
    assert len(rill.fake.requests) == 1


async def test_an_open_rill_refuses_requests_through_nginx(start_rill: StartRill, nginx: StartProxy) -> None:
    # Without tokens, a proxy would hand Rill to the internet, with whatever Host it likes.
    rill = await start_rill()
    proxy = await nginx(rill)
    async with aiohttp.ClientSession() as session:
        for host in (None, "localhost", "127.0.0.1"):
            headers = {"Host": host} if host else {}
            async with session.get(proxy / "api/models", headers=headers) as r:
                assert r.status == 403
                assert (await r.json())["error"]["code"] == "host_not_allowed"


# What the site's comments say each directive prevents, checked against this nginx.
def site_with(buffering: str, gzip: str) -> str:
    text = SITE.read_text()
    assert "proxy_buffering off;" in text
    assert "gzip off;" in text
    return text.replace("proxy_buffering off;", f"proxy_buffering {buffering};").replace("gzip off;", f"gzip {gzip};")


@pytest.mark.parametrize(
    ("buffering", "gzip", "held_back"),
    [("on", "off", False), ("off", "on", False), ("on", "on", True)],
    ids=["buffering-on", "gzip-on", "both-on"],
)
async def test_tokens_are_held_back_only_by_gzip_with_buffering_on(
    start_rill: StartRill, nginx: StartProxy, buffering: str, gzip: str, held_back: bool
) -> None:
    # With HTTP/1.1 to Rill, nginx passes each chunk on as it comes even when it buffers;
    # gzip flushes each one while buffering is off, and holds them back when it is on.
    rill = await start_rill(access=PROXY_GUARDED)
    proxy = await nginx(rill, site_with(buffering, gzip))
    rill.fake.script(Reply(chunks=answer(TOKENS, delay=0.15)))
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy / "api/chat", json={"messages": [{"role": "user", "content": "Hi"}]}) as r:
            generation_id = (await r.json())["id"]
        response = await session.get(proxy / f"api/chat/{generation_id}/events", headers={"Accept-Encoding": "gzip"})
        assert (response.headers.get("Content-Encoding") == "gzip") == (gzip == "on")
        reader = StreamReader(response)
        assert (await reader.read_until("delta")).data["text"] == "tok0 "
        assert rill.fake.requests[0].closed.is_set() == held_back
        response.close()


BIG_ANSWER = 300  # chunks of 100 kB: 30 MB, more than every socket buffer on the way holds


@pytest.mark.parametrize("buffering", ["off", "on"])
async def test_a_stalled_reader_reaches_rill_only_with_buffering_off(
    start_rill: StartRill, nginx: StartProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture, buffering: str
) -> None:
    # Off: nginx reads from Rill only as fast as the client reads, so Rill sees the stall
    # and closes the stream after send_timeout. On: nginx spools the stream to a temp file
    # (up to 1 GB by default) and Rill never knows.
    caplog.set_level(logging.INFO, logger="server.relay.streaming")
    rill = await start_rill(access=PROXY_GUARDED, stream={"send_timeout": 2.0})
    proxy = await nginx(rill, site_with(buffering, "off"))
    rill.fake.script(Reply(chunks=[chunk("x" * 100_000) for _ in range(BIG_ANSWER)]))
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as session, session.post(proxy / "api/chat", json=chat) as r:
        generation_id = (await r.json())["id"]
    assert proxy.port is not None
    with socket.socket() as stalled:  # a reader that asks for the stream, then reads nothing
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", proxy.port))
        stalled.sendall(f"GET /api/chat/{generation_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        error_log = tmp_path / "error.log"
        spooled = "an upstream response is buffered to a temporary file"
        if buffering == "off":
            await wait_for(lambda: "closed a stalled reader" in caplog.text, timeout=20)
            assert spooled not in error_log.read_text()
        else:
            await wait_for(lambda: spooled in error_log.read_text(), timeout=20)
            assert "closed a stalled reader" not in caplog.text


async def test_the_change_feed_passes_nginx_at_once(start_rill: StartRill, nginx: StartProxy, tmp_path: Path) -> None:
    """/api/changes (the sidebar's sync between devices) is an event stream too: a change
    made by one client reaches another's open feed through the proxy at once, not when
    a buffer fills or the stream ends."""
    rill = await start_rill(access=PROXY_GUARDED, storage={"url": f"sqlite:///{tmp_path / 'rill.db'}"})
    proxy = await nginx(rill)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        response = await session.get(proxy / "api/changes", headers={"Accept-Encoding": "gzip"})
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert "Content-Encoding" not in response.headers
        reader = StreamReader(response)
        loop = asyncio.get_running_loop()
        async with session.post(proxy / "api/conversations", json={"id": "phone1", "title": "From the phone"}) as r:
            assert r.status == 201
        created_at = loop.time()
        event = await reader.read_until("conversation", timeout=2.0)
        assert loop.time() - created_at < 1.0
        assert (event.data["id"], event.data["title"]) == ("phone1", "From the phone")
        response.close()
