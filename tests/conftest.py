"""Fixtures: the real Rill app on a real AppRunner (the same options as `python -m
server`), in front of a scripted fake upstream on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer
from playwright.async_api import Browser, async_playwright
from yarl import URL

from server.app import create_app
from server.config import Config, parse_config
from server.http.httpserver import start_server
from server.keys import REGISTRY
from server.relay.registry import GenerationRegistry

from .browser import WatchedPage, launch, watch
from .fakes import FakeUpstream, StreamReader

# Stands in for a real API key: it must never show up anywhere outside the server.
SENTINEL_KEY = "sk-rill-sentinel-5f3c9a1e7d2b4c6a"
KEY_ENV = "FAKE_API_KEY"

CHECKOUT = Path(__file__).resolve().parents[1]
LISTEN_FD = 3  # where systemd puts the first socket it passes (socket activation)


def server_env(config: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a real `python -m server` in a test: this checkout's code, the
    test's config and port, the sentinel API key (never one from the developer's shell,
    nor any RILL_ setting), and a state directory of its own."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("RILL_")}
    return (
        env
        | {
            "RILL_CONFIG": str(config),
            "RILL_PORT": str(port),
            "RILL_STATE_DIR": str(config.parent / f"state-{port}"),  # never the real ~/.local/state
            KEY_ENV: SENTINEL_KEY,
            "PYTHONPATH": str(CHECKOUT),
        }
        | extra
    )


async def spawn_server(
    env: dict[str, str], cwd: Path, log: IO[bytes], listener: socket.socket | None = None
) -> asyncio.subprocess.Process:
    """`python -m server` in `cwd` (no stray .env from the checkout), its output in `log`
    (a file, not a pipe: a pipe nobody drains fills up under load and blocks the logs).
    With `listener`, on that socket as systemd passes one: fd 3, $LISTEN_FDS, and
    $LISTEN_PID naming the process (only known in it: set there, then exec keeps the pid)."""
    args: list[str] = ["-m", "server"]
    extra: dict[str, Any] = {}
    if listener is not None:
        run = (
            "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
            "os.execv(sys.executable, [sys.executable, '-m', 'server'])"
        )
        args, env = ["-c", run], env | {"LISTEN_FDS": "1"}
        fd = listener.fileno()
        extra = {"pass_fds": (LISTEN_FD,), "preexec_fn": lambda: os.dup2(fd, LISTEN_FD)}
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=cwd, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, **extra
    )


BASE_DOCUMENT: dict[str, Any] = {
    "default_model": "fake-chat",
    "providers": [
        {
            "name": "fake",
            "label": "Fake upstream",
            "base_url": "http://127.0.0.1:9/v1",  # replaced by the fake upstream's address
            "api_key_env": KEY_ENV,
            "models": [
                {
                    "id": "fake-chat",
                    "upstream_id": "fake-model",
                    "label": "Fake chat",
                    "extra": {"thinking": {"type": "disabled"}},
                },
                {"id": "fake-reasoner", "upstream_id": "fake-model-r", "label": "Fake reasoner", "reasoning": True},
            ],
        }
    ],
    "server": {"shutdown_timeout": 5.0},
    "timeouts": {"connect": 2.0, "idle_read": 5.0, "first_token": 10.0, "max_generation": 30.0},
    "stream": {
        "heartbeat_interval": 15.0,
        "liveness_interval": 0.1,
        "resume_grace": 5.0,
        "finished_ttl": 60.0,
        "send_timeout": 5.0,
    },
    "upstream": {"retries": 2, "retry_backoff": 0.01},
    # The rate and stream limits have their own tests.
    "limits": {"generations_per_minute": 10_000, "max_streams_per_client": 10_000},
    "demo": {"tokens_per_second": 2000.0, "reasoning_tokens_per_second": 2000.0},
}


@pytest.fixture(autouse=True)
def _private_state_home(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every `python -m server` a test starts keeps its state (and its SQLite conversations)
    in a directory of its own, never in the real ~/.local/state/rill that every run (and
    every branch's schema) would share."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(
    upstream_url: str, *, key: bool = True, environ: dict[str, str] | None = None, **sections: Any
) -> Config:
    document = _merge(BASE_DOCUMENT, sections)
    document["providers"][0]["base_url"] = upstream_url
    return parse_config(document, ({KEY_ENV: SENTINEL_KEY} if key else {}) | (environ or {}))


@dataclass
class Rill:
    """A running Rill server plus a client session to talk to it."""

    app: web.Application
    runner: web.AppRunner
    url: URL
    session: aiohttp.ClientSession
    fake: FakeUpstream
    readers: list[StreamReader] = field(default_factory=list)

    @property
    def registry(self) -> GenerationRegistry:
        return self.app[REGISTRY]

    async def post_chat(self, body: dict[str, Any] | None = None, **fields: Any) -> tuple[int, Any]:
        payload = body if body is not None else {"messages": [{"role": "user", "content": "Hi"}], **fields}
        async with self.session.post(self.url / "api/chat", json=payload) as response:
            return response.status, await response.json()

    async def start_chat(self, **fields: Any) -> str:
        status, body = await self.post_chat(**fields)
        assert status == 201, body
        return str(body["id"])

    async def open_stream(
        self, generation_id: str, last_event_id: str | None = None, *, query: bool = False
    ) -> StreamReader:
        headers = {}
        url = self.url / f"api/chat/{generation_id}/events"
        if last_event_id is not None:
            if query:
                url = url.with_query(last_event_id=last_event_id)
            else:
                headers["Last-Event-ID"] = last_event_id
        response = await self.session.get(url, headers=headers)
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        reader = StreamReader(response)
        self.readers.append(reader)
        return reader

    async def close(self) -> None:
        for reader in self.readers:
            reader.response.close()
        await self.session.close()
        await self.runner.cleanup()


StartRill = Callable[..., Awaitable[Rill]]


async def serve(app: web.Application, config: Config) -> tuple[web.AppRunner, URL]:
    runner = await start_server(app, config, "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    return runner, URL.build(scheme="http", host=host, port=port)


@pytest.fixture
async def fake_upstream(aiohttp_server: AiohttpServer) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))
    return fake


@pytest.fixture
async def start_rill(
    fake_upstream: FakeUpstream, request: pytest.FixtureRequest, tmp_path: Any
) -> AsyncIterator[StartRill]:
    started: list[Rill] = []
    # The page's tests run against what an install does by default: conversations kept on
    # the server, in SQLite (automatic titles off: they would be one more upstream request).
    # A test passes storage={"enabled": False} for the page without server history.
    page_test = request.module.__name__.rpartition(".")[2].startswith("test_ui_")

    async def start(
        *, key: bool = True, upstream_url: str | None = None, environ: dict[str, str] | None = None, **sections: Any
    ) -> Rill:
        if page_test and "storage" not in sections:
            sections["storage"] = {"url": f"sqlite:///{tmp_path}/rill-{len(started)}.db", "auto_titles": False}
        config = make_config(upstream_url or fake_upstream.url, key=key, environ=environ, **sections)
        app = create_app(config)
        runner, url = await serve(app, config)
        rill = Rill(app, runner, url, aiohttp.ClientSession(), fake_upstream)
        started.append(rill)
        return rill

    yield start
    for rill in started:
        await rill.close()


@pytest.fixture
async def rill(start_rill: StartRill) -> Rill:
    return await start_rill()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll a condition the test cannot await directly (state inside the server)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        yield browser
        await browser.close()


OpenPage = Callable[..., Awaitable[WatchedPage]]


@pytest.fixture
async def open_page(browser: Browser) -> OpenPage:
    """Opens the chat page of a running Rill in a fresh browser context (empty storage)."""

    async def open_page(rill: Rill, **context_options: Any) -> WatchedPage:
        context = await browser.new_context(**context_options)
        page = await context.new_page()
        watched = await watch(page)
        await page.goto(str(rill.url))
        await page.wait_for_selector("#model option[value]:not([value=''])", state="attached")
        return watched

    return open_page


async def wait_healthy(url: URL, process: asyncio.subprocess.Process | None = None, timeout: float = 15.0) -> None:
    """Until a Rill process started by a test answers /healthz (it fails if the process exits)."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            assert process is None or process.returncode is None, "Rill did not start"
            try:
                async with session.get(url / "healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """Stands in for systemd's $NOTIFY_SOCKET (abstract, so no path length limit)."""
    name = f"@rill-test-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        sock.setblocking(False)
        yield name, sock


@pytest.fixture
def open_ui(open_page: OpenPage) -> OpenPage:
    """open_page, with waits that fail after 10 s rather than Playwright's 30."""

    async def open_ui(rill: Rill, **context_options: Any) -> WatchedPage:
        ui = await open_page(rill, **context_options)
        ui.page.set_default_timeout(10_000)
        return ui

    return open_ui


# -- PostgreSQL: a throwaway cluster per test session, a fresh database per test ----------


@dataclass
class PostgresServer:
    """A real PostgreSQL (Debian's package) in a temp dir on a free port; tests may stop
    and start it again on the same port to play "the database restarts"."""

    bin: str
    directory: str
    port: int
    user: str = "rill"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = list(args)
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = f"{self.directory}/log"
        self._run(f"{self.bin}/pg_ctl", "-D", f"{self.directory}/data", "-l", log, "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(f"{self.bin}/pg_ctl", "-D", f"{self.directory}/data", "-m", mode, "-w", "stop")

    def psql(self, sql: str, database: str = "postgres") -> None:
        url = f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True, capture_output=True)


def _postgres_bin() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or shutil.which("psql") is None:
        # Never a skip: CI installs the package (.ci/run), so a missing one is a broken setup.
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql): the store's tests need it")
    return os.path.dirname(found[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    binaries = _postgres_bin()
    directory = tempfile.mkdtemp(prefix="rill-pg-")
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
    server = PostgresServer(binaries, directory, free_port())
    server._run(f"{binaries}/initdb", "-D", f"{directory}/data", "-A", "trust", "-U", server.user, "--no-sync")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # a test left it stopped
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.psql(f"CREATE DATABASE {name} TEMPLATE template0")
    return f"postgresql://{postgres_server.user}@127.0.0.1:{postgres_server.port}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Both backends: a SQLite file, and a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/rill.db"
    return str(request.getfixturevalue("postgres_url"))


# -- Redis: a throwaway server per test session, emptied for each test ---------------------


@dataclass
class RedisServer:
    """A real redis-server (Debian's package) on a free loopback port, keeping nothing on
    disk; tests may stop it and start it again on the same port ("Redis restarts")."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            # Never a skip: CI installs the package (.ci/run), so a missing one is a broken setup.
            pytest.fail("Redis is not installed (apt-get install redis-server): the shared mode's tests need it")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def command(self, *words: str) -> bytes:
        """One command by hand (RESP), for a test to set things up or look inside."""
        request = f"*{len(words)}\r\n" + "".join(f"${len(word.encode())}\r\n{word}\r\n" for word in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(request.encode())
            return sock.recv(65536)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test (tests run one at a time)."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a test left it stopped
    assert redis_server.command("FLUSHALL").startswith(b"+OK")
    return redis_server.url
