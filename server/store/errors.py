"""The store's errors: refusals a client can act on (ApiError, 4xx), the database being
unreachable for now (StoreUnavailable, 503), and a database Rill must not start on."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.http.errors import ApiError

log = logging.getLogger(__name__)


class StoreOpenError(Exception):
    """A database Rill must not start on (corrupt, newer than this code, unreachable):
    one line for the operator; `python -m server` exits 2 with it."""


class ConversationExists(Exception):
    """A write that was to make a conversation found it there already: nothing written;
    the caller reads it and tries the usual way."""


class StoreUnavailable(ApiError):
    """The database is down, locked or full right now; the same call later may work."""

    retryable = True

    def __init__(self, message: str = "The conversation store is unavailable right now; try again shortly.") -> None:
        super().__init__(503, "storage_unavailable", message)


def not_found(what: str = "conversation") -> ApiError:
    if what == "message":
        return ApiError(404, "message_not_found", "There is no such message in this conversation.")
    return ApiError(404, "conversation_not_found", "There is no such conversation.")


def bad_id(field: str) -> ApiError:
    return ApiError(400, "bad_id", f"{field} must be 1 to 64 letters, digits, '_' or '-'.")


def bad_message(reason: str) -> ApiError:
    return ApiError(400, "bad_message", reason)


def bad_document(reason: str) -> ApiError:
    return ApiError(400, "bad_document", f"Not a Rill conversations export: {reason}")


def too_long(limit: int) -> ApiError:
    return ApiError(413, "message_too_long", f"A message is longer than the {limit} characters the server accepts.")


# PostgreSQL error classes that mean "not now" rather than "never": connection exceptions,
# insufficient resources (disk full, too many connections), system errors (I/O), and the
# server shutting down, crashed, or still starting up. asyncpg reports them as plain errors.
UNAVAILABLE_CLASSES = ("08", "53", "58")
UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03"})


def _unavailable(error: BaseException) -> bool:
    from sqlalchemy import exc  # loaded with the store: this module also serves a process without one

    if isinstance(error, exc.DBAPIError):
        # Locked, disk full, connection refused or dropped, server shutting down.
        if error.connection_invalidated or isinstance(error, exc.OperationalError | exc.InterfaceError):
            return True
        state = getattr(error.orig, "sqlstate", None)
        return isinstance(state, str) and (state[:2] in UNAVAILABLE_CLASSES or state in UNAVAILABLE_STATES)
    # Reaching the server failed before the driver had a connection to wrap it in.
    return isinstance(error, OSError | TimeoutError | exc.TimeoutError)


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Database outages become StoreUnavailable; the engine's pool reconnects by itself
    (pre-ping) once the database is back, so nothing here needs to be reopened."""
    try:
        yield
    except Exception as error:
        if not _unavailable(error):
            raise
        log.warning("conversation store unavailable: %s", _one_line(error))
        raise StoreUnavailable() from error


def _one_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error) or type(error).__name__
    return text.splitlines()[0][:300]
