import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.wire import BEGINNING, InvalidCursor, format_id, parse_id
from backchannel.wire.cursor import MAX_SEQ


@given(st.integers(min_value=0, max_value=MAX_SEQ))
def test_round_trip(seq: int) -> None:
    assert parse_id(format_id(seq)) == seq


@given(st.integers(min_value=0, max_value=MAX_SEQ), st.integers(min_value=0, max_value=MAX_SEQ))
def test_ids_sort_as_strings_in_sequence_order(a: int, b: int) -> None:
    assert (format_id(a) < format_id(b)) == (a < b)


def test_short_and_uppercase_forms_are_accepted() -> None:
    assert parse_id("0") == 0
    assert parse_id("2A") == 42
    assert parse_id(BEGINNING) == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "g",
        "-1",
        "8000000000000000",
        "ffffffffffffffff",
        "0x10",
        " 1",
        "1 ",
        "12345678901234567",
        "\u0661",
        "1_0",
        "+1",
    ],
)
def test_malformed_cursors_are_refused(text: str) -> None:
    with pytest.raises(InvalidCursor):
        parse_id(text)


@given(st.text(max_size=20))
def test_parse_either_parses_or_raises_invalid_cursor(text: str) -> None:
    try:
        seq = parse_id(text)
    except InvalidCursor:
        return
    assert 0 <= seq <= MAX_SEQ


def test_format_refuses_out_of_range() -> None:
    with pytest.raises(ValueError):
        format_id(-1)
    with pytest.raises(ValueError):
        format_id(MAX_SEQ + 1)
