"""The state directory: where it is (RILL_STATE_DIR, systemd's STATE_DIRECTORY, else the
XDG state home), that start-up proves it usable with one clear line instead of a
traceback, and that a corrupt state file is kept aside rather than overwritten."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from server.access.budget import LEDGER_FILE, DailyBudget
from server.access.gate import REVOKED_FILE, Gate
from server.config import AccessConfig, ConfigError, load_config, parse_access_tokens, prepare_state_dir

from .conftest import make_config, wait_healthy
from .fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
ALICE = "alice-0123456789abcdefghij"
TOKENS = {"RILL_ACCESS_TOKENS": f"alice:{ALICE}"}
# Root reads and writes anything, so as root the process runs with every capability
# dropped: still uid 0 by number, but file modes bind it like any user. (Not
# `setpriv --reuid=nobody`: this interpreter lives under /root, which nobody cannot enter.)
UNPRIVILEGED = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"] if os.geteuid() == 0 else []


def state_dir_of(environ: dict[str, str]) -> tuple[Path | None, str]:
    access = make_config("http://127.0.0.1:9/v1", environ=environ).access
    return access.state_dir, access.state_dir_from


# --- where it is -------------------------------------------------------------------------------


def test_the_state_directory_is_chosen_in_order_of_precedence() -> None:
    everything = {
        "RILL_STATE_DIR": "/srv/rill-state",
        "STATE_DIRECTORY": "/var/lib/rill:/var/lib/other",
        "XDG_STATE_HOME": "/home/ann/.state",
        "HOME": "/home/ann",
    }
    assert state_dir_of(everything) == (Path("/srv/rill-state"), "RILL_STATE_DIR")
    del everything["RILL_STATE_DIR"]
    assert state_dir_of(everything)[0] == Path("/var/lib/rill")  # systemd's StateDirectory=
    del everything["STATE_DIRECTORY"]
    assert state_dir_of(everything)[0] == Path("/home/ann/.state/rill")
    del everything["XDG_STATE_HOME"]
    assert state_dir_of(everything)[0] == Path("/home/ann/.local/state/rill")
    # The XDG spec: a relative XDG_STATE_HOME is ignored.
    assert state_dir_of({"XDG_STATE_HOME": "state", "HOME": "/home/ann"})[0] == Path("/home/ann/.local/state/rill")
    assert state_dir_of({}) == (None, "")  # an explicit environ never reaches the real $HOME


def access_keeping_state(state_dir: Path) -> AccessConfig:
    return AccessConfig(
        tokens=parse_access_tokens(f"alice:{ALICE}", "test"), state_dir=state_dir, state_dir_from="test"
    )


def test_a_missing_state_directory_is_made_private_when_something_is_kept(tmp_path: Path) -> None:
    nothing_kept = AccessConfig(state_dir=tmp_path / "unused")  # no tokens, no budget
    prepare_state_dir(nothing_kept)
    assert not (tmp_path / "unused").exists()

    state = tmp_path / "home/.local/state/rill"
    config = load_config(environ={"HOME": str(tmp_path / "home")} | TOKENS, cwd=tmp_path)
    assert config.access.state_dir == state
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert list(state.iterdir()) == []  # the write test leaves nothing behind

    budget_only = AccessConfig(daily_token_budget=100, state_dir=tmp_path / "budget")
    prepare_state_dir(budget_only)
    assert (tmp_path / "budget").is_dir()


def test_a_state_directory_that_cannot_be_used_is_one_config_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    cases: list[tuple[Path, str]] = [
        (tmp_path / "a-file", "is not a directory"),
        (tmp_path / "a-file/state", "cannot be created (Not a directory)"),
    ]
    for path, problem in cases:
        with pytest.raises(ConfigError) as caught:
            prepare_state_dir(access_keeping_state(path))
        assert str(caught.value).startswith(f"state directory {str(path)!r} (test) {problem}: "), caught.value
        assert "RILL_STATE_DIR" in str(caught.value)  # what to do about it

    # What file modes do to a user that is not root, without depending on who runs this.
    denied = PermissionError(13, "Permission denied")

    def refuse(*_: Any, **__: Any) -> Any:
        raise denied

    usable = tmp_path / "state"
    for target, problem in [("os.listdir", "cannot be read"), ("tempfile.mkstemp", "is not writable")]:
        with monkeypatch.context() as patched:
            patched.setattr(target, refuse)
            with pytest.raises(
                ConfigError, match=rf"^state directory '{usable}' \(test\) {problem} \(Permission denied\)"
            ):
                prepare_state_dir(access_keeping_state(usable))
    prepare_state_dir(access_keeping_state(usable))  # unpatched, it is fine


# --- start-up, as a user that file modes bind ------------------------------------------------


def start_unprivileged(state: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "RILL_PORT": "0"}
    env |= {"RILL_STATE_DIR": str(state)} | TOKENS
    return subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-m", "server"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,  # a start that does not fail would serve until this
        check=False,
    )


def assert_one_config_line(result: subprocess.CompletedProcess[str], beginning: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rill: invalid configuration: {beginning}"), lines[0]


@pytest.mark.parametrize(
    ("mode", "problem"), [(0o000, "cannot be read (Permission denied)"), (0o500, "is not writable (Permission denied)")]
)
def test_an_unusable_state_directory_stops_start_up_with_one_line_and_exit_2(
    tmp_path: Path, mode: int, problem: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=mode)
    state.chmod(mode)
    try:
        result = start_unprivileged(state, tmp_path)
    finally:
        state.chmod(0o700)
    assert_one_config_line(result, f"state directory '{state}' (RILL_STATE_DIR) {problem}: ")


def test_an_unreadable_state_file_stops_start_up_and_is_left_as_it_was(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    revoked = state / REVOKED_FILE
    revoked.write_text('{"abc": 4102444800}')
    revoked.chmod(0o000)  # restored from a backup by root, say
    try:
        result = start_unprivileged(state, tmp_path)
    finally:
        revoked.chmod(0o600)
    assert_one_config_line(result, f"state file '{revoked}' cannot be read (Permission denied): ")
    assert "will not overwrite it" in result.stderr
    assert revoked.read_text() == '{"abc": 4102444800}'
    assert sorted(p.name for p in state.iterdir()) == [REVOKED_FILE]


# --- corrupt files ---------------------------------------------------------------------------


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "server.ops.state" and r.levelno == logging.ERROR]


def test_a_corrupt_ledger_is_kept_aside_and_a_new_one_written_beside_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = tmp_path / LEDGER_FILE
    corrupt = b'{"day": "2026-12-06", "used": {"alice": 12'  # cut short: a full disk, say
    ledger.write_bytes(corrupt)

    before = datetime.now(UTC).replace(microsecond=0)
    budget = DailyBudget(100, tmp_path)
    assert budget.remaining("alice") == 100

    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{LEDGER_FILE}.corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes() == corrupt
    stamp = datetime.strptime(aside[0].name.removeprefix(f"{LEDGER_FILE}.corrupt-"), "%Y%m%dT%H%M%SZ")
    assert before <= stamp.replace(tzinfo=UTC) <= datetime.now(UTC)
    [record] = error_records(caplog)
    assert str(ledger) in record.getMessage()
    assert str(aside[0]) in record.getMessage()
    assert not ledger.exists()

    budget.charge("alice", 7)
    assert json.loads(ledger.read_text())["used"] == {"alice": 7}
    assert aside[0].read_bytes() == corrupt  # still there, untouched


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe not utf-8", b"[]", b'{"day": 20261206, "used": {}}', b'{"day": "2026-12-06", "used": []}', b"{}"],
)
def test_a_ledger_of_the_wrong_shape_counts_as_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    (tmp_path / LEDGER_FILE).write_bytes(content)
    assert DailyBudget(100, tmp_path).remaining("alice") == 100
    [aside] = tmp_path.iterdir()
    assert aside.name.startswith(f"{LEDGER_FILE}.corrupt-")
    assert aside.read_bytes() == content
    assert len(error_records(caplog)) == 1


def test_a_corrupt_sign_out_list_is_kept_aside_and_a_new_one_written_beside_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    revoked = tmp_path / REVOKED_FILE
    revoked.write_bytes(b'{"abc": "soon"}')
    config = make_config("http://127.0.0.1:9/v1", environ=TOKENS | {"RILL_STATE_DIR": str(tmp_path)})
    gate = Gate(config.access)
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(f"{REVOKED_FILE}.corrupt-")]
    assert aside.read_bytes() == b'{"abc": "soon"}'
    [record] = error_records(caplog)
    assert str(revoked) in record.getMessage()
    assert str(aside) in record.getMessage()

    session = gate.issue("alice", 1_000_000.0)
    gate.revoke(session, 1_000_001.0)
    assert json.loads(revoked.read_text()) == {session.session_id: session.expires}
    assert aside.read_bytes() == b'{"abc": "soon"}'


def test_two_corrupt_files_in_one_second_are_both_kept(tmp_path: Path) -> None:
    for content in (b"first", b"second"):
        (tmp_path / LEDGER_FILE).write_bytes(content)
        DailyBudget(100, tmp_path)
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == [b"first", b"second"]


# --- a local run keeps sign-outs across a restart --------------------------------------------


@asynccontextmanager
async def running_rill(env: dict[str, str], cwd: Path) -> AsyncIterator[URL]:
    port = free_port()
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "RILL_PORT": str(port)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=cwd, env=environ | env, stderr=asyncio.subprocess.DEVNULL
    )
    url = URL.build(scheme="http", host="127.0.0.1", port=port)
    try:
        await wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        await process.wait()


async def test_a_local_run_remembers_a_sign_out_across_a_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"  # no RILL_STATE_DIR: the default, under $HOME
    env = {"HOME": str(home)} | TOKENS

    def session_cookie(url: URL, response: aiohttp.ClientResponse) -> dict[str, str]:
        return {"Cookie": f"rill_session={response.cookies['rill_session'].value}", "Origin": str(url.origin())}

    async with running_rill(env, tmp_path) as url, aiohttp.ClientSession() as http:
        async with http.post(url / "api/session", json={"token": ALICE}, headers={"Origin": str(url.origin())}) as r:
            assert r.status == 200
            copied = session_cookie(url, r)
        async with http.delete(url / "api/session", headers=copied) as r:
            assert r.status == 200
    assert (home / ".local/state/rill" / REVOKED_FILE).is_file()

    async with (
        running_rill(env, tmp_path) as url,
        aiohttp.ClientSession() as http,
        http.get(url / "api/session", headers=copied) as r,
    ):
        assert (await r.json())["signed_in"] is False, "a copied cookie works again after a restart"
