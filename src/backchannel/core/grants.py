"""What a caller may do: channel and queue patterns, and the admin flag.

This module owns the rules of authorization, none of authentication: a :class:`Grants` is built
from the ``bc`` claim of a token the server has already verified (``server/auth.py``), and the
transports ask it one question per action. Nothing here knows about JWT or HTTP.

Patterns (``docs/auth.md``, "Channel and queue patterns")::

    news           exactly the name ``news``
    chat.*         ``*`` is any run of characters without a dot, the empty run included:
                   chat.room1, chat.  (not chat, not chat.room1.private)
    chat.**        ``**`` is any run of characters, dots included: chat.room1.private
    **             every name
    *@example.com  every name of one segment ending in @example.com

A pattern is a name of the channel alphabet (``A-Z a-z 0-9 _ - . : @``) in which ``*`` and
``**`` may stand for parts; three stars in a row are refused. Matching is case-sensitive and
whole-name. Queue names follow the channel name rules, so queues use the same patterns.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .channels import MAX_CHANNEL_LENGTH

#: Patterns one grant list may hold.
MAX_PATTERNS = 100
_PATTERN = re.compile(rf"[A-Za-z0-9_\-.:@*]{{1,{MAX_CHANNEL_LENGTH}}}")


class Action(enum.Enum):
    """An action on a named thing. The value is the name of its list in the ``bc`` claim."""

    PUBLISH = "publish"  # a channel: publish to it
    SUBSCRIBE = "subscribe"  # a channel: poll it, stream it, read its info
    SUBMIT = "submit"  # a queue: submit jobs, read and cancel its jobs
    CLAIM = "claim"  # a queue: claim jobs, report on them, read them


class InvalidGrants(ValueError):
    """The ``bc`` claim does not have the documented shape."""


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression that matches the names ``pattern`` stands for (whole names)."""
    if not isinstance(pattern, str) or _PATTERN.fullmatch(pattern) is None:
        shown = repr(pattern)[:60]
        raise InvalidGrants(
            f"{shown} is not a pattern: 1 to {MAX_CHANNEL_LENGTH} letters, digits, _ - . : @ "
            "and the wildcards * and **"
        )
    if "***" in pattern:
        raise InvalidGrants(f"{pattern[:60]!r}: at most two stars in a row")
    parts: list[str] = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        if piece == "**":
            parts.append(".*")
        elif piece == "*":
            parts.append("[^.]*")
        elif piece:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Patterns:
    """A list of patterns, compiled once into one expression."""

    patterns: tuple[str, ...] = ()
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.patterns) > MAX_PATTERNS:
            raise InvalidGrants(f"{len(self.patterns)} patterns in one list, over {MAX_PATTERNS}")
        if self.patterns:
            joined = "|".join(f"(?:{compile_pattern(p).pattern})" for p in self.patterns)
            object.__setattr__(self, "_regex", re.compile(joined, re.DOTALL))

    def match(self, name: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(name) is not None


EVERYTHING = Patterns(("**",))


@dataclass(frozen=True, slots=True)
class Grants:
    """What one caller may do. :data:`ALLOW_ALL` is what every caller may do when the hub
    runs without authentication."""

    publish: Patterns = Patterns()
    subscribe: Patterns = Patterns()
    submit: Patterns = Patterns()
    claim: Patterns = Patterns()
    admin: bool = False

    def allows(self, action: Action, name: str) -> bool:
        patterns: Patterns = getattr(self, action.value)
        return patterns.match(name)

    def allows_job(self, queue: str) -> bool:
        """May the caller read a job of ``queue``? Those who may submit to the queue or claim
        from it may."""
        return self.submit.match(queue) or self.claim.match(queue)

    @classmethod
    def from_claim(cls, claim: Any) -> Grants:
        """Grants from the value of a token's ``bc`` claim (absent: ``None``, which grants
        nothing). Raises :class:`InvalidGrants` when it has another shape."""
        if claim is None:
            return NO_GRANTS
        if not isinstance(claim, Mapping):
            raise InvalidGrants("the bc claim must be a JSON object")
        unknown = set(claim) - {a.value for a in Action} - {"admin"}
        if unknown:
            raise InvalidGrants(f"the bc claim has unknown keys: {', '.join(sorted(unknown))}")
        lists = {a.value: Patterns(_strings(claim.get(a.value), a.value)) for a in Action}
        admin = claim.get("admin", False)
        if not isinstance(admin, bool):
            raise InvalidGrants("bc.admin must be true or false")
        return cls(admin=admin, **lists)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidGrants(f"bc.{name} must be a list of patterns (strings)")
    return tuple(dict.fromkeys(value))


def grants(
    *,
    publish: Iterable[str] = (),
    subscribe: Iterable[str] = (),
    submit: Iterable[str] = (),
    claim: Iterable[str] = (),
    admin: bool = False,
) -> Grants:
    """Grants from lists of patterns (raises :class:`InvalidGrants` for a bad pattern)."""
    return Grants(
        Patterns(tuple(publish)),
        Patterns(tuple(subscribe)),
        Patterns(tuple(submit)),
        Patterns(tuple(claim)),
        admin,
    )


NO_GRANTS = Grants()
ALLOW_ALL = Grants(EVERYTHING, EVERYTHING, EVERYTHING, EVERYTHING, admin=True)
