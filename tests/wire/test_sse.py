import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.core.messages import Message
from backchannel.wire.sse import (
    Event,
    EventParser,
    EventStreamTooLong,
    encode_comment,
    encode_event,
    encode_retry,
)

STREAM = (
    b"retry: 2000\n\n"
    b": heartbeat\n\n"
    b"id: 1\ndata: one\n\n"
    b"event: note\ndata: two\ndata: lines\n\n"
    b"id: 3\r\ndata: three\r\n\r\n"
    b"data: four\rid: 4\r\r"
)
EXPECTED = [
    Event("one", "message", "1"),
    Event("two\nlines", "note", "1"),
    Event("three", "message", "3"),
    Event("four", "message", "4"),
]


def parse(chunks: list[bytes]) -> tuple[list[Event], EventParser]:
    parser = EventParser()
    events: list[Event] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        events += parser.events()
    return events, parser


def test_whole() -> None:
    events, parser = parse([STREAM])
    assert events == EXPECTED
    assert parser.retry == 2000
    assert parser.last_event_id == "4"


def test_byte_by_byte() -> None:
    events, _ = parse([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert events == EXPECTED


def test_with_trailing_partial_event() -> None:
    events, parser = parse([STREAM + b"id: 5\ndata: fi"])
    assert events == EXPECTED
    parser.receive_data(b"ve\n\n")
    assert parser.events() == [Event("five", "message", "5")]


def test_bom_unknown_fields_and_no_space_after_colon() -> None:
    events, _ = parse([b"\xef\xbb\xbfdata:x\nfoo: bar\nid\n\n"])
    assert events == [Event("x", "message", "")]


def test_utf8_split_across_chunks() -> None:
    data = "data: héllo ✓\n\n".encode()
    events, _ = parse([data[:8], data[8:14], data[14:]])
    assert events == [Event("héllo ✓")]


def test_limit() -> None:
    parser = EventParser(max_line_bytes=100)
    with pytest.raises(EventStreamTooLong):
        parser.receive_data(b"data: " + b"x" * 200)


# Lone surrogates are not text that UTF-8 can carry; the hub never has any to send.
UNICODE = st.characters(blacklist_categories=("Cs",))


@given(
    st.text(alphabet=UNICODE),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
        max_size=20,
    ),
)
def test_encode_then_parse(data: str, event_id: str) -> None:
    events, _ = parse([encode_event(data, id=event_id)])
    # Line breaks of any kind come back as \n, per the standard.
    assert events == [Event(data.replace("\r\n", "\n").replace("\r", "\n"), "message", event_id)]


def test_encoder_refuses_line_breaks_in_single_line_fields() -> None:
    with pytest.raises(ValueError):
        encode_event("x", id="a\nb")
    with pytest.raises(ValueError):
        encode_event("x", event="a\rb")
    with pytest.raises(ValueError):
        encode_comment("a\nb")


def test_comment_and_retry() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_retry(1500) == b"retry: 1500\n\n"
    events, parser = parse([encode_comment("hi") + encode_retry(1500)])
    assert events == [] and parser.retry == 1500


def test_message_events_parse_back_to_the_message_json() -> None:
    pretty = Message(
        channel="c", seq=42, time_ms=0, content_type="application/json", data=b'{\n  "a": 1\n}'
    )
    events, _ = parse([pretty.sse])
    assert events[0].id == "000000000000002a"
    assert events[0].data == pretty.json.decode()  # a multi-line JSON body is split and rejoined
