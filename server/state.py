"""Small JSON files in Rill's state directory (systemd's StateDirectory=): written
whole and atomically, read back leniently. Without a state directory nothing is kept."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def load_state(path: Path | None) -> Any:
    """The saved value, or None when there is none or it cannot be read (logged)."""
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("state file %s is unreadable (%s): starting without it", path, exc)
        return None


def save_state(path: Path | None, value: Any) -> None:
    if path is None:
        return
    partial = path.with_suffix(".tmp")
    try:
        partial.write_text(json.dumps(value, separators=(",", ":")), encoding="utf-8")
        os.replace(partial, path)  # never a half-written file, even on a crash
    except OSError as exc:
        log.warning("cannot save state file %s: %s", path, exc)
