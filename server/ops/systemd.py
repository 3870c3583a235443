"""systemd's two protocols Rill speaks: sd_notify for `Type=notify` services (tell
systemd when Rill is ready to serve and when it starts stopping; without $NOTIFY_SOCKET,
not under systemd, it does nothing), and sd_listen_fds for socket activation (the
listening socket systemd holds, deploy/rill.socket, passed in as file descriptor 3: it
stays open while Rill restarts, so connections wait in its queue instead of being
refused)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Sends one state line ("READY=1", "STOPPING=1", ...); True if systemd got it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state, exc)
        return False
    return True


LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first socket systemd passes


class ListenFdsError(Exception):
    """What systemd passed cannot be listened on (one line for the journal)."""


def listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process ($LISTEN_PID is this process,
    $LISTEN_FDS how many, from fd 3 on); [] when not socket-activated. The variables are
    removed either way: they name this process, not a child of it."""
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    for name in ("LISTEN_FDNAMES", "LISTEN_PIDFDID"):
        os.environ.pop(name, None)
    if pid is None or count is None or pid != str(os.getpid()):
        return []
    if not count.isdigit():
        raise ListenFdsError(f"LISTEN_FDS must be a number of sockets, got {count!r}")
    sockets: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ListenFdsError(f"file descriptor {fd} from systemd is not a socket ({exc.strerror})") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()  # left as it came
            raise ListenFdsError(f"file descriptor {fd} from systemd is not a listening stream socket")
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets
