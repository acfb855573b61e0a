"""Per-key order (``--ordered``): records with the same key go one at a time, in input
order, the next only after the previous one succeeded or finally failed; different keys
still run in parallel.

``KeyLanes`` is bookkeeping only (no I/O, no clock): the dispatcher ``admit``s each record;
a record whose key already has one in flight waits in that key's lane; the worker that
finishes a record ``release``s its key and carries straight on with the lane's next record,
so a key never holds more than one worker and never waits behind another key.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from bulksend.record import KEYS, TAGS, Record

#: What waits in a lane: a Record, or the sender's (record, intended time) pair.
T = TypeVar("T")


def key_function(order_by: str | None) -> Callable[[Record], str | None]:
    """How to find a record's ordering key: its KEYS property by default, or ``order_by``:
    ``topic``, ``id``, ``keys``, ``tags`` or any property name. None = no key (unordered)."""
    field = (order_by or "keys").strip()
    lowered = field.lower()
    if lowered == "topic":
        return lambda r: r.topic
    if lowered == "id":
        return lambda r: r.id
    name = {"keys": KEYS, "tags": TAGS}.get(lowered, field)

    def by_property(record: Record) -> str | None:
        for n, v in record.properties:
            if n == name:
                return v
        return None

    return by_property


class KeyLanes(Generic[T]):
    """Records waiting behind an in-flight record of the same key; ``waiting`` is bounded
    by the dispatcher (it stops reading while ``waiting >= limit``)."""

    def __init__(self, key_of: Callable[[T], str | None]) -> None:
        self.key_of = key_of
        self._lanes: dict[str, deque[T]] = {}
        self.waiting = 0

    def admit(self, record: T) -> bool:
        """True: send it now. False: it waits in its key's lane (the key is busy)."""
        key = self.key_of(record)
        if key is None:
            return True
        lane = self._lanes.get(key)
        if lane is None:
            self._lanes[key] = deque()
            return True
        lane.append(record)
        self.waiting += 1
        return False

    def release(self, record: T) -> T | None:
        """``record`` is finished: the next record of its key, to send now, or None."""
        key = self.key_of(record)
        if key is None:
            return None
        lane = self._lanes.get(key)
        if not lane:
            self._lanes.pop(key, None)
            return None
        self.waiting -= 1
        return lane.popleft()

    @property
    def busy_keys(self) -> int:
        return len(self._lanes)
