"""Conversations stored on the server: SQLite by default, PostgreSQL by configuration.

Its names are loaded when first used (PEP 562): SQLAlchemy and the rest of the store cost
a process about 19 MB, which one with [storage] off never pays."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import AnswerWrite, Saved
    from .errors import ConversationExists, StoreOpenError, StoreUnavailable
    from .store import Store, open_store
    from .validation import StoreLimits

_HOMES = {
    "AnswerWrite": "batch",
    "Saved": "batch",
    "ConversationExists": "errors",
    "StoreOpenError": "errors",
    "StoreUnavailable": "errors",
    "Store": "store",
    "open_store": "store",
    "StoreLimits": "validation",
}

# Spelled out, as linters and type checkers read it (they do not run the module).
__all__ = [
    "AnswerWrite",
    "ConversationExists",
    "Saved",
    "Store",
    "StoreLimits",
    "StoreOpenError",
    "StoreUnavailable",
    "open_store",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # asked once
    return value
