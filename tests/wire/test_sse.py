import pytest
from hypothesis import assume, given
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


SINGLE_LINE = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
    max_size=12,
)
# What a stream is made of: events (with or without id and event name), comments, retry.
PARTS = st.one_of(
    st.builds(
        lambda data, id, event: encode_event(data, id=id, event=event),
        st.text(alphabet=UNICODE, max_size=40),
        st.none() | SINGLE_LINE,
        st.none() | SINGLE_LINE.filter(lambda s: s != ""),
    ),
    SINGLE_LINE.map(encode_comment),
    st.integers(0, 10**6).map(encode_retry),
)


@given(st.lists(PARTS, max_size=8), st.data())
def test_any_chunking_gives_the_same_events(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    whole, whole_parser = parse([stream])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pieces, parser = parse(chunks)
    assert pieces == whole
    assert (parser.retry, parser.last_event_id) == (whole_parser.retry, whole_parser.last_event_id)
    # Every encoded event comes out, nothing else.
    assert len(whole) == sum(part.endswith(b"\n\n") and b"data:" in part for part in parts)


@given(st.lists(st.binary(max_size=40), max_size=10))
def test_arbitrary_bytes_parse_or_hit_the_limit(chunks: list[bytes]) -> None:
    """Whatever a server sends, the parser only ever raises EventStreamTooLong."""
    parser = EventParser(max_line_bytes=64)
    for chunk in chunks:
        try:
            parser.receive_data(chunk)
        except EventStreamTooLong:
            return
        for event in parser.events():
            assert isinstance(event.data, str) and "\r" not in event.data


@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r"]), min_size=4, max_size=4))
def test_every_line_ending_and_their_mix(endings: list[bytes]) -> None:
    a, b, c, d = endings
    assume(not (c == b"\r" and d.startswith(b"\n")))  # that is one CRLF, not two line ends
    stream = b"id: 7" + a + b"data: x" + b + b"data: y" + c + d
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        events, _ = parse(chunks)
        assert events == [Event("x\ny", "message", "7")]
