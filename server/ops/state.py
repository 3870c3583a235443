"""Small JSON files in Rill's state directory: written whole and atomically, read back
carefully. Without a state directory nothing is kept.

A file that cannot be parsed is moved aside (never overwritten: an operator may want
what it held) and Rill starts without it. A file that cannot be read at all (its
owner or mode is wrong) stops start-up instead: writing a fresh one over it would
throw away what it holds without anyone having seen it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from server.config import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


def load_state(path: Path | None, parse: Callable[[Any], T]) -> T | None:
    """`parse` of the saved JSON value, or None when there is none.

    `parse` raises ValueError, TypeError or KeyError for a value of the wrong shape,
    which counts as corrupt. Raises ConfigError when the file exists but cannot be read."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            f"state file {str(path)!r} cannot be read ({exc.strerror or exc}): give it to the user Rill runs as "
            "(or move it away to start without it); Rill will not overwrite it"
        ) from None
    try:
        return parse(json.loads(data.decode("utf-8")))
    except (ValueError, TypeError, KeyError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        _set_aside(path, f"{type(exc).__name__}: {exc}")
        return None


def _set_aside(path: Path, problem: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while aside.exists():  # two in the same second
        number += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    try:
        os.rename(path, aside)
    except OSError as exc:
        raise ConfigError(
            f"state file {str(path)!r} is corrupt and cannot be moved aside ({exc.strerror or exc}): "
            "move it away to start without it; Rill will not overwrite it"
        ) from None
    log.error("state file %s is corrupt (%s): moved it to %s and started without it", path, problem[:200], aside)


def save_state(path: Path | None, value: Any) -> None:
    if path is None:
        return
    partial = path.with_suffix(".tmp")
    try:
        partial.write_text(json.dumps(value, separators=(",", ":")), encoding="utf-8")
        os.replace(partial, path)  # never a half-written file, even on a crash
    except OSError as exc:
        log.warning("cannot save state file %s: %s", path, exc)
