"""The server text frames of backchannel.wire.ws, read back by a real WebSocket peer (wsproto's
client-side frame parser) and by RFC 6455's length rules."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from backchannel.wire.ws import text_frame, text_frame_header

# Lengths around the 7-bit, 16-bit and 64-bit forms, and anything in between.
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 124, 125, 126, 127, 65_534, 65_535, 65_536, 65_537]),
    st.integers(0, 70_000),
)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))


MESSAGES = st.one_of(
    LENGTHS.map(lambda n: "a" * n),
    LENGTHS.map(lambda n: "\u00e9" * (n // 2)),  # two bytes each
    TEXT,
)


def client() -> FrameProtocol:
    return FrameProtocol(client=True, extensions=[])


@given(MESSAGES)
def test_a_peer_reads_one_whole_text_message(message: str) -> None:
    peer = client()
    peer.receive_bytes(text_frame(message.encode()))
    frames = list(peer.received_frames())
    # wsproto decodes text frames; it may hand a long one over in pieces.
    assert {f.opcode for f in frames} <= {Opcode.TEXT, Opcode.CONTINUATION}
    assert "".join(f.payload for f in frames) == message
    assert frames[-1].message_finished


@given(st.lists(TEXT, min_size=1, max_size=5), st.data())
def test_frames_back_to_back_in_any_chunking(messages: list[str], data: st.DataObject) -> None:
    stream = b"".join(text_frame(m.encode()) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    peer = client()
    got: list[str] = []
    current = ""
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        peer.receive_bytes(stream[start:end])
        for frame in peer.received_frames():
            current += frame.payload
            if frame.message_finished:
                got.append(current)
                current = ""
    assert got == messages


@given(st.integers(0, (1 << 63) - 1))
def test_header_follows_rfc6455_lengths(length: int) -> None:
    header = text_frame_header(length)
    assert header[0] == 0x81  # FIN, text
    assert header[1] & 0x80 == 0  # a server never masks
    short = header[1]
    if length < 126:
        assert (len(header), short) == (2, length)
    elif length < 1 << 16:
        assert (len(header), short) == (4, 126)
        assert struct.unpack("!H", header[2:])[0] == length
    else:
        assert (len(header), short) == (10, 127)
        assert struct.unpack("!Q", header[2:])[0] == length


@pytest.mark.parametrize("length", [-1, 1 << 63])
def test_impossible_lengths_are_refused(length: int) -> None:
    with pytest.raises(ValueError):
        text_frame_header(length)
