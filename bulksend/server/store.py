"""Where accepted messages go: queue selection, offsets, msg_ids, and ListMessages.

Every message is placed as a RocketMQ producer places it with no selector: round-robin
over the topic's queues, ordered broker by broker (``broker-0`` queues 0..Q-1, then
``broker-1`` ...), and gets the next ``queue_offset`` of that queue (0, 1, 2 ...). Topics
are per instance, as on DMS where each instance is its own cluster.

The store lives in memory; with a ``Journal`` (SQLite) it also survives restarts: a
restored store continues the offsets and arrival numbers of what was stored, and
ListMessages reads the journal instead of memory.

``append`` is on the hot path of every SendMessage: a few dict and list operations, no
I/O. With a journal it also returns the ``Commit`` the message waits for: the server
answers only once that resolves (see ``journal``).

In memory, ListMessages does bounded work: a ``msg_id`` is found by its arrival number,
a ``key`` through an index of KEYS, a time range by bisection (store times never go
back); only what is left is scanned.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import os
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any, NamedTuple, Protocol

from bulksend.record import KEYS


class StoredMessage(NamedTuple):
    """One accepted message. A NamedTuple rather than a dataclass: built ~10k times a
    second, and a tuple is the cheapest immutable record to build."""

    #: Arrival number, 0-based, continuing across restarts of a SQLite store.
    seq: int
    msg_id: str
    instance_id: str
    topic: str
    body: str
    properties: tuple[tuple[str, str], ...]
    broker: int
    queue_id: int
    queue_offset: int
    #: Milliseconds since the epoch.
    store_timestamp: int
    born_timestamp: int
    #: The sender's address, ``ip:port``.
    born_host: str

    @property
    def keys(self) -> tuple[str, ...]:
        """The message's keys: its KEYS property split on spaces, as RocketMQ does (each
        key once)."""
        for name, value in self.properties:
            if name == KEYS:
                return tuple(_unique(value))
        return ()


#: ListMessages' page size when the request gives none, and the most it may ask for.
DEFAULT_LIMIT = 10
MAX_LIMIT = 10_000
#: The most keys one ListMessages request may ask for (space-separated in ``key``).
MAX_KEYS = 100

#: The Future of one batch commit: resolves to None once stored, else to the error.
Commit = asyncio.Future[BaseException | None]


def seq_of_msg_id(msg_id: str) -> int:
    """The arrival number in a msg_id (its last 16 hex digits), -1 if it has none."""
    try:
        return int(msg_id[-16:], 16) if len(msg_id) == 32 else -1
    except ValueError:
        return -1


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """ListMessages' filters; every given one must match. Times are ms since the epoch,
    inclusive, compared with ``store_timestamp``; ``keys`` matches a message holding any
    (``matches`` leaves keys to the store's index)."""

    instance_id: str | None = None
    topic: str | None = None
    queue: int | None = None
    keys: tuple[str, ...] = ()
    msg_id: str | None = None
    start_time: int | None = None
    end_time: int | None = None
    offset: int = 0
    limit: int = DEFAULT_LIMIT

    def matches(self, m: StoredMessage) -> bool:
        if self.instance_id is not None and m.instance_id != self.instance_id:
            return False
        if self.topic is not None and m.topic != self.topic:
            return False
        if self.queue is not None and m.queue_id != self.queue:
            return False
        if self.msg_id is not None and m.msg_id != self.msg_id:
            return False
        if self.start_time is not None and m.store_timestamp < self.start_time:
            return False
        return self.end_time is None or m.store_timestamp <= self.end_time


_new_tuple = tuple.__new__


class QueueState(NamedTuple):
    """What a restart must restore of one topic queue."""

    instance_id: str
    topic: str
    broker: int
    queue_id: int
    next_offset: int
    messages: int


class Restored(NamedTuple):
    """A journal's state at open: the next arrival number, every queue's offsets, and the
    last store time (ms; later messages never get an earlier one)."""

    next_seq: int
    queues: list[QueueState]
    last_store_ts: int = 0


class Journal(Protocol):
    """Persistence behind the store (``journal.SqliteJournal``)."""

    #: Set once a write failed; the store then refuses new messages.
    failed: BaseException | None

    def add(self, message: StoredMessage) -> Commit:
        """Put one message in the next batched commit (no I/O here); that commit."""
        ...

    async def query(self, query: MessageQuery) -> tuple[list[StoredMessage], int]:
        """Like ``Store.query``, over everything committed."""
        ...

    async def flush(self) -> None:
        """Wait until everything added so far is committed."""

    async def close(self) -> None:
        """Commit what remains and close."""


class StoreError(Exception):
    """The journal could not write; the server answers 500 from then on."""


#: A kept message in memory: a plain tuple of StoredMessage's fields, in its order.
#:
#: Subtleness ahead! The garbage collector stops tracking a tuple whose items are all
#: untracked (strings, ints, such tuples), but only an exact tuple, never a NamedTuple: a
#: million kept StoredMessages stayed tracked and every full collection walked them all
#: (measured: 2 µs a request, 80 ms a collection at 300,000 messages). Kept as plain
#: tuples they drop out of the collector's lists at its first pass.
_Row = tuple[Any, ...]
_SEQ, _PROPERTIES, _STORE_TS = 0, 5, 9
_seq_of = itemgetter(_SEQ)
_store_time = itemgetter(_STORE_TS)

#: "00".."FF": the last two hex digits of a msg_id (see Store.append).
_HEX2 = [f"{n:02X}" for n in range(256)]


def _unique(keys: str) -> list[str]:
    """The keys of a KEYS value, each once, in order."""
    split = keys.split()
    return list(dict.fromkeys(split)) if len(split) > 1 else split


class _Topic:
    __slots__ = ("next", "turn")

    def __init__(self, slots: int) -> None:
        self.turn = 0  # round-robin position: messages placed so far
        self.next = [0] * slots  # next queue_offset of each queue, broker-major


class Store:
    """Accepted messages, their queues and offsets. Not thread-safe: the event loop's."""

    def __init__(
        self,
        *,
        queues: int = 8,
        brokers: int = 1,
        keep: int | None = 1_000_000,
        journal: Journal | None = None,
        restored: Restored | None = None,
    ) -> None:
        self.queues = queues
        self.brokers = brokers
        self._slots = queues * brokers
        self._journal = journal
        # How many messages memory keeps for ListMessages (0 or None: all of them; with a
        # journal, none: ListMessages reads the journal).
        self._keep = keep or sys.maxsize
        self._recent: deque[_Row] = deque()
        # key -> the kept messages holding it, oldest first (so eviction pops the front).
        self._by_key: dict[str, deque[_Row]] = {}
        self._last_ms = 0
        self._topics: dict[tuple[str, str], _Topic] = {}
        # (broker, queue_id) of each round-robin slot, computed once.
        self._places = [divmod(slot, queues) for slot in range(self._slots)]
        # 16 random hex digits per run + the arrival number: unique across restarts too.
        self._id_prefix = os.urandom(8).hex().upper()
        self._id_high = -1  # the arrival number >> 8 that _id_head holds
        self._id_head = ""
        self._seq = 0
        if restored is not None:
            self._restore(restored)
        self._first_seq = self._seq

    def _restore(self, restored: Restored) -> None:
        self._seq = restored.next_seq
        self._last_ms = restored.last_store_ts
        for q in restored.queues:
            topic = self._topic(q.instance_id, q.topic)
            topic.turn += q.messages
            if q.broker < self.brokers and q.queue_id < self.queues:
                topic.next[q.broker * self.queues + q.queue_id] = q.next_offset

    def _topic(self, instance_id: str, name: str) -> _Topic:
        topic = self._topics.get((instance_id, name))
        if topic is None:
            topic = self._topics[(instance_id, name)] = _Topic(self._slots)
        return topic

    @property
    def accepted(self) -> int:
        """Messages accepted since this store was opened (restored ones not counted)."""
        return self._seq - self._first_seq

    @property
    def total(self) -> int:
        """Messages stored in all, restored ones included."""
        return self._seq

    def append(
        self,
        instance_id: str,
        topic_name: str,
        body: str,
        properties: tuple[tuple[str, str], ...],
        born_host: str,
        now_ms: int,
    ) -> tuple[StoredMessage, Commit | None]:
        """Place and keep one message; the Commit it waits for (None: in memory, kept
        already). Raises StoreError once the journal has failed."""
        journal = self._journal
        if journal is not None and journal.failed is not None:
            raise StoreError(str(journal.failed))
        if now_ms < self._last_ms:
            now_ms = self._last_ms  # never back in time: ListMessages bisects on it, and
            # the journal maps time ranges to arrival numbers by it (across restarts too)
        self._last_ms = now_ms
        topic = self._topics.get((instance_id, topic_name)) or self._topic(instance_id, topic_name)
        turn = topic.turn
        topic.turn = turn + 1
        slot = turn % self._slots
        offsets = topic.next
        offset = offsets[slot]
        offsets[slot] = offset + 1
        seq = self._seq
        self._seq = seq + 1
        broker, queue_id = self._places[slot]
        # The msg_id is the prefix and the arrival number in 16 hex digits. Formatting an
        # int costs ~0.5 µs; the first 30 digits change once every 256 messages, so they
        # are formatted then, and each id is that head and two digits from a table.
        high = seq >> 8
        if high != self._id_high:
            self._id_high = high
            self._id_head = f"{self._id_prefix}{high:014X}"
        row = (
            seq, self._id_head + _HEX2[seq & 0xFF], instance_id, topic_name, body, properties,
            broker, queue_id, offset, now_ms, now_ms, born_host,
        )  # fmt: skip
        # tuple.__new__ skips NamedTuple's Python-level __new__: ~0.5 µs a message.
        message: StoredMessage = _new_tuple(StoredMessage, row)
        if journal is not None:
            return message, journal.add(message)
        recent = self._recent
        if len(recent) >= self._keep and recent:
            self._forget_oldest()
        recent.append(row)
        for name, value in properties:
            if name == KEYS:
                self._index(row, value)
                break
        return message, None

    def _index(self, row: _Row, keys: str) -> None:
        by_key = self._by_key
        for key in _unique(keys):
            kept = by_key.get(key)
            if kept is None:
                by_key[key] = deque((row,))
            else:
                kept.append(row)

    def _forget_oldest(self) -> None:
        """Drop the oldest kept message, and its keys' index entries (at their fronts)."""
        old = self._recent.popleft()
        for name, value in old[_PROPERTIES]:
            if name == KEYS:
                by_key = self._by_key
                for key in _unique(value):
                    kept = by_key[key]
                    kept.popleft()
                    if not kept:
                        del by_key[key]
                break

    def offsets(self) -> Iterable[tuple[str, str, int, int, int]]:
        """(instance_id, topic, broker, queue_id, next_offset) of every queue in use."""
        for (instance_id, name), topic in sorted(self._topics.items()):
            for slot, next_offset in enumerate(topic.next):
                if next_offset:
                    broker, queue_id = divmod(slot, self.queues)
                    yield instance_id, name, broker, queue_id, next_offset

    def topic_counts(self) -> Iterable[tuple[str, str, int]]:
        """(instance_id, topic, messages stored) of every topic."""
        for (instance_id, name), topic in sorted(self._topics.items()):
            yield instance_id, name, topic.turn

    async def query(self, query: MessageQuery) -> tuple[list[StoredMessage], int]:
        """One page of the matching messages in arrival order, and how many match in all."""
        if self._journal is not None:
            return await self._journal.query(query)
        as_message = StoredMessage._make
        matching = [m for m in map(as_message, self._candidates(query)) if query.matches(m)]
        if query.keys and query.msg_id is not None:  # found by msg_id: check its keys too
            wanted = set(query.keys)
            matching = [m for m in matching if not wanted.isdisjoint(m.keys)]
        return matching[query.offset : query.offset + query.limit], len(matching)

    def _candidates(self, q: MessageQuery) -> Iterable[_Row]:
        """The kept messages that may match, in arrival order: bounded by the msg_id, the
        keys' index or the time range, whichever the query gives first."""
        recent = self._recent
        if not recent:
            return ()
        if q.msg_id is not None:
            at = seq_of_msg_id(q.msg_id) - recent[0][_SEQ]  # kept messages have no gaps
            return (recent[at],) if 0 <= at < len(recent) else ()
        if q.keys:
            held = [self._by_key[k] for k in dict.fromkeys(q.keys) if k in self._by_key]
            if len(held) == 1:
                return held[0]
            merged = heapq.merge(*held, key=_seq_of)
            return dict.fromkeys(merged)  # a message holding two of the keys once
        lo = (
            0 if q.start_time is None else bisect.bisect_left(recent, q.start_time, key=_store_time)
        )
        hi = (
            len(recent)
            if q.end_time is None
            else bisect.bisect_right(recent, q.end_time, key=_store_time)
        )
        return islice(recent, lo, hi)

    async def messages(self, query: MessageQuery | None = None) -> list[StoredMessage]:
        """Every matching message (for tests: no page limit), in arrival order."""
        q = query or MessageQuery()
        page, _ = await self.query(
            MessageQuery(
                q.instance_id, q.topic, q.queue, q.keys, q.msg_id, q.start_time, q.end_time,
                offset=0, limit=2**62,
            )
        )  # fmt: skip
        return page

    async def flush(self) -> None:
        """Wait until everything appended so far is committed (no-op in memory)."""
        if self._journal is not None:
            await self._journal.flush()

    async def close(self) -> None:
        """Commit what remains and release the journal."""
        if self._journal is not None:
            await self._journal.close()
