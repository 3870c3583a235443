"""`python -m server`: load the config, configure logging once, serve until SIGTERM/SIGINT.

A stop goes: STOPPING=1 to systemd; not ready (/readyz 503, new answers refused) while
still listening for [server] drain_delay, so a load balancer polling /readyz sees it
and sends nothing new; then the listener closes and live streams end (app.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from aiohttp import web

from server import __version__
from server.app import create_app, stop_accepting
from server.cluster import ClusterOpenError
from server.config import Config, ConfigError, load_config
from server.http.httpserver import ListenError, RillSite, raise_open_file_limit, start_server
from server.keys import REGISTRY
from server.ops.logs import configure_logging
from server.ops.memory import pin_malloc_thresholds, tune_collector
from server.ops.systemd import ListenFdsError, listen_sockets, notify
from server.store import StoreOpenError

log = logging.getLogger("server")


def new_event_loop(choice: str | None) -> tuple[asyncio.AbstractEventLoop, str]:
    """RILL_EVENT_LOOP=asyncio|uvloop; unset: uvloop when it is installed (it relays
    the same stream for about half the CPU), else asyncio's own loop."""
    choice = (choice or "").strip().lower()
    if choice not in ("", "asyncio", "uvloop"):
        raise ConfigError(f"RILL_EVENT_LOOP: must be asyncio or uvloop, got {choice!r}")
    if choice == "uvloop" or (not choice and importlib.util.find_spec("uvloop") is not None):
        try:
            import uvloop
        except ImportError:
            raise ConfigError("RILL_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


def main() -> int:
    configure_logging(os.environ.get("RILL_LOG_LEVEL", "INFO"), os.environ.get("RILL_LOG_FORMAT") == "json")
    pin_malloc_thresholds()  # before create_app: its access tokens' scrypt buffers are 16 MiB each
    try:
        config = load_config()
        app = create_app(config)  # reads the state files, and refuses ones it cannot read
        loop, loop_name = new_event_loop(os.environ.get("RILL_EVENT_LOOP"))
    except ConfigError as exc:
        print(f"rill: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        sockets = listen_sockets()
    except ListenFdsError as exc:
        print(f"rill: socket activation: {exc}", file=sys.stderr)
        return 2
    if len(sockets) > 1:
        print(f"rill: socket activation: systemd passed {len(sockets)} sockets; Rill listens on one", file=sys.stderr)
        return 2
    sock = sockets[0] if sockets else None

    def announce(site_name: str) -> None:
        # Called once the socket listens: the moment to tell systemd.
        how = ", socket from systemd: [server] host and port unused" if sock is not None else ""
        log.info("Rill %s listening on %s (%s event loop%s)", __version__, site_name, loop_name, how)
        tokens = config.access.tokens
        if tokens:
            log.info("access: %d token(s) (%s)", len(tokens), ", ".join(t.name for t in tokens))
        else:
            log.info("access: open to this machine only (no access tokens)")
        notify("READY=1")
        tune_collector()

    raise_open_file_limit()
    try:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(serve(app, config, announce, sock))
    except ListenError as exc:
        print(f"rill: {exc}", file=sys.stderr)
        return 1
    except ClusterOpenError as exc:
        print(f"rill: cannot use Redis for shared mode: {exc}", file=sys.stderr)
        return 2
    except StoreOpenError as exc:
        # A corrupt or newer-than-known database: stop, never recreate or overwrite it.
        print(f"rill: cannot open the conversations' database: {exc}", file=sys.stderr)
        return 2
    return 0


async def serve(
    app: web.Application, config: Config, announce: Callable[[str], None], sock: socket.socket | None = None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    runner = await start_server(app, config, config.server.host, config.server.port, sock)
    try:
        announce(next(iter(runner.sites)).name)
        await stop.wait()
        notify("STOPPING=1")
        stop_accepting(app)
        drain = config.server.drain_delay
        if drain > 0:
            log.info("stopping: not ready, still serving for %g s ([server] drain_delay)", drain)
            stop.clear()  # a second signal ends the drain early
            try:
                async with asyncio.timeout(drain):
                    await stop.wait()
            except TimeoutError:
                pass
        await _finish_in_flight(app, runner, config.server.drain_timeout, stop)
    finally:
        await runner.cleanup()  # closes the listener, then ends streams (app.py _end_streams)
        for signum in signals:
            loop.remove_signal_handler(signum)


async def _finish_in_flight(app: web.Application, runner: web.AppRunner, within: float, stop: asyncio.Event) -> None:
    """[server] drain_timeout: with the listener closed (no new connections; other
    processes behind the load balancer take the new answers), the answers in flight may
    finish, their readers' connections still served, before the rest end with
    server_shutdown. A second signal cuts it short."""
    registry = app[REGISTRY]
    if within <= 0 or not registry.live():
        return
    for site in runner.sites:
        if isinstance(site, RillSite):
            site.close_listener()
    log.info(
        "stopping: listener closed, %d answers in flight may finish within %g s ([server] drain_timeout)",
        len(registry.live()),
        within,
    )
    stop.clear()
    waits = {asyncio.ensure_future(registry.wait_none_live()), asyncio.ensure_future(stop.wait())}
    await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if registry.live():
        log.info("stopping: %d answers still in flight are ended", len(registry.live()))


if __name__ == "__main__":
    sys.exit(main())
