"""Rill's HTTP listener: aiohttp's server behind the connection table (connections.py),
and aiohttp's own parser refusals answered as JSON.

aiohttp answers a request its parser refuses (a malformed header line, a line too long,
a bad method) with a plain-text 400 that echoes the offending bytes, and logs them at
ERROR with a traceback: an access token read from a file with Windows line endings
(`Authorization: Bearer <token>\\r`) lands in the log and goes back over the wire. Here
they get the JSON error every other refusal gets, name what was wrong without a byte
of it, and are logged at INFO.

Of aiohttp's server, this is the one module that leans on internals (the client side's
are in bodytap.py and upstream.py's _inflating, the direct writes in streaming.py; the
version is pinned in requirements.txt; tests/test_httpserver.py fails if an upgrade
changes these):
- RequestHandler.handle_error(request, status, exc, message) makes the response for a
  parser refusal; RequestHandler has __slots__, so a subclass without slots of its own
  takes over an instance in place (as bodytap.py does with StreamReader);
- BaseSite keeps its asyncio server in `_server`, which its stop() closes and
  AppRunner.addresses reads, as aiohttp's own TCPSite sets it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, InvalidHeader, LineTooLong
from aiohttp.web_protocol import RequestHandler

from server.app import runner_options
from server.config import Config
from server.http.connections import ConnectionLimits, ConnectionTable
from server.http.errors import error_response

log = logging.getLogger(__name__)

# The listen queue: aiohttp's 128 overflows when a few thousand connections arrive at
# once (a flood, or its connections reopening after a deadline), and a real client whose
# connect is dropped tries again only after 1 s. The kernel caps it (net.core.somaxconn).


def _refusal(exc: BaseException | None) -> str:
    """What was wrong, in words that hold none of the request's bytes."""
    if isinstance(exc, LineTooLong):
        return "a request line or header is too long"
    if isinstance(exc, BadHttpMethod):
        return "the request method is not valid"
    if isinstance(exc, InvalidHeader):
        return "a header is malformed"
    if isinstance(exc, HttpProcessingError):
        return "the request is malformed (for example a header line ending in a bare CR)"
    return "the request could not be parsed"


class _JsonRefusals(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400:  # not a parser refusal (Rill's error middleware answers the rest)
            return super().handle_error(request, status, exc, message)
        # exc and message hold the raw line: neither goes anywhere.
        reason = _refusal(exc)
        log.info("refused a malformed request from %s: %s -> 400 bad_request", request.remote, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already on its way")  # as aiohttp does: nothing more to send
        response = error_response(400, "bad_request", f"The request is not valid HTTP: {reason}.")
        response.force_close()
        return response


def _json_refusals(handler: asyncio.Protocol) -> asyncio.Protocol:
    if type(handler) is RequestHandler:  # another class (a future aiohttp's) keeps its own ways
        handler.__class__ = _JsonRefusals
    return handler


class RillSite(web.BaseSite):
    """A TCP listener for an AppRunner whose connections pass the connection table first.
    Like aiohttp's TCPSite, runner.cleanup() closes it before the app's on_shutdown."""

    def __init__(
        self, runner: web.AppRunner, config: Config, host: str, port: int, sock: socket.socket | None = None
    ) -> None:
        super().__init__(runner)
        self._app_runner = runner
        self._host = host
        self._port = port
        self._sock = sock  # a listening socket passed in (socket activation): host and port unused
        self.connections = ConnectionTable(ConnectionLimits.from_config(config, open_file_limit()))

    @property
    def name(self) -> str:
        if self._sock is not None:
            host, port = self._sock.getsockname()[:2]
            return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._app_runner.server
        assert server is not None
        self.connections.start(lambda: _json_refusals(server()))
        loop = asyncio.get_running_loop()
        backlog = max(1024, self.connections.limits.max_connections)
        if self._sock is not None:
            self._server = await loop.create_server(self.connections.protocol, sock=self._sock, backlog=backlog)
        else:
            self._server = await loop.create_server(self.connections.protocol, self._host, self._port, backlog=backlog)

    def close_listener(self) -> None:
        """No new connections from now on; open ones go on being served (a stop that
        lets answers in flight finish). stop() later does the rest. A socket from
        systemd stays open in systemd: new connections wait in its queue for the next
        process instead."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        await super().stop()  # closes the listener; open connections are the runner's to end
        await self.connections.stop()


class ListenError(Exception):
    """The port cannot be listened on (in use, or not allowed): one line, not a traceback."""


async def start_server(
    app: web.Application, config: Config, host: str, port: int, sock: socket.socket | None = None
) -> web.AppRunner:
    """The app on an AppRunner behind a RillSite (on `sock` if given, else host:port):
    `python -m server` and the tests alike. runner.cleanup() stops it: listener first,
    then the app's on_shutdown."""
    runner = web.AppRunner(app, **runner_options(config))
    await runner.setup()
    site = RillSite(runner, config, host, port, sock)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {site.name}: {exc.strerror or exc}") from None
    return runner


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_file_limit() -> int:
    """Lifts the soft open-file limit to the hard one (the unit's LimitNOFILE; a shell's
    is often a soft 1,024 under a far higher hard limit): every connection is a file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft
    return hard
