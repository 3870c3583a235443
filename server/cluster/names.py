"""Where shared mode keeps things in Redis (one prefix, so a Redis can be shared)."""

from __future__ import annotations

PREFIX = "rill:"
# An answer's stream holds one entry per write of the owner (the events one event-loop
# turn buffered): its id is 0-<the last event's id>, each field an event's id (ASCII
# digits) with the event's SSE bytes, exactly as local readers get them, and the field
# `t` on the entry that holds the answer's last event.
TERMINAL_FIELD = b"t"
# Stream entries as redis-py gives them without decode_responses: bytes throughout.
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def events_key(generation_id: str) -> str:
    """The answer's events: a stream whose entry ids are 0-<Rill's event id>."""
    return f"{PREFIX}events:{generation_id}"


def answer_key(generation_id: str) -> str:
    """A hash about the answer: which process owns it, for whom, and how it ended."""
    return f"{PREFIX}answer:{generation_id}"


def control_channel(process: str) -> str:
    """Where a process hears about the answers it owns from other processes: Stop, and
    that a reader there still follows one (STOP + id, READING + id)."""
    return f"{PREFIX}control:{process}"


STOP = b"stop:"
READING = b"reading:"


def process_key(process: str) -> str:
    """Exists while the process lives: it renews the key every PROCESS_BEAT seconds."""
    return f"{PREFIX}process:{process}"


PROCESS_BEAT = 1.0  # seconds between renewals
PROCESS_TTL = 3  # seconds: a process silent this long is dead (worker_lost within 5 s)


def entry_id(event_id: int) -> str:
    return f"0-{event_id}"


def entry(events: list[tuple[int, bytes]], terminal: bool) -> dict[bytes, bytes]:
    """The fields of one entry for these events (in order)."""
    fields = {b"%d" % event_id: wire for event_id, wire in events}
    if terminal:
        fields[TERMINAL_FIELD] = b"1"
    return fields


def events_in(fields: dict[bytes, bytes], after: int) -> tuple[list[tuple[int, bytes]], bool]:
    """(the entry's events after event id `after`, whether it holds the last event)."""
    events = [(int(name), wire) for name, wire in fields.items() if name != TERMINAL_FIELD]
    return [(event_id, wire) for event_id, wire in events if event_id > after], TERMINAL_FIELD in fields


def event_id(entry: bytes | str) -> int:
    text = entry.decode() if isinstance(entry, bytes) else entry
    return int(text.partition("-")[2])
