"""sd_listen_fds (server/ops/systemd.py): the sockets systemd passes are taken only when
$LISTEN_PID names this process, and anything else there is refused in one line."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from server.ops.systemd import LISTEN_FDS_START, ListenFdsError, listen_sockets


@pytest.fixture
def fd3() -> Iterator[None]:
    """Whatever the test process had at fd 3, kept aside and put back."""
    saved = os.dup(LISTEN_FDS_START)
    try:
        yield
    finally:
        os.dup2(saved, LISTEN_FDS_START)
        os.close(saved)


def test_without_systemd_there_are_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert listen_sockets() == []


def test_sockets_meant_for_another_process_are_not_taken_and_the_variables_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # the parent's, say
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "rill.socket")
    assert listen_sockets() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_a_listening_socket_at_fd_3_is_taken(monkeypatch: pytest.MonkeyPatch, fd3: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        os.dup2(server.fileno(), LISTEN_FDS_START)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        (taken,) = listen_sockets()
        assert taken.fileno() == LISTEN_FDS_START
        assert taken.getsockname() == server.getsockname()
        assert not os.get_inheritable(LISTEN_FDS_START)  # not passed on to a child
        taken.detach()  # fd 3 is the fixture's to put back


def test_a_socket_that_does_not_listen_is_refused(monkeypatch: pytest.MonkeyPatch, fd3: None) -> None:
    with socket.socket() as unbound:
        os.dup2(unbound.fileno(), LISTEN_FDS_START)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        with pytest.raises(ListenFdsError, match="not a listening stream socket"):
            listen_sockets()


def test_a_count_that_is_not_a_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "one")
    with pytest.raises(ListenFdsError, match="LISTEN_FDS"):
        listen_sockets()
