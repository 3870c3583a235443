"""Rill behind a real nginx (Debian's nginx-light) with deploy/nginx/rill.conf, on
loopback: tokens are not held back by the proxy, and resume by Last-Event-ID works."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from .conftest import Rill, StartRill
from .fakes import Reply, StreamReader, answer, free_port, text_of

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
    proxy_temp_path {dir}/proxy;
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


StartProxy = Callable[[Rill], Awaitable[URL]]


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[StartProxy]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(rill: Rill) -> URL:
        port = free_port()
        assert rill.url.port is not None
        site = (
            SITE.read_text()
            .replace("127.0.0.1:8080", f"127.0.0.1:{rill.url.port}")
            .replace("listen 80;", f"listen 127.0.0.1:{port};")
            .replace("listen [::]:80;", "")
        )
        (tmp_path / "site.conf").write_text(site)
        (tmp_path / "nginx.conf").write_text(MAIN_CONFIG.format(dir=tmp_path))
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
