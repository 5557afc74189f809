"""The TCP binary protocol codec and connection state machine (``backchannel.wire.frames``)."""

from __future__ import annotations

import ast
import struct
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from backchannel.wire import frames
from backchannel.wire.frames import (
    AUTH_VERSION,
    CONNECTION_CLOSED,
    DEFAULT_MAX_FRAME,
    MAGIC,
    NEED_DATA,
    TRANSITIONS,
    VERSIONS,
    Auth,
    ClientFrame,
    ClosingError,
    Connection,
    Error,
    Event,
    Frame,
    FrameType,
    Hello,
    LocalProtocolError,
    Message,
    Ok,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    Published,
    RemoteProtocolError,
    Role,
    ServerFrame,
    State,
    Subscribe,
    Unsubscribe,
    Welcome,
    encode,
    encode_message,
)

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
WELCOME = Welcome(version=2, max_frame=DEFAULT_MAX_FRAME, server="backchannel/0.2.0")


# -- Helpers ------------------------------------------------------------------------------------


def open_pair() -> tuple[Connection, Connection]:
    """A client and a server that completed the handshake."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(Hello()))
    assert server.next_event() == Hello()
    client.receive_data(server.send(WELCOME))
    assert client.next_event() == WELCOME
    assert client.state is server.state is State.OPEN
    assert (client.role, server.role) == (Role.CLIENT, Role.SERVER)
    assert client.max_frame == server.max_frame == client.peer_max_frame == DEFAULT_MAX_FRAME
    return client, server


def receiver_for(frame: Frame) -> Connection:
    """A connection in the state where ``frame`` may arrive."""
    if isinstance(frame, Hello):
        return Connection(Role.SERVER)
    if isinstance(frame, Welcome):
        client = Connection(Role.CLIENT)
        client.send(Hello(versions=(frame.version,)))
        return client
    client, server = open_pair()
    return server if isinstance(frame, ClientFrame) else client


def drain(connection: Connection) -> list[Event]:
    """Every event up to and including NEED_DATA or CONNECTION_CLOSED."""
    events: list[Event] = []
    while True:
        event = connection.next_event()
        events.append(event)
        if event is NEED_DATA or event is CONNECTION_CLOSED:
            return events


def raw(code: int, body: bytes, length: int | None = None) -> bytes:
    """A frame built by hand, possibly with a lying length."""
    return struct.pack(">IB", 1 + len(body) if length is None else length, code) + body


def s16(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


# -- Strategies ---------------------------------------------------------------------------------

requests = st.integers(1, U32)
u64s = st.one_of(st.integers(0, U64), st.sampled_from([0, 1, (1 << 63) - 1, 1 << 63, U64]))
texts = st.text(max_size=20)
payloads = st.binary(max_size=64)

client_commands: st.SearchStrategy[ClientFrame] = st.one_of(
    st.builds(Subscribe, request=requests, channel=texts, after=st.none() | u64s),
    st.builds(Unsubscribe, request=requests, channel=texts),
    st.builds(
        Publish,
        request=requests,
        channel=texts,
        content_type=texts,
        idempotency_key=st.none() | st.text(min_size=1, max_size=20),
        data=payloads,
    ),
    st.builds(Ping, request=requests),
    st.builds(Auth, request=requests, token=texts),
)
server_answers: st.SearchStrategy[ServerFrame] = st.one_of(
    st.builds(Ok, request=requests),
    st.builds(Published, request=requests, seq=u64s, time_ms=u64s),
    st.builds(Pong, request=requests),
    st.builds(Message, channel=texts, seq=u64s, time_ms=u64s, content_type=texts, data=payloads),
    st.builds(Error, request=requests, type=texts, detail=texts),
)
all_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, versions=st.lists(st.integers(0, 255), min_size=1, max_size=8).map(tuple)),
    client_commands,
    st.builds(Welcome, version=st.integers(0, 255), max_frame=st.integers(0, U32), server=texts),
    server_answers,
    st.builds(Error, request=st.just(0), type=texts, detail=texts),
)

EXAMPLES: list[Frame] = [
    Hello(),
    Hello(versions=(3, 1, 2)),
    Subscribe(request=1, channel="news", after=None),
    Subscribe(request=U32, channel="news", after=0),
    Subscribe(request=7, channel="", after=U64),
    Unsubscribe(request=2, channel="café/☕"),
    Publish(request=3, channel="news", content_type="application/json", data=b'{"a":1}'),
    Publish(request=4, channel="n", content_type="", idempotency_key="k-1", data=b""),
    Ping(request=5),
    Auth(request=6, token="eyJhbGciOiJIUzI1NiJ9.e30.c2ln"),
    Auth(request=U32, token=""),
    WELCOME,
    Welcome(version=1, max_frame=0, server=""),
    Ok(request=1),
    Published(request=3, seq=42, time_ms=1_700_000_000_000),
    Published(request=U32, seq=U64, time_ms=0),
    Pong(request=5),
    Message(channel="news", seq=42, time_ms=1, content_type="text/plain", data=b"hi\x00\xff"),
    Message(channel="", seq=0, time_ms=U64, content_type="", data=b""),
    Error(request=9, type="invalid-channel", detail="channel names are 1 to 200 characters"),
    Error(request=0, type="shutting-down", detail=""),
]


def example_id(frame: Frame) -> str:
    return repr(frame)[:60]


# -- Round trips --------------------------------------------------------------------------------


def test_examples_cover_every_frame_type() -> None:
    covered = {type(frame) for frame in EXAMPLES}
    assert covered == set(frames._NAMES)


@pytest.mark.parametrize("frame", EXAMPLES, ids=example_id)
def test_round_trip_whole(frame: Frame) -> None:
    receiver = receiver_for(frame)
    receiver.receive_data(encode(frame))
    assert receiver.next_event() == frame
    assert receiver.buffered_bytes == 0


@pytest.mark.parametrize("frame", EXAMPLES, ids=example_id)
def test_round_trip_byte_by_byte(frame: Frame) -> None:
    receiver = receiver_for(frame)
    data = encode(frame)
    for index in range(len(data) - 1):
        receiver.receive_data(data[index : index + 1])
        assert receiver.next_event() is NEED_DATA
    receiver.receive_data(data[-1:])
    assert receiver.next_event() == frame


@pytest.mark.parametrize("frame", EXAMPLES, ids=example_id)
@pytest.mark.parametrize("extra", range(1, 6))
def test_round_trip_with_trailing_data(frame: Frame, extra: int) -> None:
    receiver = receiver_for(frame)
    following = encode(Ping(request=1) if isinstance(frame, ClientFrame) else Pong(request=1))
    receiver.receive_data(encode(frame) + following[:extra])
    assert receiver.next_event() == frame
    if receiver.state is State.CLOSED:  # an ERROR with request 0 ends the connection
        assert receiver.next_event() is CONNECTION_CLOSED
        return
    assert receiver.next_event() is NEED_DATA
    assert receiver.buffered_bytes == extra


@given(frame=all_frames, data=st.data())
def test_any_frame_round_trips_in_any_chunking(frame: Frame, data: st.DataObject) -> None:
    receiver = Connection(Role.SERVER if isinstance(frame, ClientFrame) else Role.CLIENT)
    receiver._enter(State.OPEN)  # decoding only: skip the handshake's rules
    receiver._version = VERSIONS[-1]
    if isinstance(frame, Hello):
        receiver._enter(State.AWAITING_HELLO)
        receiver._versions = tuple(range(256))
    elif isinstance(frame, Welcome):
        receiver._enter(State.AWAITING_WELCOME)
        receiver._offered = (frame.version,)
    encoded = encode(frame)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(encoded) - 1), max_size=6)))
    events: list[Event] = []
    for start, stop in zip([0, *cuts], [*cuts, len(encoded)], strict=True):
        receiver.receive_data(encoded[start:stop])
        events.extend(drain(receiver))
    frames_seen = [e for e in events if e is not NEED_DATA and e is not CONNECTION_CLOSED]
    assert frames_seen == [frame]


def test_several_frames_in_one_chunk() -> None:
    client, server = open_pair()
    sent = [Ping(request=1), Subscribe(request=2, channel="a"), Ping(request=3)]
    server.receive_data(b"".join(client.send(frame) for frame in sent))
    assert drain(server) == [*sent, NEED_DATA]


def test_matches_the_specs_example() -> None:
    # The spec's example gives HELLO and SUBSCRIBE a length one too large (see the module's
    # docstring); the bodies are as written, and OK is byte for byte.
    assert encode(Hello(versions=(1,))) == bytes.fromhex("00000007 01 424b4348 01 01")
    subscribe = Subscribe(request=1, channel="news", after=41)
    expected = "00000014 02 00000001 0004 6e657773 01 0000000000000029"
    assert encode(subscribe) == bytes.fromhex(expected)
    assert encode(Ok(request=1)) == bytes.fromhex("00000005 82 00000001")
    welcome = encode(Welcome(version=1, max_frame=DEFAULT_MAX_FRAME, server="backchannel/0.2.0"))
    assert welcome[4:12] == bytes.fromhex("81 01 00110000 0011")
    message = encode_message("news", 42, 0, "text/plain", b"")
    assert message[4:19] == bytes.fromhex("85 0004 6e657773 000000000000002a")
    assert DEFAULT_MAX_FRAME == 0x110000


@given(
    channel=st.text(max_size=30),
    seq=u64s,
    time_ms=u64s,
    content_type=st.text(max_size=30),
    data=st.binary(max_size=300),
)
def test_encode_message_equals_encode(
    channel: str, seq: int, time_ms: int, content_type: str, data: bytes
) -> None:
    message = Message(
        channel=channel, seq=seq, time_ms=time_ms, content_type=content_type, data=data
    )
    assert encode_message(channel, seq, time_ms, content_type, data) == encode(message)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seq": -1},
        {"seq": U64 + 1},
        {"time_ms": U64 + 1},
        {"channel": "x" * 65536},
        {"content_type": "é" * 32768},
        {"channel": "\ud800"},
    ],
)
def test_encode_message_checks_its_fields(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "channel": "c",
        "seq": 1,
        "time_ms": 1,
        "content_type": "t",
        "data": b"",
        **kwargs,
    }
    with pytest.raises(LocalProtocolError):
        encode_message(**args)  # type: ignore[arg-type]


# -- Malformed input ----------------------------------------------------------------------------

PUBLISH_BODY = (
    b"\x00\x00\x00\x01" + s16("news") + s16("text/plain") + s16("") + b"\x00\x00\x00\x02hi"
)


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        pytest.param(b"\x00\x00\x00\x00", "protocol-error", id="zero length"),
        pytest.param(raw(0x05, b"\x00\x00\x00"), "protocol-error", id="truncated ping"),
        pytest.param(raw(0x05, b"\x00\x00\x00\x01\x00"), "protocol-error", id="trailing ping"),
        pytest.param(raw(0x05, b"\x00\x00\x00\x00"), "protocol-error", id="request 0"),
        pytest.param(
            raw(0x02, b"\x00\x00\x00\x01" + s16("a") + b"\x02"), "protocol-error", id="has_after 2"
        ),
        pytest.param(
            raw(0x02, b"\x00\x00\x00\x01" + s16("a") + b"\x01\x00"),
            "protocol-error",
            id="short after",
        ),
        pytest.param(
            raw(0x02, b"\x00\x00\x00\x01" + s16("a") + b"\x00\x00"),
            "protocol-error",
            id="trailing after no after",
        ),
        pytest.param(
            raw(0x02, b"\x00\x00\x00\x01" + s16("a")), "protocol-error", id="missing has_after"
        ),
        pytest.param(
            raw(0x03, b"\x00\x00\x00\x01" + s16(b"\xff\xfe")), "protocol-error", id="bad utf-8"
        ),
        pytest.param(
            raw(0x03, b"\x00\x00\x00\x01" + s16(b"\xed\xa0\x80")),
            "protocol-error",
            id="utf-8 surrogate",
        ),
        pytest.param(
            raw(0x03, b"\x00\x00\x00\x01\x00\x05ab"), "protocol-error", id="string past the end"
        ),
        pytest.param(raw(0x04, PUBLISH_BODY[:-1]), "protocol-error", id="truncated publish"),
        pytest.param(raw(0x04, PUBLISH_BODY + b"!"), "protocol-error", id="trailing publish"),
        pytest.param(raw(0x07, b""), "protocol-error", id="unknown type"),
        pytest.param(raw(0x00, b"\x00\x00\x00\x01"), "protocol-error", id="type 0"),
        pytest.param(encode(Pong(request=1)), "protocol-error", id="server frame from client"),
        pytest.param(encode(Hello()), "protocol-error", id="second hello"),
    ],
)
def test_malformed_frames_from_the_client(data: bytes, error_type: str) -> None:
    _, server = open_pair()
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    assert caught.value.error_type == error_type
    assert server.state is State.CLOSED


def test_eof_in_the_middle_of_a_frame() -> None:
    _, server = open_pair()
    server.receive_data(encode(Ping(request=1))[:-1])
    assert server.next_event() is NEED_DATA
    assert not server.peer_closed
    server.receive_data(b"")
    assert server.peer_closed
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_event()


def test_eof_between_frames_is_a_clean_close() -> None:
    _, server = open_pair()
    server.receive_data(encode(Ping(request=1)))
    server.receive_data(b"")
    assert drain(server) == [Ping(request=1), CONNECTION_CLOSED]
    assert server.state is State.CLOSED
    assert server.next_event() is CONNECTION_CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        pytest.param(raw(0x86, b"\x00\x00\x00\x01" + s16("t")), "protocol-error", id="short error"),
        pytest.param(
            raw(0x85, s16("c") + bytes(16) + s16("t") + b"\x00\x00\x00\x03ab"),
            "protocol-error",
            id="short message data",
        ),
        pytest.param(raw(0x85, s16("c") + bytes(15)), "protocol-error", id="short message seq"),
        pytest.param(
            raw(0x83, b"\x00\x00\x00\x01" + bytes(15)), "protocol-error", id="short published"
        ),
        pytest.param(raw(0x83, bytes(20)), "protocol-error", id="published request 0"),
        pytest.param(raw(0x82, bytes(4)), "protocol-error", id="ok request 0"),
        pytest.param(encode(Ping(request=1)), "protocol-error", id="client frame from server"),
        pytest.param(encode(WELCOME), "protocol-error", id="second welcome"),
    ],
)
def test_malformed_frames_from_the_server(data: bytes, error_type: str) -> None:
    client, _ = open_pair()
    client.receive_data(data)
    with pytest.raises(RemoteProtocolError) as caught:
        client.next_event()
    assert caught.value.error_type == error_type


def test_zero_length_is_refused_with_four_bytes() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    assert caught.value.error_type == "protocol-error"


@pytest.mark.parametrize("role", list(Role))
def test_too_large_is_refused_from_the_length_alone(role: Role) -> None:
    connection = Connection(role, max_frame=1000)
    connection.receive_data(struct.pack(">I", 1001))  # not even the type byte
    with pytest.raises(RemoteProtocolError) as caught:
        connection.next_event()
    assert caught.value.error_type == "frame-too-large"
    assert connection.state is State.CLOSED
    # The body that follows is not kept, and the error stays.
    connection.receive_data(bytes(1001))
    assert connection.buffered_bytes == 0
    with pytest.raises(RemoteProtocolError) as again:
        connection.next_event()
    assert again.value.error_type == "frame-too-large"


def test_max_frame_is_inclusive() -> None:
    _, server = open_pair()
    server._max_frame = len(encode(Ping(request=1))) - 4
    server.receive_data(encode(Ping(request=1)))
    assert server.next_event() == Ping(request=1)
    server.receive_data(encode(Publish(request=2, channel="c", content_type="", data=b"")))
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        server.next_event()


def test_default_max_frame_takes_a_mebibyte_of_data_and_headers() -> None:
    client, server = open_pair()
    publish = Publish(
        request=1,
        channel="c" * 200,
        content_type="t" * 200,
        idempotency_key="k" * 200,
        data=bytes(1 << 20),
    )
    server.receive_data(client.send(publish))
    assert server.next_event() == publish


def test_wrong_magic() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(raw(0x01, b"BKCX\x01\x01"))
    with pytest.raises(RemoteProtocolError, match="magic") as caught:
        server.next_event()
    assert caught.value.error_type == "protocol-error"


@pytest.mark.parametrize(
    "body",
    [b"BKCH\x02\x01", b"BKCH\x01\x01\x02", b"BKCH", b"BK", b"BKCH\x01"],
    ids=["count too big", "count too small", "no count", "short magic", "no versions"],
)
def test_bad_hello_lengths(body: bytes) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(raw(0x01, body))
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_frame_before_hello() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(Ping(request=1)))
    with pytest.raises(RemoteProtocolError, match="before HELLO") as caught:
        server.next_event()
    assert caught.value.error_type == "protocol-error"


def test_frame_before_welcome_is_refused_by_the_server() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(Hello()) + encode(Ping(request=1)))
    assert server.next_event() == Hello()
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_no_common_version() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(Hello(versions=(3, 4))))
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    assert caught.value.error_type == "unsupported-version"
    assert server.state is State.CLOSED
    # The server reports it, once, and that is all it may send.
    goodbye = Error(request=0, type=caught.value.error_type, detail=str(caught.value))
    client = Connection(Role.CLIENT)
    client.send(Hello(versions=(1,)))
    client.receive_data(server.send(goodbye))
    assert client.next_event() == goodbye
    assert client.state is State.CLOSED
    assert client.next_event() is CONNECTION_CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(goodbye)
    with pytest.raises(LocalProtocolError):
        server.send(WELCOME)


def test_empty_hello_has_no_common_version() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(Hello(versions=())))
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    assert caught.value.error_type == "unsupported-version"


def test_negotiation_picks_the_highest_common_version() -> None:
    server = Connection(Role.SERVER, versions=(1, 2, 3))
    client = Connection(Role.CLIENT, versions=(1, 2, 4))
    server.receive_data(client.send(Hello(versions=(4, 1, 2))))
    assert server.next_event() == Hello(versions=(4, 1, 2))
    assert server.version == 2
    assert client.version is None
    with pytest.raises(LocalProtocolError, match="version chosen"):
        server.send(Welcome(version=1, max_frame=1000, server="s"))
    with pytest.raises(LocalProtocolError, match="max_frame"):
        server.send(Welcome(version=2, max_frame=DEFAULT_MAX_FRAME + 1, server="s"))
    client.receive_data(server.send(Welcome(version=2, max_frame=1000, server="s")))
    assert client.next_event() == Welcome(version=2, max_frame=1000, server="s")
    assert client.version == 2
    assert client.peer_max_frame == 1000


def test_welcome_with_a_version_not_offered() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello())
    client.receive_data(encode(Welcome(version=3, max_frame=1000, server="s")))
    with pytest.raises(RemoteProtocolError) as caught:
        client.next_event()
    assert caught.value.error_type == "unsupported-version"


def test_welcome_before_hello_is_refused_by_the_client() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(encode(WELCOME))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_connection_error_before_welcome_closes_the_client() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello())
    shutting_down = Error(request=0, type="shutting-down", detail="")
    client.receive_data(encode(shutting_down) + encode(WELCOME))
    assert client.next_event() == shutting_down
    assert client.next_event() is CONNECTION_CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Ping(request=1))


def test_command_error_before_welcome_is_refused() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello())
    client.receive_data(encode(Error(request=1, type="x", detail="")))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_command_error_keeps_the_connection_open() -> None:
    client, server = open_pair()
    client.receive_data(server.send(Error(request=3, type="invalid-channel", detail="")))
    assert client.next_event() == Error(request=3, type="invalid-channel", detail="")
    assert client.state is server.state is State.OPEN


def test_remote_error_keeps_raising_and_discards_data() -> None:
    _, server = open_pair()
    server.receive_data(raw(0x07, b""))
    with pytest.raises(RemoteProtocolError) as first:
        server.next_event()
    server.receive_data(encode(Ping(request=1)))
    assert server.buffered_bytes == 0
    with pytest.raises(RemoteProtocolError) as second:
        server.next_event()
    assert second.value is first.value


# -- Fuzzing ------------------------------------------------------------------------------------


def _feed_and_drain(connection: Connection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            connection.receive_data(chunk)
            drain(connection)
        connection.receive_data(b"")
        drain(connection)
    except RemoteProtocolError:
        assert connection.state is State.CLOSED


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=64), max_size=8),
    role=st.sampled_from(list(Role)),
)
def test_fuzz_arbitrary_bytes_after_the_handshake(chunks: list[bytes], role: Role) -> None:
    client, server = open_pair()
    _feed_and_drain(server if role is Role.SERVER else client, chunks)


@given(chunks=st.lists(st.binary(min_size=1, max_size=64), max_size=8))
def test_fuzz_arbitrary_bytes_after_hello(chunks: list[bytes]) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(Hello()))
    assert server.next_event() == Hello()
    server.send(WELCOME)
    _feed_and_drain(server, chunks)


framed_garbage = st.builds(
    lambda code, body, delta: raw(code, body, length=max(0, len(body) + 1 + delta)),
    st.sampled_from(list(FrameType)) | st.integers(0, 255),
    st.binary(max_size=40),
    st.sampled_from([0, 0, 0, -1, 1, -3]),
)


@given(
    frames_=st.lists(framed_garbage, min_size=1, max_size=5),
    role=st.sampled_from(list(Role)),
)
def test_fuzz_well_framed_garbage(frames_: list[bytes], role: Role) -> None:
    client, server = open_pair()
    _feed_and_drain(server if role is Role.SERVER else client, [b"".join(frames_)])


@given(data=st.binary(max_size=64))
def test_fuzz_before_hello(data: bytes) -> None:
    for role in Role:
        _feed_and_drain(Connection(role), [data])


# -- Local misuse -------------------------------------------------------------------------------


def test_subscribe_before_the_handshake() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(Subscribe(request=1, channel="news"))
    client.send(Hello())
    with pytest.raises(LocalProtocolError):
        client.send(Subscribe(request=1, channel="news"))
    assert client.state is State.AWAITING_WELCOME


@pytest.mark.parametrize("frame", [f for f in EXAMPLES if isinstance(f, ClientFrame)], ids=str)
def test_server_cannot_send_client_frames(frame: Frame) -> None:
    _, server = open_pair()
    with pytest.raises(LocalProtocolError):
        server.send(frame)
    assert server.state is State.OPEN


@pytest.mark.parametrize("frame", [f for f in EXAMPLES if not isinstance(f, ClientFrame)], ids=str)
def test_client_cannot_send_server_frames(frame: Frame) -> None:
    client, _ = open_pair()
    with pytest.raises(LocalProtocolError):
        client.send(frame)
    assert client.state is State.OPEN


def test_hello_twice_and_hello_with_versions_we_do_not_speak() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(Hello(versions=(3,)))
    with pytest.raises(LocalProtocolError):
        client.send(Hello(versions=()))
    assert client.state is State.AWAITING_HELLO
    client.send(Hello())
    with pytest.raises(LocalProtocolError):
        client.send(Hello())


def test_server_cannot_welcome_before_hello() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(WELCOME)
    with pytest.raises(LocalProtocolError):
        server.send(Error(request=1, type="x", detail=""))
    server.send(Error(request=0, type="shutting-down", detail=""))
    assert server.state is State.CLOSED


def test_client_respects_the_servers_max_frame() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello())
    client.receive_data(encode(Welcome(version=1, max_frame=100, server="s")))
    client.next_event()
    fits = Publish(request=1, channel="c", content_type="t", data=bytes(83))
    assert len(client.send(fits)) == 104
    with pytest.raises(LocalProtocolError) as caught:
        client.send(Publish(request=1, channel="c", content_type="t", data=bytes(84)))
    assert caught.value.error_type == "frame-too-large"
    assert client.state is State.OPEN


@pytest.mark.parametrize(
    "frame",
    [
        Ping(request=0),
        Ping(request=U32 + 1),
        Ping(request=-1),
        Ok(request=0),
        Pong(request=0),
        Error(request=U32 + 1, type="", detail=""),
        Error(request=-1, type="", detail=""),
        Subscribe(request=1, channel="x" * 65536),
        Subscribe(request=1, channel="é" * 32768),
        Subscribe(request=1, channel="c", after=U64 + 1),
        Subscribe(request=1, channel="c", after=-1),
        Unsubscribe(request=1, channel="\udc00"),
        Publish(request=1, channel="c", content_type="t", idempotency_key="", data=b""),
        Publish(request=1, channel="c", content_type="t" * 65536, data=b""),
        Published(request=1, seq=U64 + 1, time_ms=0),
        Published(request=1, seq=0, time_ms=-1),
        Published(request=0, seq=0, time_ms=0),
        Message(channel="c", seq=-1, time_ms=0, content_type="", data=b""),
        Welcome(version=256, max_frame=1, server=""),
        Welcome(version=1, max_frame=U32 + 1, server=""),
        Welcome(version=1, max_frame=1, server="s" * 65536),
        Hello(versions=(256,)),
        Hello(versions=(-1,)),
        Hello(versions=(1,) * 256),
    ],
    ids=example_id,
)
def test_out_of_range_fields(frame: Frame) -> None:
    with pytest.raises(LocalProtocolError):
        encode(frame)


def test_encode_refuses_what_is_not_a_frame() -> None:
    with pytest.raises(LocalProtocolError):
        encode("PING")  # type: ignore[arg-type]


def test_out_of_range_field_changes_nothing() -> None:
    client, _ = open_pair()
    with pytest.raises(LocalProtocolError):
        client.send(Ping(request=0))
    assert client.state is State.OPEN
    assert client.send(Ping(request=1)) == encode(Ping(request=1))


def test_receive_data_bounds_what_it_buffers() -> None:
    _, server = open_pair()
    server._max_frame = 100
    server.receive_data(bytes(50) + b"\x01")  # does not look at it: next_event() would
    server.receive_data(bytes(54))  # 105 bytes waiting: more than one frame can take
    with pytest.raises(LocalProtocolError, match="next_event"):
        server.receive_data(b"x")


def test_receive_data_after_draining_is_unbounded_by_chunk_size() -> None:
    client, server = open_pair()
    many = b"".join(client.send(Ping(request=n)) for n in range(1, 20_001))
    server.receive_data(many)
    events = drain(server)
    assert len(events) == 20_001
    assert server.buffered_bytes == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_frame": 0}, {"max_frame": U32 + 1}, {"versions": ()}, {"versions": (256,)}],
)
def test_connection_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, **kwargs)  # type: ignore[arg-type]


# -- The table ----------------------------------------------------------------------------------

MOVES: list[tuple[type[object], Frame]] = [
    (Hello, Hello()),
    (Subscribe, Subscribe(request=1, channel="c")),
    (Unsubscribe, Unsubscribe(request=1, channel="c")),
    (Publish, Publish(request=1, channel="c", content_type="", data=b"")),
    (Ping, Ping(request=1)),
    (Auth, Auth(request=1, token="t")),
    (Welcome, WELCOME),
    (Ok, Ok(request=1)),
    (Published, Published(request=1, seq=1, time_ms=1)),
    (Pong, Pong(request=1)),
    (Message, Message(channel="c", seq=1, time_ms=1, content_type="", data=b"")),
    (Error, Error(request=1, type="t", detail="")),
    (ClosingError, Error(request=0, type="t", detail="")),
]


def connection_in(role: Role, state: State) -> Connection:
    connection = Connection(role)
    connection._enter(state)
    connection._version = VERSIONS[-1]
    connection._offered = (VERSIONS[-1],)
    return connection


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("move", "frame"), MOVES, ids=[m.__name__ for m, _ in MOVES])
def test_every_state_and_frame_follows_the_table(
    state: State, role: Role, move: type[object], frame: Frame
) -> None:
    sender = connection_in(role, state)
    expected = TRANSITIONS.get((role, state, move))  # type: ignore[arg-type]
    if expected is None:
        with pytest.raises(LocalProtocolError):
            sender.send(frame)
        assert sender.state is state
    else:
        assert sender.send(frame) == encode(frame)
        assert sender.state is expected

    peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
    receiver = connection_in(peer, state)
    receiver.receive_data(encode(frame))
    if state is State.CLOSED:
        assert receiver.next_event() is CONNECTION_CLOSED
    elif expected is None:
        with pytest.raises(RemoteProtocolError):
            receiver.next_event()
        assert receiver.state is State.CLOSED
    else:
        assert receiver.next_event() == frame
        assert receiver.state is expected


# -- Two peers in memory ------------------------------------------------------------------------


class TwoPeers(RuleBasedStateMachine):
    """A client and a server talk through two byte pipes delivered in random chunks; each side
    must receive exactly what the other sent, in order."""

    @initialize(handshake_first=st.booleans())
    def setup(self, handshake_first: bool) -> None:
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER)
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.expect_server: deque[Frame] = deque()
        self.expect_client: deque[Frame] = deque()
        self.client_hung_up = False
        if handshake_first:  # else the rules below interleave the handshake with the rest
            self._send(self.client, Hello())
            self._deliver(self.server, len(self.to_server))
            self._send(self.server, WELCOME)
            self._deliver(self.client, len(self.to_client))
            assert self.client.state is self.server.state is State.OPEN

    def _send(self, sender: Connection, frame: Frame) -> None:
        data = sender.send(frame)
        if sender is self.client:
            self.to_server += data
            self.expect_server.append(frame)
        else:
            self.to_client += data
            self.expect_client.append(frame)

    def _deliver(self, receiver: Connection, size: int) -> None:
        pipe = self.to_server if receiver is self.server else self.to_client
        expected = self.expect_server if receiver is self.server else self.expect_client
        chunk = bytes(pipe[:size])
        del pipe[:size]
        if chunk:
            receiver.receive_data(chunk)
        for event in drain(receiver):
            if event is NEED_DATA:
                break
            if event is CONNECTION_CLOSED:
                assert receiver.state is State.CLOSED
                if receiver is self.server:
                    # The server said goodbye: what the client had in flight is not read.
                    expected.clear()
                    pipe.clear()
                assert not expected
                break
            assert event == expected.popleft()
            if receiver is self.server and isinstance(event, Hello):
                assert self.server.version == VERSIONS[-1]

    @precondition(lambda self: self.client.state is State.AWAITING_HELLO)
    @rule()
    def client_says_hello(self) -> None:
        self._send(self.client, Hello())

    @precondition(lambda self: self.server.state is State.AWAITING_WELCOME)
    @rule(max_frame=st.sampled_from([DEFAULT_MAX_FRAME, 200]))
    def server_welcomes(self, max_frame: int) -> None:
        self._send(self.server, Welcome(version=VERSIONS[-1], max_frame=max_frame, server="test"))

    @precondition(lambda self: self.client.state is State.OPEN and not self.client_hung_up)
    @rule(frame=client_commands)
    def client_sends(self, frame: ClientFrame) -> None:
        limit = self.client.peer_max_frame
        assert limit is not None
        if len(encode(frame)) - 4 > limit:
            with pytest.raises(LocalProtocolError):
                self.client.send(frame)
        else:
            self._send(self.client, frame)

    @precondition(lambda self: self.server.state is State.OPEN)
    @rule(frame=server_answers)
    def server_sends(self, frame: ServerFrame) -> None:
        self._send(self.server, frame)

    @precondition(lambda self: self.server.state is State.OPEN)
    @rule(
        channel=texts,
        seq=u64s,
        content_type=texts,
        data=payloads,
    )
    def server_broadcasts(self, channel: str, seq: int, content_type: str, data: bytes) -> None:
        self.to_client += encode_message(channel, seq, 7, content_type, data)
        self.expect_client.append(
            Message(channel=channel, seq=seq, time_ms=7, content_type=content_type, data=data)
        )

    # Ending the conversation is drawn rarely, so that most runs get to talk for a while.
    @precondition(lambda self: self.server.state is not State.CLOSED)
    @rule(dice=st.integers(0, 9))
    def server_says_goodbye(self, dice: int) -> None:
        if dice == 0:
            self._send(self.server, Error(request=0, type="shutting-down", detail="bye"))

    @precondition(lambda self: self.client.state is State.OPEN and not self.client_hung_up)
    @rule(dice=st.integers(0, 9))
    def client_hangs_up(self, dice: int) -> None:
        self.client_hung_up = dice == 0

    @rule(size=st.integers(1, 64))
    def deliver_to_server(self, size: int) -> None:
        self._deliver(self.server, size)

    @rule(size=st.integers(1, 64))
    def deliver_to_client(self, size: int) -> None:
        self._deliver(self.client, size)

    @invariant()
    def states_agree(self) -> None:
        if self.client.state is State.OPEN:
            assert self.server.state in (State.OPEN, State.CLOSED)

    def teardown(self) -> None:
        self._deliver(self.server, len(self.to_server))
        self._deliver(self.client, len(self.to_client))
        assert not self.expect_server
        assert not self.expect_client
        if self.client_hung_up and self.server.state is not State.CLOSED:
            self.server.receive_data(b"")
            assert self.server.next_event() is CONNECTION_CLOSED
        if self.server.state is State.CLOSED and self.server._said_goodbye:
            assert self.client.state is State.CLOSED


TwoPeers.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
test_two_peers = TwoPeers.TestCase


# -- Module hygiene -----------------------------------------------------------------------------


def test_all_is_honest() -> None:
    assert sorted(frames.__all__) == sorted(set(frames.__all__))
    for name in frames.__all__:
        assert hasattr(frames, name), name
    public = {
        name
        for name, value in vars(frames).items()
        if not name.startswith("_")
        and getattr(value, "__module__", frames.__name__) == frames.__name__
        and (isinstance(value, type) or callable(value))
    }
    assert public <= set(frames.__all__)


def test_no_io_imports() -> None:
    tree = ast.parse(Path(frames.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "threading", "selectors", "trio", "anyio"}


def test_protocol_errors_share_a_base() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert ProtocolError("x").error_type == "protocol-error"
    assert MAGIC == b"BKCH"
    assert VERSIONS == (1, 2)
    assert AUTH_VERSION == 2


# -- AUTH and version 2 -------------------------------------------------------------------------


def test_auth_layout() -> None:
    # type 0x06, request u32, token str (u16 length + UTF-8)
    frame = Auth(request=1, token="abc")
    assert encode(frame) == bytes.fromhex("0000000a 06 00000001 0003 616263")


def test_auth_does_not_show_the_token_in_repr() -> None:
    assert "secret" not in repr(Auth(request=1, token="secret"))


def _open_at(version: int) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER, versions=(version,) if version in VERSIONS else VERSIONS)
    server.receive_data(client.send(Hello(versions=(version,))))
    assert server.next_event() == Hello(versions=(version,))
    client.receive_data(server.send(Welcome(version=version, max_frame=1000, server="s")))
    assert client.next_event() == Welcome(version=version, max_frame=1000, server="s")
    return client, server


def test_an_old_client_still_gets_version_1() -> None:
    client, server = _open_at(1)
    assert client.version == server.version == 1
    client.send(Ping(request=1))


def test_a_new_client_and_server_agree_on_version_2() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(Hello(versions=(1, 2))))
    assert server.next_event() == Hello(versions=(1, 2))
    assert server.version == 2


def test_auth_before_welcome_is_refused() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello())
    with pytest.raises(LocalProtocolError):
        client.send(Auth(request=1, token="t"))
    server = Connection(Role.SERVER)
    server.receive_data(encode(Hello()) + encode(Auth(request=1, token="t")))
    assert server.next_event() == Hello()
    with pytest.raises(RemoteProtocolError):  # before WELCOME: not allowed in this state
        server.next_event()


def test_auth_needs_version_2_both_ways() -> None:
    client, server = _open_at(1)
    with pytest.raises(LocalProtocolError, match="version 2"):
        client.send(Auth(request=1, token="t"))
    assert client.state is State.OPEN
    server.receive_data(encode(Auth(request=1, token="t")))
    with pytest.raises(RemoteProtocolError, match="version 2") as caught:
        server.next_event()
    assert caught.value.error_type == "protocol-error"
    assert server.state is State.CLOSED


@pytest.mark.parametrize(
    "body",
    [
        b"",  # nothing
        b"\x00\x00\x00\x01",  # no token length
        b"\x00\x00\x00\x01\x00\x05abc",  # token shorter than its length
        b"\x00\x00\x00\x01\x00\x01ab",  # a trailing byte
        b"\x00\x00\x00\x00\x00\x01a",  # request 0
        b"\x00\x00\x00\x01\x00\x01\xff",  # not UTF-8
    ],
)
def test_malformed_auth_is_a_protocol_error(body: bytes) -> None:
    _, server = open_pair()
    server.receive_data(raw(0x06, body))
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    assert caught.value.error_type == "protocol-error"


def test_auth_then_commands_in_one_chunk() -> None:
    client, server = open_pair()
    sent = [Auth(request=1, token="t" * 300), Subscribe(request=2, channel="a")]
    server.receive_data(b"".join(client.send(frame) for frame in sent))
    assert drain(server) == [*sent, NEED_DATA]
