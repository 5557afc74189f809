"""Server close frames, read back by an independent parser (the websockets library's)."""

from __future__ import annotations

from collections.abc import Generator

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from backchannel.wire.ws import close_frame, text_frame


def parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser: Generator[None, None, Frame] = Frame.parse(
        reader.read_exact, mask=False, max_size=None, extensions=[]
    )
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("the frame was incomplete")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_text_frames_of_every_length_form(size: int) -> None:
    frame = parse(text_frame(b"x" * size))
    assert (frame.opcode, frame.fin, len(frame.data)) == (Opcode.TEXT, True, size)


def test_close_frame_carries_code_and_reason() -> None:
    frame = parse(close_frame(4008, "slow consumer"))
    assert frame.opcode is Opcode.CLOSE
    assert Close.parse(frame.data) == Close(4008, "slow consumer")


def test_close_reason_is_cut_to_123_bytes_on_a_character_boundary() -> None:
    frame = parse(close_frame(4000, "é" * 100))  # 200 bytes of UTF-8
    close = Close.parse(frame.data)
    assert close.reason == "é" * 61
    assert len(frame.data) <= 125


def test_close_codes_outside_the_sendable_range_are_refused() -> None:
    with pytest.raises(ValueError):
        close_frame(999)
    with pytest.raises(ValueError):
        close_frame(5000)
