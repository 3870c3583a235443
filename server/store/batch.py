"""The answer writer's batched flush: the latest text of every answer streaming at once,
in one transaction and one statement per table (executemany), so a hundred answers cost
one round trip to the database rather than a hundred transactions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from . import shapes
from .schema import conversations, messages


@dataclass(slots=True)
class AnswerWrite:
    """One answer's state to write. `saved_bytes`: its content + reasoning bytes as of its
    last write that landed (as added, for the first), so the conversation's byte count
    moves by the difference without reading the old text back."""

    owner: str
    conversation: str
    message: str
    content: str
    reasoning: str
    last_event_id: int
    saved_bytes: int
    status: str = "streaming"
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    keys: tuple[int, int] | None = None  # (conversation pk, message pk), found on the first write

    @property
    def bytes(self) -> int:
        return shapes.text_bytes(self.content, self.reasoning)


@dataclass(slots=True)
class Saved:
    gone: list[AnswerWrite]  # their message no longer exists (the conversation was deleted)
    messages: dict[int, dict[str, Any]]  # the ended answers as stored, by message pk
    summaries: dict[int, dict[str, Any]]  # their conversations' summaries, by conversation pk


_SET_ANSWER = (
    update(messages)
    .where(messages.c.pk == bindparam("m_pk"))
    .values(
        content=bindparam("m_content"),
        reasoning=bindparam("m_reasoning"),
        last_event_id=bindparam("m_last_event_id"),
        status=bindparam("m_status"),
        finish_reason=bindparam("m_finish_reason"),
        error=bindparam("m_error"),
        usage=bindparam("m_usage"),
        updated=bindparam("m_updated"),
    )
)
_GROW_CONVERSATION = (
    update(conversations)
    .where(conversations.c.pk == bindparam("c_pk"))
    .values(updated=bindparam("c_updated"), bytes=conversations.c.bytes + bindparam("c_delta"))
)


# Built once: building a statement costs more CPU than running it.
_KEYS = (
    select(conversations.c.pk, messages.c.pk)
    .select_from(conversations.join(messages, messages.c.conversation_pk == conversations.c.pk))
    .where(
        conversations.c.owner == bindparam("owner"),
        conversations.c.id == bindparam("cid"),
        messages.c.id == bindparam("mid"),
    )
)
_PRESENT = select(messages.c.pk).where(messages.c.pk.in_(bindparam("pks", expanding=True)))
_ENDED_MESSAGES = (
    shapes.message_select()
    .add_columns(messages.c.pk.label("m_pk"))
    .where(messages.c.pk.in_(bindparam("pks", expanding=True)))
)
_ENDED_SUMMARIES = (
    shapes.summary_select()
    .add_columns(conversations.c.pk.label("c_pk"))
    .where(conversations.c.pk.in_(bindparam("pks", expanding=True)))
)


def _keys(connection: Connection, write: AnswerWrite) -> tuple[int, int] | None:
    params = {"owner": write.owner, "cid": write.conversation, "mid": write.message}
    row = (connection.execute(_KEYS, params)).first()
    return None if row is None else (int(row[0]), int(row[1]))


def save_answers(connection: Connection, writes: list[AnswerWrite], now: int) -> Saved:
    """Writes every answer's text, and the ending of those that have one (never refused
    for quota: the answers were accepted)."""
    gone: list[AnswerWrite] = []
    live: list[AnswerWrite] = []
    for write in writes:
        if write.keys is None:
            write.keys = _keys(connection, write)
    known = [w.keys[1] for w in writes if w.keys is not None]
    present = set((connection.execute(_PRESENT, {"pks": known})).scalars())
    for write in writes:
        (live if write.keys is not None and write.keys[1] in present else gone).append(write)
    saved = Saved(gone, {}, {})
    if not live:
        return saved
    # Conversations first, then their messages, each in key order: the order DELETE takes
    # its locks in (the conversation, then its messages), so the two never deadlock.
    live.sort(key=lambda w: w.keys)  # type: ignore[arg-type, return-value]
    connection.execute(
        _GROW_CONVERSATION,
        [{"c_pk": w.keys[0], "c_updated": now, "c_delta": w.bytes - w.saved_bytes} for w in live],  # type: ignore[index]
    )
    connection.execute(
        _SET_ANSWER,
        [
            {
                "m_pk": w.keys[1],  # type: ignore[index]
                "m_content": shapes.storable(w.content),
                "m_reasoning": shapes.storable(w.reasoning),
                "m_last_event_id": w.last_event_id,
                "m_status": w.status,
                "m_finish_reason": None if w.finish_reason is None else w.finish_reason[:32],
                "m_error": shapes.dumps(w.error),
                "m_usage": shapes.dumps(w.usage),
                "m_updated": now,
            }
            for w in live
        ],
    )
    ended = [w for w in live if w.status != "streaming"]
    if ended:
        message_pks = [w.keys[1] for w in ended]  # type: ignore[index]
        rows = connection.execute(_ENDED_MESSAGES, {"pks": message_pks})
        saved.messages = {int(row._mapping["m_pk"]): shapes.message(row) for row in rows}
        conversation_pks = sorted({w.keys[0] for w in ended})  # type: ignore[index]
        rows = connection.execute(_ENDED_SUMMARIES, {"pks": conversation_pks})
        saved.summaries = {int(row._mapping["c_pk"]): shapes.summary(row) for row in rows}
    return saved
