"""What flows through the pipeline: a ``Record`` to send, or an ``Invalid`` input line.

Both carry ``seq`` (0-based position among the non-blank records of all inputs, valid or
not), ``source`` (``path:line``, 1-based physical line, the path as given; ``-`` is stdin)
and ``identity`` (the input's key, ``:``, the record's first physical line), assigned by the
single reader in input order, so they are the same on every run over the same inputs and
independent of which process sends the record (a shard reading a byte range keeps them).

``identity`` is what ``--resume`` matches on (``bulksend.sources.input_key`` has the rules):
unlike ``source`` it does not change when the same file is named ``day1.jsonl``,
``./day1.jsonl`` or by its absolute path, and unlike ``id`` it never merges two records. It
is None only for records built by hand, which nothing can match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: RocketMQ's property names for a message's keys and tag.
KEYS = "KEYS"
TAGS = "TAGS"


@dataclass(slots=True)
class Record:
    """One valid message to send. Treat as immutable: not ``frozen`` only because a frozen
    dataclass's __init__ costs ~1 µs more per record (object.__setattr__ per field), a third
    of a line's whole parse."""

    seq: int
    source: str
    topic: str
    body: str
    #: (name, value) pairs in the order they are sent as ``property_list``.
    properties: tuple[tuple[str, str], ...] = ()
    id: str | None = None
    identity: str | None = None

    @property
    def keys(self) -> str | None:
        """The KEYS property, if any (RocketMQ joins several keys with spaces)."""
        for name, value in self.properties:
            if name == KEYS:
                return value
        return None

    def payload(self) -> dict[str, Any]:
        """The SendMessage request body."""
        return {
            "topic": self.topic,
            "body": self.body,
            "property_list": [{"name": n, "value": v} for n, v in self.properties],
        }

    def to_input(self) -> dict[str, Any]:
        """This record in bulksend's JSONL input form, so a --failed file replays it."""
        out: dict[str, Any] = {"topic": self.topic, "body": self.body}
        if self.properties:
            out["property_list"] = [{"name": n, "value": v} for n, v in self.properties]
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclass(frozen=True, slots=True)
class Invalid:
    """An input record that cannot be sent, and why. ``raw`` is the original text."""

    seq: int
    source: str
    raw: str
    error: str
    id: str | None = None
    identity: str | None = None


Item = Record | Invalid
