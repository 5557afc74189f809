import base64
import json
from datetime import datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.wire import Encoding, InvalidPayload, encoding_for, validate_payload
from backchannel.wire.jsonfmt import encode_message, encode_page, format_time
from backchannel.wire.payload import normalize_content_type


@pytest.mark.parametrize(
    ("content_type", "encoding"),
    [
        ("application/json", Encoding.JSON),
        ("Application/JSON; charset=utf-8", Encoding.JSON),
        ("application/problem+json", Encoding.JSON),
        ("text/plain", Encoding.TEXT),
        ("text/html; charset=UTF-8", Encoding.TEXT),
        ("application/x-www-form-urlencoded", Encoding.TEXT),
        ("application/octet-stream", Encoding.BASE64),
        ("image/png", Encoding.BASE64),
        ("application/jsonl", Encoding.BASE64),
    ],
)
def test_encoding_follows_content_type(content_type: str, encoding: Encoding) -> None:
    assert encoding_for(content_type) is encoding


def test_missing_content_type_is_bytes() -> None:
    assert normalize_content_type(None) == "application/octet-stream"
    assert normalize_content_type("  ") == "application/octet-stream"


@pytest.mark.parametrize("bad", ["nonsense", "a/b/c", "text/plain\x00", "x" * 300, "te xt/plain"])
def test_malformed_content_types_are_refused(bad: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        normalize_content_type(bad)
    assert info.value.kind == "unsupported-media-type"


@pytest.mark.parametrize(
    ("content_type", "body", "kind"),
    [
        ("application/json", b"{", "malformed-json"),
        ("application/json", b"", "malformed-json"),
        ("application/json", b"NaN", "malformed-json"),
        ("application/json", b'"\xff"', "malformed-json"),
        ("application/json; charset=latin-1", b"1", "unsupported-media-type"),
        ("text/plain", b"\xff\xfe", "invalid-text"),
        ("text/plain; charset=iso-8859-1", b"abc", "unsupported-media-type"),
    ],
)
def test_bodies_that_do_not_match_their_type_are_refused(
    content_type: str, body: bytes, kind: str
) -> None:
    with pytest.raises(InvalidPayload) as info:
        validate_payload(content_type, body)
    assert info.value.kind == kind


def test_json_nested_beyond_the_parser_depth_is_refused() -> None:
    with pytest.raises(InvalidPayload) as info:
        validate_payload("application/json", b"[" * 5000 + b"]" * 5000)
    assert info.value.kind == "malformed-json"


def test_json_beyond_64_bit_integers_is_accepted() -> None:
    assert validate_payload("application/json", b"123456789012345678901234567890") is Encoding.JSON


def decode(content_type: str, data: bytes) -> object:
    document = orjson.loads(encode_message("ch", 7, 0, content_type, data))
    assert document["id"] == "0000000000000007"
    assert document["channel"] == "ch"
    assert document["content_type"] == content_type
    return document


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@given(json_values)
def test_json_messages_embed_the_value(value: object) -> None:
    data = orjson.dumps(value, option=orjson.OPT_INDENT_2)
    document = decode("application/json", data)
    assert document["encoding"] == "json"  # type: ignore[index]
    assert document["data"] == value  # type: ignore[index]


def test_json_messages_keep_their_exact_bytes() -> None:
    data = b'{"b": 1,   "a": [1.50, 2]}'
    encoded = encode_message("ch", 1, 0, "application/json", data)
    assert data in encoded


@given(st.text())
def test_text_messages_round_trip(text: str) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates are not UTF-8 and cannot be published as text
        return
    document = decode("text/plain", data)
    assert document["encoding"] == "text"  # type: ignore[index]
    assert document["data"] == text  # type: ignore[index]


@given(st.binary())
def test_bytes_round_trip_through_base64(data: bytes) -> None:
    document = decode("application/octet-stream", data)
    assert document["encoding"] == "base64"  # type: ignore[index]
    assert base64.b64decode(document["data"]) == data  # type: ignore[index]


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert format_time(1_800_000_000_123) == "2027-01-15T08:00:00.123Z"
    assert format_time(0) == "1970-01-01T00:00:00.000Z"


def test_page_joins_encoded_messages() -> None:
    one = encode_message("c", 1, 0, "text/plain", b"a")
    two = encode_message("c", 2, 0, "text/plain", b"b")
    page = orjson.loads(encode_page([one, two], "0000000000000002"))
    assert [m["data"] for m in page["messages"]] == ["a", "b"]
    assert page["next_after"] == "0000000000000002"
    assert orjson.loads(encode_page([], "0")) == {"messages": [], "next_after": "0"}


CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/problem+json; charset=utf-8",
            "text/plain",
            "text/plain; charset=latin1",
            "application/x-www-form-urlencoded",
            "application/octet-stream",
            "image/png",
        ]
    ),
    st.text(max_size=40),
)
BODIES = st.one_of(
    st.binary(max_size=64),
    json_values.map(orjson.dumps),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@given(st.one_of(st.none(), st.text(max_size=60)))
def test_content_types_normalize_or_are_refused(content_type: str | None) -> None:
    try:
        normalized = normalize_content_type(content_type)
    except InvalidPayload as exc:
        assert exc.kind == "unsupported-media-type"
        return
    assert normalized.strip() == normalized and normalized.count("/") >= 1
    encoding_for(normalized)  # every stored content type has an encoding


@given(CONTENT_TYPES, BODIES)
def test_accepted_bodies_embed_as_json_that_gives_them_back(content_type: str, body: bytes) -> None:
    """validate_payload accepts or refuses with a problem kind; what it accepts, encode_message
    embeds in valid JSON from which the body comes back."""
    try:
        content_type = normalize_content_type(content_type)
        encoding = validate_payload(content_type, body)
    except InvalidPayload as exc:
        assert exc.kind in {"unsupported-media-type", "malformed-json", "invalid-text"}
        return
    document = decode(content_type, body)
    data = document["data"]  # type: ignore[index]
    assert document["encoding"] == encoding.value  # type: ignore[index]
    if encoding is Encoding.JSON:
        assert data == json.loads(body)
    elif encoding is Encoding.TEXT:
        assert data == body.decode("utf-8")
    else:
        assert base64.b64decode(data) == body


@given(st.integers(0, 253_402_300_799_999))  # to the last millisecond of year 9999
def test_times_parse_back_to_the_same_millisecond(time_ms: int) -> None:
    text = format_time(time_ms)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
    assert round(moment.timestamp() * 1000) == time_ms
    assert len(text) == 24 and text.endswith("Z")
