"""Where accepted messages go: queue selection, offsets, msg_ids, and ListMessages.

Every message is placed as a RocketMQ producer places it with no selector: round-robin
over the topic's queues, ordered broker by broker (``broker-0`` queues 0..Q-1, then
``broker-1`` ...), and gets the next ``queue_offset`` of that queue (0, 1, 2 ...). Topics
are per instance, as on DMS where each instance is its own cluster.

The store lives in memory; with a ``Journal`` (SQLite) it also survives restarts:
``Store.open`` reloads offsets and arrival numbers so both continue where they stopped,
and ListMessages reads the journal instead of memory.

``append`` is on the hot path of every SendMessage: a few dict and list operations, no
I/O (the journal only queues the row).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

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
        """The message's keys: its KEYS property split on spaces, as RocketMQ does."""
        for name, value in self.properties:
            if name == KEYS:
                return tuple(value.split())
        return ()


#: ListMessages' page size when the request gives none, and the most it may ask for.
DEFAULT_LIMIT = 10
MAX_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """ListMessages' filters; every given one must match. Times are ms since the epoch,
    inclusive, compared with ``store_timestamp``; ``keys`` matches a message holding any."""

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
        if self.end_time is not None and m.store_timestamp > self.end_time:
            return False
        return not self.keys or any(k in self.keys for k in m.keys)


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
    """A journal's state at open: the next arrival number and every queue's offsets."""

    next_seq: int
    queues: list[QueueState]


class Journal(Protocol):
    """Persistence behind the store (``journal.SqliteJournal``)."""

    #: Set once a write failed; the store then refuses new messages.
    failed: BaseException | None

    def add(self, message: StoredMessage) -> None:
        """Queue one message for the next batched commit; no I/O here."""

    async def query(self, query: MessageQuery) -> tuple[list[StoredMessage], int]:
        """Like ``Store.query``, over everything committed and queued."""
        ...

    async def flush(self) -> None:
        """Wait until everything added so far is committed."""

    async def close(self) -> None:
        """Commit what remains and close."""


class StoreError(Exception):
    """The journal could not write; the server answers 500 from then on."""


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
        # With a journal, ListMessages reads it; memory keeps nothing.
        self._recent: deque[StoredMessage] = deque(maxlen=0 if journal else keep)
        self._topics: dict[tuple[str, str], _Topic] = {}
        # (broker, queue_id) of each round-robin slot, computed once.
        self._places = [divmod(slot, queues) for slot in range(self._slots)]
        # 16 random hex digits per run + the arrival number: unique across restarts too.
        self._id_prefix = os.urandom(8).hex().upper()
        self._seq = 0
        if restored is not None:
            self._restore(restored)
        self._first_seq = self._seq

    def _restore(self, restored: Restored) -> None:
        self._seq = restored.next_seq
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
    ) -> StoredMessage:
        """Place and keep one message; raises StoreError once the journal has failed."""
        journal = self._journal
        if journal is not None and journal.failed is not None:
            raise StoreError(str(journal.failed))
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
        # tuple.__new__ skips NamedTuple's Python-level __new__: ~0.5 µs a message.
        message: StoredMessage = _new_tuple(StoredMessage, (
            seq, f"{self._id_prefix}{seq:016X}", instance_id, topic_name, body, properties,
            broker, queue_id, offset, now_ms, now_ms, born_host,
        ))  # fmt: skip
        if journal is not None:
            journal.add(message)
        else:
            self._recent.append(message)
        return message

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
        matching = [m for m in self._recent if query.matches(m)]
        return matching[query.offset : query.offset + query.limit], len(matching)

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
