"""Conversations stored on the server: SQLite by default, PostgreSQL by configuration."""

from .batch import AnswerWrite, Saved
from .errors import ConversationExists, StoreOpenError, StoreUnavailable
from .store import Store, open_store
from .validation import StoreLimits

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
