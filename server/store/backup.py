"""A consistent copy of a live SQLite database (SQLite's online backup API), safe while
Rill writes to it: the copy is one snapshot, and writers are not blocked (WAL)."""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from pathlib import Path

from .errors import StoreOpenError

log = logging.getLogger(__name__)


def backup_sqlite(source: Path, target: Path) -> None:
    """Copy `source` to `target` (replaced atomically when it exists), checked readable."""
    if not source.is_file():
        raise StoreOpenError(f"{source}: no such database file")
    if target.resolve() == source.resolve():
        raise StoreOpenError("the backup must go to another file than the database itself")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        with _connect(source) as from_db, _connect(Path(temporary)) as to_db:
            # pages=-1: all of it in one step, so it is one snapshot of the database.
            from_db.backup(to_db, pages=-1)
            problem = to_db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise StoreOpenError(f"the copy of {source} failed its check: {problem}")
            # A standalone file: no -wal beside it is needed to read it.
            to_db.execute("PRAGMA journal_mode = DELETE")
        os.replace(temporary, target)
    except sqlite3.Error as error:
        raise StoreOpenError(f"cannot back up {source}: {error}") from None
    finally:
        Path(temporary).unlink(missing_ok=True)


class _Connection:
    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None)

    def __enter__(self) -> sqlite3.Connection:
        return self.connection

    def __exit__(self, *_: object) -> None:
        self.connection.close()


def _connect(path: Path) -> _Connection:
    return _Connection(path)
