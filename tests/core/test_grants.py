"""Grants and their patterns, as pure functions (``backchannel.core.grants``)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.core.grants import (
    ALLOW_ALL,
    MAX_PATTERNS,
    NO_GRANTS,
    Action,
    Grants,
    InvalidGrants,
    Patterns,
    compile_pattern,
    grants,
)

NAME_CHARS = "abcXYZ019_-.:@"
names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=30)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("news", ["news"], ["new", "newss", "News", "news.x"]),
        (
            "chat.*",
            ["chat.room1", "chat.", "chat.a-b@c:d"],
            ["chat", "chat.room1.private", "xchat.a"],
        ),
        ("chat.**", ["chat.room1", "chat.room1.private", "chat."], ["chat", "chatx.room"]),
        ("*", ["news", "a@b:c"], ["a.b"]),
        ("**", ["news", "a.b.c", "."], []),
        (
            "*@example.com",
            ["bob@example.com", "@example.com"],
            ["bob@example.org", "a.b@example.com"],
        ),
        ("a*b", ["ab", "axxb"], ["a.b", "abc"]),
        ("*.*", ["a.b", "."], ["a", "a.b.c"]),
        ("user:*", ["user:1"], ["user", "user:1.x"]),
    ],
)
def test_pattern_semantics(pattern: str, matches: list[str], misses: list[str]) -> None:
    compiled = Patterns((pattern,))
    for name in matches:
        assert compiled.match(name), f"{pattern} should match {name}"
    for name in misses:
        assert not compiled.match(name), f"{pattern} should not match {name}"


@pytest.mark.parametrize(
    "pattern", ["", "a b", "chat/x", "***", "a***b", "x" * 201, "é", "a?", "[ab]", 7, None]
)
def test_bad_patterns_are_refused(pattern: object) -> None:
    with pytest.raises(InvalidGrants):
        compile_pattern(pattern)  # type: ignore[arg-type]


def test_regex_characters_in_names_are_literal() -> None:
    # "." is a literal dot, not "any character".
    assert not Patterns(("a.b",)).match("axb")
    assert Patterns(("a.b",)).match("a.b")


@given(name=names)
def test_a_name_without_stars_matches_only_itself(name: str) -> None:
    assert Patterns((name,)).match(name)
    assert not Patterns((name,)).match(name + "x")


@given(name=names)
def test_double_star_matches_everything_and_single_star_no_dots(name: str) -> None:
    assert Patterns(("**",)).match(name)
    assert Patterns(("*",)).match(name) == ("." not in name)


@given(prefix=names, rest=names)
def test_prefix_star_against_a_reference_matcher(prefix: str, rest: str) -> None:
    pattern = prefix + ".*"
    name = prefix + "." + rest
    expected = re.fullmatch(re.escape(prefix) + r"\.[^.]*", name) is not None
    assert Patterns((pattern,)).match(name) == expected


def test_several_patterns_are_alternatives() -> None:
    patterns = Patterns(("news", "chat.*"))
    assert patterns.match("news")
    assert patterns.match("chat.x")
    assert not patterns.match("other")
    assert not Patterns().match("news")


def test_too_many_patterns() -> None:
    with pytest.raises(InvalidGrants, match="patterns"):
        Patterns(tuple(f"c{i}" for i in range(MAX_PATTERNS + 1)))


def test_grants_from_a_claim() -> None:
    parsed = Grants.from_claim(
        {
            "publish": ["chat.*"],
            "subscribe": ["chat.*", "news"],
            "submit": ["video"],
            "claim": ["video", "audio.**"],
            "admin": True,
        }
    )
    assert parsed.allows(Action.PUBLISH, "chat.a")
    assert not parsed.allows(Action.PUBLISH, "news")
    assert parsed.allows(Action.SUBSCRIBE, "news")
    assert parsed.allows(Action.SUBMIT, "video")
    assert not parsed.allows(Action.SUBMIT, "audio.x")
    assert parsed.allows(Action.CLAIM, "audio.x.y")
    assert parsed.admin
    # Reading a job: whoever may submit to or claim from its queue.
    assert parsed.allows_job("video") and parsed.allows_job("audio.a")
    assert not parsed.allows_job("chat.a")


def test_missing_lists_grant_nothing() -> None:
    assert Grants.from_claim(None) == NO_GRANTS
    only = Grants.from_claim({"subscribe": ["news"]})
    assert not only.admin
    for action in Action:
        assert only.allows(action, "news") == (action is Action.SUBSCRIBE)


@pytest.mark.parametrize(
    "claim",
    [
        "publish:chat",  # a scope string is not this format
        ["chat"],
        {"publish": "chat.*"},  # a string, not a list
        {"publish": [1]},
        {"admin": "yes"},
        {"pub": ["chat"]},  # unknown key: a typo must not silently grant nothing
        {"subscribe": ["bad pattern"]},
    ],
)
def test_malformed_claims_are_refused(claim: object) -> None:
    with pytest.raises(InvalidGrants):
        Grants.from_claim(claim)


def test_allow_all_and_no_grants() -> None:
    for action in Action:
        assert ALLOW_ALL.allows(action, "any.thing")
        assert not NO_GRANTS.allows(action, "any.thing")
    assert ALLOW_ALL.admin and not NO_GRANTS.admin


def test_grants_helper_matches_from_claim() -> None:
    built = grants(publish=["a"], subscribe=["b.*"], admin=True)
    assert built == Grants.from_claim({"publish": ["a"], "subscribe": ["b.*"], "admin": True})
