"""deploy/rill.service and rill.socket: valid for systemd (systemd-analyze verify, no
warnings), hardened, given more time to stop than Rill needs to end its streams, and
its port held by the socket unit across restarts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from server.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "rill.service"
SOCKET = ROOT / "deploy" / "rill.socket"


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_passes_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    # Installed, the paths point at the checkout: here, this one (ExecStart must exist).
    unit = tmp_path / "rill.service"
    unit.write_text(UNIT.read_text().replace("/opt/rill", str(ROOT)))
    (tmp_path / "rill.socket").write_text(SOCKET.read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit), str(tmp_path / "rill.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # parse errors are only warnings there


def test_the_unit_is_hardened_and_waits_for_a_clean_stop(tmp_path: Path) -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    # `python -m server` exits 2 on a configuration error: stop at that first clear message.
    assert unit["RestartPreventExitStatus"] == ["2"]
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert unit[key] == [value], key
    assert any(v.startswith("DEEPSEEK_API_KEY:") for v in unit["LoadCredential"])
    assert not any("sk-" in v for values in unit.values() for v in values), "a key in the unit file"
    shutdown_timeout = load_config(environ={}, cwd=tmp_path).server.shutdown_timeout  # the bundled config
    assert float(unit["TimeoutStopSec"][0]) > 2 * shutdown_timeout


def test_the_unit_leaves_room_for_the_drain_and_for_the_connections(tmp_path: Path) -> None:
    unit = settings(UNIT.read_text())
    server = load_config(environ={}, cwd=tmp_path).server
    assert float(unit["TimeoutStopSec"][0]) > server.drain_delay + 2 * server.shutdown_timeout
    # Each connection is a file; Rill lifts its soft limit to this and needs room besides.
    assert int(unit["LimitNOFILE"][0]) >= 2 * server.max_connections


def test_the_nginx_site_states_its_client_timeouts_and_what_each_prevents() -> None:
    site = (ROOT / "deploy" / "nginx" / "rill.conf").read_text().splitlines()
    for directive in ("client_header_timeout", "client_body_timeout", "keepalive_timeout", "send_timeout"):
        (line,) = [line for line in site if line.strip().startswith(directive + " ")]
        assert "#" in line, f"{directive}: say what it prevents"


def test_the_port_is_a_socket_unit_the_service_requires(tmp_path: Path) -> None:
    # systemd holds the port across a restart (socket activation): Rill takes it as fd 3.
    unit, socket_unit = settings(UNIT.read_text()), settings(SOCKET.read_text())
    assert "rill.socket" in unit["Requires"]
    assert "rill.socket" in unit["After"]
    server = load_config(environ={}, cwd=tmp_path).server
    assert socket_unit["ListenStream"] == [f"{server.host}:{server.port}"]  # the bundled config's
    assert int(socket_unit["Backlog"][0]) >= server.max_connections
    assert settings(SOCKET.read_text())["WantedBy"] == ["sockets.target"]
