"""What flows through the pipeline: a ``Record`` to send, or an ``Invalid`` input line.

Both carry ``seq`` (0-based position among the non-blank records of all inputs, valid or
not) and ``source`` (``path:line``, 1-based physical line; ``-`` is stdin), assigned by the
single reader in input order, so they are the same on every run over the same inputs and
independent of which process sends the record (a later shard i of n keeps them).
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

    @property
    def identity(self) -> str:
        """What --resume matches on: the record's ``id`` when given, else ``path:line``."""
        return self.id if self.id is not None else self.source

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

    @property
    def identity(self) -> str:
        return self.id if self.id is not None else self.source


Item = Record | Invalid
