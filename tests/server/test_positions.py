"""The composite cursor of multi-channel event streams (``channel=HEX,channel=HEX``, the event
ids of ``GET /v1/events`` and what ``Last-Event-ID`` and ``after=`` give back)."""

from hypothesis import given
from hypothesis import strategies as st

from backchannel.core.errors import BackchannelError
from backchannel.server.problems import HTTPProblem
from backchannel.server.sse import format_positions, parse_positions
from backchannel.wire.cursor import MAX_SEQ

CHANNELS = st.text(
    alphabet="abcXYZ019_-.:@", min_size=1, max_size=20
)  # every character a channel name may have
POSITIONS = st.dictionaries(CHANNELS, st.integers(0, MAX_SEQ), min_size=1, max_size=8)


@given(POSITIONS)
def test_round_trip(positions: dict[str, int]) -> None:
    assert parse_positions(format_positions(positions).decode()) == positions


@given(st.text(max_size=60))
def test_any_text_parses_or_is_a_cursor_or_channel_problem(text: str) -> None:
    try:
        positions = parse_positions(text)
    except HTTPProblem as problem:
        assert problem.type.slug == "invalid-cursor"
        return
    except BackchannelError as exc:
        assert exc.kind == "invalid-channel"
        return
    assert positions and all(0 <= seq <= MAX_SEQ for seq in positions.values())
    assert parse_positions(format_positions(positions).decode()) == positions


def test_the_last_position_of_a_repeated_channel_wins() -> None:
    assert parse_positions("a=1,b=2,a=3") == {"a": 3, "b": 2}
