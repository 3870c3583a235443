"""SSEParser against the WHATWG server-sent events rules, split at any byte."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.relay.sse import SSEEvent, SSEEventTooLarge, SSEParser, SSEProtocolError

BOM = b"\xef\xbb\xbf"


def parse(*chunks: bytes, max_line_chars: int | None = None) -> tuple[list[SSEEvent], SSEParser]:
    """Feed every chunk, then EOF; return all events and the parser (for comments / retry_ms)."""
    parser = SSEParser() if max_line_chars is None else SSEParser(max_line_chars=max_line_chars)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.feed_eof())
    return events, parser


def events_of(*chunks: bytes) -> list[SSEEvent]:
    return parse(*chunks)[0]


def byte_by_byte(raw: bytes) -> list[bytes]:
    return [raw[i : i + 1] for i in range(len(raw))]


# --- line endings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"data: a\ndata: b\n\nevent: x\ndata: c\n\n", id="LF"),
        pytest.param(b"data: a\rdata: b\r\revent: x\rdata: c\r\r", id="CR"),
        pytest.param(b"data: a\r\ndata: b\r\n\r\nevent: x\r\ndata: c\r\n\r\n", id="CRLF"),
        pytest.param(b"data: a\r\ndata: b\r\revent: x\ndata: c\n\r\n", id="mixed"),
        pytest.param(b"data: a\rdata: b\n\r\nevent: x\r\ndata: c\r\r", id="mixed-2"),
    ],
)
def test_line_endings(raw: bytes) -> None:
    expected = [SSEEvent(data="a\nb"), SSEEvent(data="c", event="x")]
    assert events_of(raw) == expected
    assert events_of(*byte_by_byte(raw)) == expected


def test_cr_then_cr_is_two_line_ends_not_one() -> None:
    # "\r\r" is a line end followed by an empty line: the event is dispatched.
    assert events_of(b"data: a\r\rdata: b\r\r") == [SSEEvent(data="a"), SSEEvent(data="b")]


def test_lf_then_cr_is_two_line_ends() -> None:
    assert events_of(b"data: a\n\rdata: b\n\r") == [SSEEvent(data="a"), SSEEvent(data="b")]


def test_crlf_split_across_feeds_gives_no_spurious_empty_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: x\r") == []
    # If this LF were taken for an empty line, "a" would be dispatched alone and the type reset.
    assert parser.feed(b"\ndata: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n") == []
    # The blank line arrives as a lone CR: the event must go out right away, not wait for more bytes.
    assert parser.feed(b"\r") == [SSEEvent(data="a\nb", event="x")]
    # The LF completing that CRLF must not be a second (harmless but wrong) empty line either:
    # an `event:` set now must survive until the next dispatch.
    assert parser.feed(b"\nevent: y\r") == []
    assert parser.feed(b"\ndata: c\r\n\r\n") == [SSEEvent(data="c", event="y")]
    assert parser.feed_eof() == []


def test_cr_at_chunk_end_followed_by_empty_chunk_then_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: x\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\ndata: a\r\n\r\n") == [SSEEvent(data="a", event="x")]


def test_cr_at_chunk_end_followed_by_other_text() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"\r") == [SSEEvent(data="a\nb")]


def test_cr_at_chunk_end_followed_by_split_multibyte_character() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\xe4") == []  # the CR, then the first byte of 中
    assert parser.feed(b"\xb8\xad") == []  # "中" is not an LF: nothing must be swallowed
    # "中" is a line with an unknown field; the blank line then dispatches "a"
    assert parser.feed(b"\n\n") == [SSEEvent(data="a")]
    assert parser.feed_eof() == []


def test_crlf_stream_split_everywhere() -> None:
    raw = b"event: x\r\ndata: 1\r\n\r\nid: 7\r\ndata: 2\r\ndata: 3\r\n\r\n"
    expected = [SSEEvent(data="1", event="x"), SSEEvent(data="2\n3", id="7")]
    for cut in range(len(raw) + 1):
        assert events_of(raw[:cut], raw[cut:]) == expected, cut


def test_events_are_returned_as_soon_as_their_blank_line_arrives() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\ndata: b") == [SSEEvent(data="a")]
    assert parser.feed(b"\n\n") == [SSEEvent(data="b")]
    assert parser.feed_eof() == []


# --- fields ------------------------------------------------------------------------------


def test_comments_are_ignored_and_counted() -> None:
    events, parser = parse(b": hello\n:\ndata: a\n: data: not data\n::\n\n: bye\n")
    assert events == [SSEEvent(data="a")]
    assert parser.comments == 5


def test_comment_count_starts_at_zero_and_fields_are_not_comments() -> None:
    events, parser = parse(b"data: a\nfoo: :bar\n\n")
    assert events == [SSEEvent(data="a")]
    assert parser.comments == 0


def test_multiline_data_is_joined_with_lf() -> None:
    assert events_of(b"data: one\ndata: two\ndata:\ndata: four\n\n") == [SSEEvent(data="one\ntwo\n\nfour")]


def test_data_without_space_after_colon() -> None:
    assert events_of(b"data:x\n\n") == [SSEEvent(data="x")]


def test_only_one_leading_space_is_stripped() -> None:
    assert events_of(b"data:  two\n\n") == [SSEEvent(data=" two")]
    assert events_of(b"data:   three \n\n") == [SSEEvent(data="  three ")]
    assert events_of(b"data:\tx\n\n") == [SSEEvent(data="\tx")]
    assert events_of(b"event:  spaced\ndata: a\n\n") == [SSEEvent(data="a", event=" spaced")]


def test_value_keeps_later_colons() -> None:
    assert events_of(b'data: {"a": "b:c"}\n\n') == [SSEEvent(data='{"a": "b:c"}')]


def test_field_without_colon_has_empty_value() -> None:
    assert events_of(b"data\n\n") == [SSEEvent(data="")]
    assert events_of(b"data\ndata\n\n") == [SSEEvent(data="\n")]
    assert events_of(b"data: a\ndata\n\n") == [SSEEvent(data="a\n")]
    # `event` alone sets an empty type, which means "message"
    assert events_of(b"event\ndata: a\n\n") == [SSEEvent(data="a", event="message")]


def test_data_colon_with_nothing_dispatches_empty_event() -> None:
    assert events_of(b"data:\n\n") == [SSEEvent(data="")]
    assert events_of(b"data: \n\n") == [SSEEvent(data="")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert events_of(b"\n\n\r\n\r\r\n\n") == []
    assert events_of(b"event: x\nid: 1\n\n") == []


def test_event_sets_type_and_resets_after_dispatch() -> None:
    raw = b"event: first\ndata: 1\n\ndata: 2\n\nevent: a\nevent: b\ndata: 3\n\n"
    assert events_of(raw) == [
        SSEEvent(data="1", event="first"),
        SSEEvent(data="2", event="message"),
        SSEEvent(data="3", event="b"),
    ]


def test_event_type_resets_even_when_nothing_is_dispatched() -> None:
    assert events_of(b"event: lost\n\ndata: 2\n\n") == [SSEEvent(data="2", event="message")]


def test_event_field_after_data_still_applies() -> None:
    assert events_of(b"data: 1\nevent: late\n\n") == [SSEEvent(data="1", event="late")]


def test_id_persists_across_events() -> None:
    raw = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\ndata: d\n\n"
    assert [e.id for e in events_of(raw)] == ["1", "1", "2", "2"]


def test_id_set_without_data_persists() -> None:
    assert events_of(b"id: 7\n\ndata: x\n\n") == [SSEEvent(data="x", id="7")]


def test_id_after_data_applies_to_that_event() -> None:
    assert events_of(b"data: x\nid: 5\n\n") == [SSEEvent(data="x", id="5")]


def test_empty_id_resets_last_id() -> None:
    raw = b"id: 1\ndata: a\n\nid\ndata: b\n\nid: 3\ndata: c\n\nid:\ndata: d\n\n"
    assert [e.id for e in events_of(raw)] == ["1", "", "3", ""]


def test_id_containing_nul_is_ignored() -> None:
    raw = b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\nid: \x00\ndata: c\n\n"
    assert [e.id for e in events_of(raw)] == ["1", "1", "1"]


def test_id_keeps_spaces_and_unicode() -> None:
    assert events_of("id:  ab c 中\ndata: x\n\n".encode()) == [SSEEvent(data="x", id=" ab c 中")]


@pytest.mark.parametrize(("line", "expected"), [("retry: 1500", 1500), ("retry:0", 0), ("retry: 007", 7)])
def test_retry_with_ascii_digits_sets_reconnection_time(line: str, expected: int) -> None:
    events, parser = parse(f"{line}\n\n".encode())
    assert events == []
    assert parser.retry_ms == expected


@pytest.mark.parametrize(
    "value",
    ["", " ", "  1500", "1500 ", "15x", "-1", "+1", "1.5", "1e3", "0x10", "١٢", "１２", "²", "12\x00"],
)
def test_retry_that_is_not_all_ascii_digits_is_ignored(value: str) -> None:
    _, parser = parse(f"retry: {value}\n\n".encode())
    assert parser.retry_ms is None
    _, parser = parse(f"retry: 250\nretry: {value}\n\n".encode())
    assert parser.retry_ms == 250


def test_retry_without_colon_is_ignored() -> None:
    _, parser = parse(b"retry\n\n")
    assert parser.retry_ms is None


def test_unknown_fields_are_ignored() -> None:
    raw = "foo: bar\nData: x\nDATA: y\ndata : z\ndatas: w\nEvent: e\nID: 9\nretry-ms: 5\nx\ndata: real\n\n"
    events, parser = parse(raw.encode())
    assert events == [SSEEvent(data="real")]
    assert parser.comments == 0
    assert parser.retry_ms is None


def test_unknown_fields_alone_dispatch_nothing() -> None:
    assert events_of(b"foo: bar\n\n") == []


def test_nul_and_control_characters_in_data_are_kept() -> None:
    assert events_of(b"data: a\x00b\x0bc\x0cd\n\n") == [SSEEvent(data="a\x00b\x0bc\x0cd")]


# --- BOM and UTF-8 -------------------------------------------------------------------------


def test_leading_bom_is_stripped() -> None:
    assert events_of(BOM + b"data: a\n\n") == [SSEEvent(data="a")]


def test_leading_bom_split_across_feeds_is_stripped() -> None:
    assert events_of(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [SSEEvent(data="a")]
    assert events_of(b"", BOM, b"data: a\n\n") == [SSEEvent(data="a")]
    assert events_of(*byte_by_byte(BOM + b"data: a\n\n")) == [SSEEvent(data="a")]


def test_only_one_leading_bom_is_stripped() -> None:
    # The second BOM becomes part of the field name, which is then unknown.
    assert events_of(BOM + BOM + b"data: a\n\ndata: b\n\n") == [SSEEvent(data="b")]


def test_bom_later_in_the_stream_is_not_stripped() -> None:
    assert events_of(b"data: a\n\n" + BOM + b"data: b\n\ndata: c\n\n") == [SSEEvent(data="a"), SSEEvent(data="c")]
    # ...not even when it starts a later chunk
    assert events_of(b"data: a\n\n", BOM + b"data: b\n\n") == [SSEEvent(data="a")]
    # ...nor when the stream started with a line end
    assert events_of(b"\n" + BOM + b"data: b\n\n") == []


def test_bom_inside_a_value_is_kept() -> None:
    assert events_of(BOM + b"data: " + BOM + b"x\n\n") == [SSEEvent(data="\ufeffx")]


MULTIBYTE = "中文 字 😀 👩‍💻 é ß 𝄞"


def test_multibyte_characters_split_at_every_byte() -> None:
    raw = f"event: 事件\ndata: {MULTIBYTE}\nid: 标识🎉\n\n".encode()
    expected = [SSEEvent(data=MULTIBYTE, event="事件", id="标识🎉")]
    assert events_of(raw) == expected
    for cut in range(len(raw) + 1):
        assert events_of(raw[:cut], raw[cut:]) == expected, cut
    assert events_of(*byte_by_byte(raw)) == expected


def test_multibyte_split_across_three_feeds() -> None:
    emoji = "😀".encode()
    assert len(emoji) == 4
    assert events_of(b"data: " + emoji[:1], emoji[1:3], emoji[3:] + b"\n\n") == [SSEEvent(data="😀")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert events_of(b"data: a\xffb\n\n") == [SSEEvent(data="a\ufffdb")]


# --- end of stream -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [b"data: b", b"data: b\n", b"data: b\r", b"data: b\r\n", b"event: x\ndata: b\n", b"data: [DONE]x"],
)
def test_event_without_blank_line_at_eof_is_discarded(tail: bytes) -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\n" + tail) == [SSEEvent(data="a")]
    assert parser.feed_eof() == []


@pytest.mark.parametrize(
    "tail",
    [b"data: [DONE]", b"data: [DONE]\n", b"data: [DONE]\r", b"data: [DONE]\r\n", b"data:[DONE]"],
)
def test_final_done_without_blank_line_is_returned_by_feed_eof(tail: bytes) -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\n" + tail) == [SSEEvent(data="a")]
    assert parser.feed_eof() == [SSEEvent(data="[DONE]")]


def test_final_done_split_byte_by_byte() -> None:
    assert events_of(*byte_by_byte(b"id: 4\ndata: [DONE]")) == [SSEEvent(data="[DONE]", id="4")]


def test_done_with_blank_line_is_returned_once() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]\n\n") == [SSEEvent(data="[DONE]")]
    assert parser.feed_eof() == []


def test_done_joined_with_other_data_at_eof_is_discarded() -> None:
    assert events_of(b"data: [DONE]\ndata: more") == []
    assert events_of(b"data: x\ndata: [DONE]\n") == []


def test_eof_on_empty_stream() -> None:
    assert events_of() == []
    assert events_of(b"") == []
    assert events_of(BOM) == []


# --- limits ----------------------------------------------------------------------------------


def test_line_at_the_limit_is_accepted() -> None:
    line = b"data: " + b"x" * 10  # 16 characters
    assert parse(line + b"\n\n", max_line_chars=16)[0] == [SSEEvent(data="x" * 10)]


def test_complete_oversize_line_raises() -> None:
    parser = SSEParser(max_line_chars=16)
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: " + b"x" * 11 + b"\n\n")


def test_complete_oversize_line_split_across_feeds_raises() -> None:
    parser = SSEParser(max_line_chars=16)
    parser.feed(b"data: xxxxx")
    with pytest.raises(SSEProtocolError):
        parser.feed(b"xxxxxx\n\n")


def test_oversize_partial_line_that_never_ends_raises() -> None:
    parser = SSEParser(max_line_chars=16)
    assert parser.feed(b"data: ") == []
    assert parser.feed(b"0123456789") == []  # exactly 16 characters buffered: still fine
    with pytest.raises(SSEProtocolError):
        parser.feed(b"x")


def test_oversize_comment_line_raises() -> None:
    parser = SSEParser(max_line_chars=16)
    with pytest.raises(SSEProtocolError):
        parser.feed(b":" + b"-" * 40 + b"\n")


def test_limit_is_per_line_not_per_chunk() -> None:
    raw = b"data: abcdefgh\r\n" * 50 + b"\r\n"
    events, _ = parse(raw, max_line_chars=16)
    assert events == [SSEEvent(data="\n".join(["abcdefgh"] * 50))]


def test_limit_counts_characters_not_bytes() -> None:
    value = "中" * 10  # 30 bytes, 16 characters with "data: "
    assert parse(f"data: {value}\n\n".encode(), max_line_chars=16)[0] == [SSEEvent(data=value)]


def test_default_limit_accepts_long_lines() -> None:
    value = "x" * 200_000
    assert events_of(f"data: {value}\n\n".encode()) == [SSEEvent(data=value)]


def test_event_at_the_limit_is_accepted() -> None:
    parser = SSEParser(max_line_chars=16, max_event_chars=12)
    # "abc\ndef\nghi" is 11 characters; counted with a break after each line, 12
    assert parser.feed(b"data: abc\ndata: def\ndata: ghi\n\n") == [SSEEvent(data="abc\ndef\nghi")]


def test_event_over_the_limit_raises_as_its_lines_arrive() -> None:
    """Short lines, many of them: refused at the line that passes the limit, not at the
    blank line, and what the event held is dropped at once."""
    parser = SSEParser(max_line_chars=16, max_event_chars=100)
    for _ in range(9):
        assert parser.feed(b"data: 123456789\n") == []  # 10 characters each
    with pytest.raises(SSEEventTooLarge) as raised:
        parser.feed(b"data: 1\n" * 150_000)  # the rest would be 300,000 characters
    assert "100" in str(raised.value)
    assert raised.value.events == []


def test_events_before_an_oversize_event_in_the_same_chunk_are_kept() -> None:
    parser = SSEParser(max_event_chars=20)
    with pytest.raises(SSEEventTooLarge) as raised:
        parser.feed(b"data: kept\n\n" + b"data:0123456789\n" * 3 + b"\n")
    assert raised.value.events == [SSEEvent(data="kept")]


def test_empty_data_lines_count_toward_the_event_limit() -> None:
    parser = SSEParser(max_event_chars=1000)
    with pytest.raises(SSEEventTooLarge):
        parser.feed(b"data\n" * 2000)  # each adds a line break to the data


def test_the_event_limit_is_per_event() -> None:
    raw = b"data: 123456789\n\n" * 50
    events, _ = parse_with(raw, max_event_chars=20)
    assert events == [SSEEvent(data="123456789")] * 50


def test_single_data_declines_an_event_over_the_limit() -> None:
    parser = SSEParser(max_event_chars=10)
    parser.feed(b": start\n")
    assert parser.single_data(b"data: 12345\n\n") is None  # feed() must refuse it
    with pytest.raises(SSEEventTooLarge):
        parser.feed(b"data: 123456789012\n\n")


def parse_with(raw: bytes, **limits: int) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser(**limits)
    return parser.feed(raw) + parser.feed_eof(), parser


# --- property: any stream, split anywhere ------------------------------------------------------

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ENDINGS = ("\n", "\r", "\r\n")
_SPECIAL = ("\n", "\r", "\r\n", ":", " ", "  ", "中", "文", "😀", "👩‍💻", "é", "\ufeff", "\x00", "[DONE]", "data: ")
_text = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from(_SPECIAL)), max_size=12).map("".join)
_line_text = _text.map(lambda text: _LINE_BREAK.sub("", text))  # names, ids, comments: one line
_UNKNOWN_LINES = ("Data: x", "DATA:y", "data : z", "datas: w", "Event: e", "ID: 9", "foo", "x:", "retry-ms: 5")
_BAD_RETRY = ("", "1.5", "-3", "12a", " 7", "١٢", "１２")


@dataclass(frozen=True)
class Stream:
    raw: bytes
    events: list[SSEEvent]
    comments: int
    retry_ms: int | None


def _field(draw: st.DrawFn, name: str, value: str) -> str:
    """One field line, in any of its equivalent spellings."""
    if value == "" and draw(st.booleans()):
        return name  # no colon at all
    if value.startswith(" ") or draw(st.booleans()):
        return f"{name}: {value}"
    return f"{name}:{value}"


@st.composite
def sse_streams(draw: st.DrawFn) -> Stream:
    specs = draw(st.lists(st.tuples(st.none() | _text, st.none() | _line_text, st.none() | _line_text), max_size=6))
    lines: list[tuple[str, str]] = []  # (kind, text)
    events: list[SSEEvent] = []
    last_id = ""
    for data, name, ident in specs:
        block = [] if data is None else [_field(draw, "data", piece) for piece in _LINE_BREAK.split(data)]
        for field_name, value in (("event", name), ("id", ident)):
            if value is not None:
                block.insert(draw(st.integers(0, len(block))), _field(draw, field_name, value))
        lines.extend(("field", line) for line in block)
        lines.extend(("blank", "") for _ in range(1 + draw(st.integers(0, 2))))
        if ident is not None and "\0" not in ident:
            last_id = ident  # the id buffer persists, whether or not this block dispatches
        if data is not None:
            normalised = "\n".join(_LINE_BREAK.split(data))
            events.append(SSEEvent(data=normalised, event=name or "message", id=last_id))

    # Lines that change no event: comments, unknown fields, retry. They may go anywhere.
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["comment", "unknown", "retry", "bad-retry"]))
        if kind == "comment":
            text = ":" + draw(_line_text)
        elif kind == "unknown":
            text = draw(st.sampled_from(_UNKNOWN_LINES))
        elif kind == "retry":
            text = _field(draw, "retry", str(draw(st.integers(0, 10**6))))
        else:
            text = "retry: " + draw(st.sampled_from(_BAD_RETRY))
        lines.insert(draw(st.integers(0, len(lines))), (kind, text))

    comments = sum(1 for kind, _ in lines if kind == "comment")
    retries = [int(text.partition(":")[2]) for kind, text in lines if kind == "retry"]

    out: list[str] = []
    previous = ""
    for _, text in lines:
        # A lone CR followed by an empty line ended with LF would read as one CRLF: that
        # stream means something else, so give such an empty line a CR or CRLF ending.
        choices = ("\r", "\r\n") if previous == "\r" and text == "" else _ENDINGS
        previous = draw(st.sampled_from(choices))
        out.append(text + previous)
    raw = (BOM if draw(st.booleans()) else b"") + "".join(out).encode("utf-8")
    return Stream(raw=raw, events=events, comments=comments, retry_ms=retries[-1] if retries else None)


def _check(stream: Stream, chunks: list[bytes]) -> None:
    assert b"".join(chunks) == stream.raw
    events, parser = parse(*chunks)
    assert events == stream.events
    assert parser.comments == stream.comments
    assert parser.retry_ms == stream.retry_ms


@settings(max_examples=300, deadline=None)
@given(sse_streams())
def test_property_whole_stream_parses_to_the_model(stream: Stream) -> None:
    _check(stream, [stream.raw])


@settings(max_examples=300, deadline=None)
@given(sse_streams(), st.data())
def test_property_any_split_gives_the_same_events(stream: Stream, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream.raw)), max_size=16), label="cuts"))
    bounds = [0, *cuts, len(stream.raw)]
    chunks = [stream.raw[start:end] for start, end in itertools.pairwise(bounds)]
    _check(stream, chunks)
    whole, _ = parse(stream.raw)
    assert parse(*chunks)[0] == whole


@settings(max_examples=100, deadline=None)
@given(sse_streams())
def test_property_byte_by_byte_gives_the_same_events(stream: Stream) -> None:
    _check(stream, byte_by_byte(stream.raw))


# --- the fast path for a chunk that is one plain `data:` event ----------------------------------


def fast_or_full(chunks: list[bytes]) -> list[SSEEvent]:
    """How the upstream reader consumes a stream: single_data() when it applies, else feed()."""
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        data = parser.single_data(chunk)
        if data is None:
            events.extend(parser.feed(chunk))
        else:
            events.append(SSEEvent(data=data.decode("utf-8", errors="replace"), id=parser.last_event_id))
    events.extend(parser.feed_eof())
    return events


def test_single_data_takes_a_plain_data_event_once_the_stream_has_started() -> None:
    parser = SSEParser()
    assert parser.single_data(b'data: {"a":1}\n\n') is None  # a first chunk may start with a BOM
    assert parser.feed(b'id: 7\ndata: {"a":1}\n\n') == [SSEEvent(data='{"a":1}', id="7")]
    assert parser.single_data('data: {"b":"é"}\n\n'.encode()) == '{"b":"é"}'.encode()
    assert parser.last_event_id == "7"


@pytest.mark.parametrize(
    ("before", "chunk"),
    [
        pytest.param(b"", b"data: a\n\ndata: b\n\n", id="two-events"),
        pytest.param(b"", b"data: a\ndata: b\n\n", id="two-data-lines"),
        pytest.param(b"", b"data: a\r\n\r\n", id="crlf"),
        pytest.param(b"", b"data:a\n\n", id="no-space"),
        pytest.param(b"", b"event: x\ndata: a\n\n", id="named"),
        pytest.param(b"", b"data: a\n", id="no-blank-line"),
        pytest.param(b"data: par", b"data: a\n\n", id="partial-line-held"),
        pytest.param(b"data: a\n", b"data: b\n\n", id="data-line-held"),
        pytest.param(b"event: x\n", b"data: a\n\n", id="event-name-held"),
        pytest.param(b"data: a\n\r", b"data: b\n\n", id="cr-held"),
        pytest.param(b"data: a\n\n:\xc3", b"data: b\n\n", id="half-character-held"),
    ],
)
def test_single_data_declines_anything_else(before: bytes, chunk: bytes) -> None:
    parser = SSEParser()
    parser.feed(b": start\n" + before)
    assert parser.single_data(chunk) is None
    assert fast_or_full([b": start\n" + before, chunk]) == events_of(b": start\n" + before, chunk)


def test_single_data_applies_again_once_a_refused_event_is_dropped() -> None:
    parser = SSEParser(max_event_chars=10)
    parser.feed(b": start\ndata: 01234\n")  # an event's data held: no fast path
    assert parser.single_data(b"data: a\n\n") is None
    with pytest.raises(SSEEventTooLarge):
        parser.feed(b"data: 56789\n")
    assert parser.single_data(b"data: a\n\n") == b"a"  # the refused event left nothing behind


def test_single_data_declines_a_line_over_the_limit() -> None:
    parser = SSEParser(max_line_chars=10)
    parser.feed(b": start\n")
    assert parser.single_data(b"data: 12345\n\n") is None  # 11 characters: feed() must refuse it


@settings(max_examples=300, deadline=None)
@given(sse_streams(), st.data())
def test_property_fast_path_gives_the_same_events(stream: Stream, data: st.DataObject) -> None:
    """Cut at every event boundary (so most chunks are whole events) and anywhere else."""
    bounds = {0, len(stream.raw)}
    bounds.update(match.end() for match in re.finditer(rb"\n\n", stream.raw))
    bounds.update(data.draw(st.lists(st.integers(0, len(stream.raw)), max_size=6), label="cuts"))
    chunks = [stream.raw[start:end] for start, end in itertools.pairwise(sorted(bounds))]
    assert fast_or_full(chunks) == stream.events
