"""The optional daily token budget per access token. The ledger survives restarts
when Rill has a state directory (systemd's StateDirectory= gives it one)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .generation import Generation

log = logging.getLogger(__name__)

LEDGER_FILE = "usage.json"
_CHARS_PER_TOKEN = 4  # the usual rough figure, for answers that ended without usage


def tokens_used(generation: Generation) -> int:
    """What the provider billed for a generation, or an estimate when it never said
    (a Stop or a cut stream ends before the usage chunk)."""
    usage = generation.usage or {}
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    prompt_chars = sum(len(m.get("content", "")) for m in generation.request.messages)
    pieces = sum(1 for event in generation.events if event.name in ("delta", "reasoning"))
    return math.ceil(prompt_chars / _CHARS_PER_TOKEN) + pieces


class DailyBudget:
    """Model tokens (prompt + answer) each access token may use per UTC day."""

    def __init__(
        self, limit: int, state_dir: Path | None, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.limit = limit  # 0: no budget
        self._path = state_dir / LEDGER_FILE if state_dir is not None else None
        self._clock = clock
        self._day = ""
        self._used: dict[str, int] = {}
        if self.enabled:
            self._load()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def remaining(self, name: str) -> int:
        self._roll()
        return max(0, self.limit - self._used.get(name, 0))

    def used(self, name: str) -> int:
        self._roll()
        return self._used.get(name, 0)

    def seconds_to_reset(self) -> int:
        now = self._clock()
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
        return max(1, math.ceil((midnight - now).total_seconds()))

    def generation_ended(self, generation: Generation) -> None:
        if self.enabled and generation.owner is not None:
            self.charge(generation.owner, tokens_used(generation))

    def charge(self, name: str, tokens: int) -> None:
        self._roll()
        self._used[name] = self._used.get(name, 0) + tokens
        self._save()

    def _roll(self) -> None:
        day = self._clock().date().isoformat()
        if day != self._day:
            self._day, self._used = day, {}

    def _load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            ledger = json.loads(self._path.read_text(encoding="utf-8"))
            day, used = ledger["day"], ledger["used"]
            if not isinstance(day, str) or not all(isinstance(v, int) for v in used.values()):
                raise ValueError("unexpected contents")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("budget ledger %s is unreadable (%s): today's usage starts from zero", self._path, exc)
            return
        self._day, self._used = day, dict(used)
        self._roll()  # a ledger from an earlier day counts for nothing

    def _save(self) -> None:
        if self._path is None:
            return
        partial = self._path.with_suffix(".tmp")
        try:
            partial.write_text(json.dumps({"day": self._day, "used": self._used}), encoding="utf-8")
            os.replace(partial, self._path)  # never a half-written ledger, even on a crash
        except OSError as exc:
            log.warning("cannot save the budget ledger %s: %s", self._path, exc)
