"""Where shared mode keeps things in Redis (one prefix, so a Redis can be shared), and how
an answer's events are laid out there."""

from __future__ import annotations

PREFIX = "rill:"

# An answer's events travel as their SSE bytes, exactly as local readers get them, and a
# run of them as those bytes joined: every event ends with the only blank line in it
# (generation.wire_bytes: one data line, JSON without line breaks), so a run splits
# back into events without any framing of its own, and starts with its first id.
EVENT_END = b"\r\n\r\n"
ID_LINE = b"id: "

# An answer's stream holds one entry per write of its owner: its id is 0-<the last
# event's id>, its field `w` the run of events written, and the field `t` on the entry
# that holds the answer's last event.
WIRE_FIELD = b"w"
TERMINAL_FIELD = b"t"
# Stream entries as redis-py gives them without decode_responses: bytes throughout.
Entries = list[tuple[bytes, dict[bytes, bytes]]]

# A process's feed holds one entry per write too, for every answer that write had new
# events of: its id is 0-<the write's sequence number>, each field an answer's id with
# its run of new events, and the field `t` the ids (space-separated) of those that ended.
# A reader on another process follows every answer of one owner with a single read of
# its feed, instead of a read of each answer's stream: the cost of a read is per command
# and per field, not per byte.
FEED_ENDED = b"t"


def events_key(generation_id: str) -> str:
    """The answer's events: a stream whose entry ids are 0-<Rill's event id>."""
    return f"{PREFIX}events:{generation_id}"


def answer_key(generation_id: str) -> str:
    """A hash about the answer: which process owns it, for whom, and how it ended."""
    return f"{PREFIX}answer:{generation_id}"


def feed_key(process: str) -> str:
    """Every write of the process's answers' events, as one stream (see FEED_ENDED)."""
    return f"{PREFIX}feed:{process}"


def control_channel(process: str) -> str:
    """Where a process hears about the answers it owns from other processes: Stop, and
    that a reader there still follows some (STOP + id, READING + ids space-separated)."""
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


def event_id(entry: bytes | str) -> int:
    text = entry.decode() if isinstance(entry, bytes) else entry
    return int(text.partition("-")[2])


def entry(events: list[tuple[int, bytes]], terminal: bool) -> dict[bytes, bytes]:
    """The fields of an answer's stream entry for these events (in order)."""
    fields = {WIRE_FIELD: b"".join(wire for _, wire in events)}
    if terminal:
        fields[TERMINAL_FIELD] = b"1"
    return fields


def first_id(run: bytes) -> int:
    """The id of the first event in a run of events."""
    return int(run[len(ID_LINE) : run.index(b"\r", len(ID_LINE))])


def last_id(run: bytes) -> int:
    """The id of the last event in a run of events."""
    start = run.rfind(EVENT_END + ID_LINE, 0, len(run) - len(EVENT_END))
    start = 0 if start < 0 else start + len(EVENT_END)
    return int(run[start + len(ID_LINE) : run.index(b"\r", start + len(ID_LINE))])


def split(run: bytes) -> list[tuple[int, bytes]]:
    """A run of events as (id, SSE bytes) each."""
    events: list[tuple[int, bytes]] = []
    start = 0
    while start < len(run):
        end = run.index(EVENT_END, start) + len(EVENT_END)
        wire = run[start:end]
        events.append((first_id(wire), wire))
        start = end
    return events


def after(run: bytes, cursor: int) -> bytes:
    """The part of a run of events after event id `cursor`."""
    return b"".join(wire for event_id, wire in split(run) if event_id > cursor)


def events_in(fields: dict[bytes, bytes], cursor: int) -> tuple[list[tuple[int, bytes]], bool]:
    """(an answer's stream entry's events after event id `cursor`, whether it holds the
    answer's last event)."""
    run = fields.get(WIRE_FIELD, b"")
    events = [(event_id, wire) for event_id, wire in split(run) if event_id > cursor]
    return events, TERMINAL_FIELD in fields
