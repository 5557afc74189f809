"""Message ids and cursors.

A message id is the message's sequence number within its channel, written as 16 lowercase
hexadecimal digits, so that ids sort in publish order as plain strings. Sequence numbers stop
at 2**63 - 1, the largest integer SQLite (and Redis) store natively. Clients treat ids as
opaque: they keep the id of the last message they saw (their cursor) and hand it back in
``after=``.

The parser accepts 1 to 16 hexadecimal digits in either case, so ``after=0`` (the beginning
of the channel) is easy to type; everything else raises :class:`InvalidCursor`.
"""

ID_WIDTH = 16
MAX_SEQ = (1 << 63) - 1
_HEX = frozenset("0123456789abcdefABCDEF")

#: The cursor that comes before every message of a channel.
BEGINNING = "0" * ID_WIDTH


class InvalidCursor(ValueError):
    """A peer sent a string that is not a message id."""


def format_id(seq: int) -> str:
    """The id of the message with sequence number ``seq`` (0 is :data:`BEGINNING`)."""
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number out of range: {seq}")
    return f"{seq:016x}"


def parse_id(text: str) -> int:
    """The sequence number that ``text`` names, or :class:`InvalidCursor`."""
    if not 1 <= len(text) <= ID_WIDTH or not _HEX.issuperset(text):
        raise InvalidCursor(
            f"{text[:40]!r} is not a message id: expected 1 to {ID_WIDTH} hexadecimal digits"
        )
    seq = int(text, 16)
    if seq > MAX_SEQ:
        raise InvalidCursor(f"{text!r} is beyond the largest message id, {MAX_SEQ:016x}")
    return seq
