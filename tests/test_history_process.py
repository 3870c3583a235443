"""`python -m server` with a conversations database it must not start on: exit 2, one
line on stderr, the file left exactly as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run_server(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DEEPSEEK_API_KEY", "CREDENTIALS_DIRECTORY"} and not name.startswith("RILL_")
    }
    env.update({"RILL_PORT": "0", **env_extra})
    return subprocess.run(
        [sys.executable, "-m", "server"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_a_corrupt_database_stops_start_up_with_exit_2(tmp_path: Path) -> None:
    database = tmp_path / "rill.db"
    garbage = b"SQLite format 3\x00" + bytes(range(256)) * 64  # a header, then nonsense
    database.write_bytes(garbage)

    result = run_server({"RILL_STATE_DIR": str(tmp_path)})  # the default database: rill.db there

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rill: cannot open the conversations' database:"), lines[0]
    assert "Traceback" not in result.stderr
    assert database.read_bytes() == garbage  # never recreated or written over


def test_rill_database_url_names_the_database(tmp_path: Path) -> None:
    database = tmp_path / "elsewhere.db"
    database.write_bytes(b"not a database at all" * 100)
    result = run_server({"RILL_STATE_DIR": str(tmp_path / "state"), "RILL_DATABASE_URL": f"sqlite:///{database}"})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "state" / "rill.db").exists()


def test_an_unreachable_postgresql_stops_start_up_without_its_password(tmp_path: Path) -> None:
    result = run_server({"RILL_DATABASE_URL": "postgresql://rill:pw-secret-1@127.0.0.1:9/rill"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rill: cannot open the conversations' database:")
    assert "127.0.0.1:9" in lines[0]
    assert "pw-secret-1" not in result.stderr
