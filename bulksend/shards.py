"""Which shard sends which record, and when: pure functions and one pacer, no I/O.

A distributed run (``--workers N``, ``--cluster ADDRESS``) splits one job into ``n`` shards,
each the normal pipeline on a Dask worker. Every shard reads the inputs and keeps its own
records, so the split must be a function of the record alone, the same in every process
and on every run:

* **By position** (the default): record ``seq`` goes to shard ``seq % n``. ``seq`` is fixed
  by the record's place in the inputs, not by who reads it, so a re-run shard or a
  ``--resume`` finds exactly the records it had before. Striding rather than contiguous
  ranges because it needs no count of the records up front (no pre-pass over a gzip file
  or an object store before the first send) and keeps the shards' shares equal to within
  one record all through the run: under ``--rate`` every shard has work until the very end,
  so the total rate holds to the last record instead of sagging as shards with shorter
  ranges finish. Its cost is that every shard reads and parses the whole input (3.5 µs of
  CPU a record, against ~68 µs to send one: 5 % a shard at 2 shards, more than the send
  itself past ~20); byte-range reading of plain JSONL (each shard reading only its span)
  will replace it for the inputs that allow it.
* **By key** (``--ordered``): a record with an ordering key goes to ``stable_hash(key) %
  n``, so all records of a key go through one shard, whose key lanes keep their input
  order; a record with no key is unordered and goes by position. The hash is BLAKE2b of
  the key's UTF-8 bytes: Python's ``hash`` is salted per process (PYTHONHASHSEED) and
  would scatter a key's records over several shards.

**Rate.** ``--rate R`` is the total: each shard paces ``R / n`` on its own slots of one
grid shared through a wall-clock epoch from the driver, ``epoch + (i + k·n) / R``, so the
merged stream is evenly spaced at ``1 / R`` rather than ``n`` messages at once every
``n / R``. A shard that starts late (a slow worker start, a re-run after a lost worker)
joins at its next slot instead of catching up in a burst. ``pacer.Schedule`` can start
at an offset (``anchor_elapsed``), but from the Sender's own clock, which each process
starts at its first record; ``SlotSchedule`` maps the shared grid onto that clock.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from bulksend.errors import ConfigError
from bulksend.ordering import key_function
from bulksend.pacer import Pacer, Schedule
from bulksend.record import Item, Record

#: Default dashboard address of --workers: loopback only (it shows the inputs' paths).
DASHBOARD = "127.0.0.1:8787"


#: Local workers a CPU may have: a network-bound run gains from more workers than cores
#: (each waits on its answers), and beyond this a machine only swaps.
WORKERS_PER_CPU = 8


def local_workers_max() -> int:
    """The most --workers of one machine's LocalCluster."""
    return WORKERS_PER_CPU * (os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """Where a distributed run's shards go: a new LocalCluster of ``workers`` processes, or
    the scheduler at ``address``. ``shards`` defaults to one per worker thread."""

    workers: int | None = None
    address: str | None = None
    shards: int | None = None
    #: --workers: the LocalCluster dashboard's host:port (port 0: any free one; None: off).
    dashboard_address: str | None = DASHBOARD
    #: ``--out`` in an object store: seconds between a shard's uploads of its new ledger
    #: lines (what a lost worker may cost in re-sends: this long of its sends).
    segment_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if (self.workers is None) == (self.address is None):
            raise ConfigError("give one of --workers N and --cluster ADDRESS")
        if self.address is not None:
            check_scheduler_address(self.address)
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be >= 1")
        if self.workers is not None and self.workers > (most := local_workers_max()):
            # Each worker is a process of ~60 MB that starts in about a second: 100,000 of
            # them grew the driver without end and never started one.
            raise ConfigError(
                f"--workers {self.workers:,} is more than one machine runs (at most {most}"
                f" here: {WORKERS_PER_CPU} a CPU); for more, start `dask worker`s on more"
                " machines and give --cluster ADDRESS"
            )
        if self.shards is not None and self.shards < 1:
            raise ConfigError("--shards must be >= 1")
        if not (math.isfinite(self.segment_interval_s) and self.segment_interval_s > 0):
            raise ConfigError("--segment-interval must be a number of seconds above 0")


def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process and on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """How records are split over ``shards`` shards (see the module docstring)."""

    shards: int
    #: Split by the ordering key (``--ordered``), else by position.
    ordered: bool = False
    #: The ordering key as ``--order-by`` names it (None: KEYS).
    order_by: str | None = None

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"a plan needs at least one shard, not {self.shards}")

    def shard_of(self, item: Item) -> int:
        """The shard that sends ``item`` (0-based)."""
        if self.ordered and isinstance(item, Record):
            key = key_function(self.order_by)(item)
            if key is not None:
                return stable_hash(key) % self.shards
        return item.seq % self.shards

    def owner(self, index: int) -> _Owner:
        """A predicate true for exactly the items of shard ``index``."""
        if not 0 <= index < self.shards:
            raise ValueError(f"shard {index} is not in 0..{self.shards - 1}")
        return _Owner(self, index)


class _Owner:
    """``plan.shard_of(item) == index``, with the key function looked up once."""

    __slots__ = ("_index", "_key_of", "_shards")

    def __init__(self, plan: ShardPlan, index: int) -> None:
        self._shards = plan.shards
        self._index = index
        self._key_of = key_function(plan.order_by) if plan.ordered else None

    def __call__(self, item: Item) -> bool:
        if self._key_of is not None and isinstance(item, Record):
            key = self._key_of(item)
            if key is not None:
                return stable_hash(key) % self._shards == self._index
        return item.seq % self._shards == self._index


def shard_rate(total_rate: float, shards: int) -> float:
    """Each shard's pace for a run paced at ``total_rate`` in all (0 = unpaced)."""
    return total_rate / shards if total_rate > 0 else 0.0


def first_slot(now: float, epoch: float, index: int, shards: int, total_rate: float) -> float:
    """When shard ``index`` may send its first message: its first slot at or after ``now``
    on the grid ``epoch + (index + k·shards) / total_rate`` (k = 0, 1, ...). Times in any
    one unit of seconds (the driver and workers use the wall clock). Unpaced: ``now``."""
    if total_rate <= 0:
        return now
    start = epoch + index / total_rate
    if now <= start:
        return start
    period = shards / total_rate
    return start + math.ceil((now - start) / period) * period


class SlotSchedule:
    """The pacer (``bulksend.pacer.Pacer``) of shard ``index`` of ``shards`` in a run paced
    at ``total_rate`` in all: ``Schedule(total_rate / shards)`` whose first message is due
    on the shard's first slot of the grid from ``epoch`` (wall-clock seconds).

    Subtleness ahead! The Sender measures ``elapsed`` from its first record and asks for
    that record's due time at once; so the first question is answered at elapsed ~0, and
    that is when the grid is mapped onto the Sender's clock (the one read of ``clock``).
    Were it asked later, the grid would still hold: the first slot is never before the
    moment of asking, so a late mapping delays the messages, it never bursts. The first
    message itself goes at once (at most one period ``shards / total_rate`` before its
    slot): the pool restarts its clock at every look until a first message is sent, so a
    first message due later than 0 would never be due. The second one is back on the grid.
    ``set_rate`` (``--adaptive``, per shard) starts a new segment as ``Schedule`` does.
    """

    def __init__(
        self,
        total_rate: float,
        shards: int,
        index: int,
        epoch: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._schedule = Schedule(shard_rate(total_rate, shards))
        self._grid = (epoch, index, shards, total_rate)
        self._clock = clock
        self._mapped = total_rate <= 0

    @property
    def rate(self) -> float:
        return self._schedule.rate

    def _map(self) -> Schedule:
        if not self._mapped:
            now = self._clock()
            self._schedule.anchor_elapsed = first_slot(now, *self._grid) - now
            self._mapped = True
        return self._schedule

    def wait(self, elapsed: float, sent: int) -> float:
        return self.due_at(sent) - elapsed

    def due_at(self, sent: int) -> float:
        due = self._map().due_at(sent)
        return 0.0 if sent == 0 else due

    def set_rate(self, rate: float, elapsed: float, sent: int) -> None:
        self._map().set_rate(rate, elapsed, sent)


class InterleavedPacer:
    """The pacer of shard ``index`` of ``shards`` in a distributed ``load``: its message
    ``k`` is message ``index + k·shards`` of the whole schedule ``whole`` (any stages),
    so the shards' messages merge into exactly the schedule one process would keep, at
    ``1 / shards`` of its rate each. The schedule starts at ``epoch`` (wall-clock s, from
    the driver) in every shard.

    The Sender's clock starts at the shard's first message, which goes at once (the pool
    restarts its clock until a first message is sent; the shard waits for its first due
    time before it starts, ``first_due``); the rest are mapped onto that clock with the
    one read of ``clock``. A shard that starts late sends its late messages at once, and
    the load counts them late, as one process would.
    """

    def __init__(
        self,
        whole: Pacer,
        index: int,
        shards: int,
        epoch: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._whole, self._index, self._shards = whole, index, shards
        self._epoch, self._clock = epoch, clock
        self._shift: float | None = None

    @property
    def rate(self) -> float:
        return self._whole.rate / self._shards

    def first_due(self) -> float:
        """Wall-clock s at which this shard's first message is due."""
        return self._epoch + self._whole.due_at(self._index)

    def due_at(self, sent: int) -> float:
        if self._shift is None:
            self._shift = self._clock() - self._epoch
        if sent == 0:
            return 0.0
        return self._whole.due_at(self._index + sent * self._shards) - self._shift

    def wait(self, elapsed: float, sent: int) -> float:
        return self.due_at(sent) - elapsed

    def set_rate(self, rate: float, elapsed: float, sent: int) -> None:
        raise ValueError("a shard of a distributed load keeps the run's schedule")


#: The address forms of a Dask scheduler a driver can reach: a comm scheme, a host, a port.
_SCHEDULER = re.compile(r"(?:(tcp|tls|ws|wss|ucx)://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")


def check_scheduler_address(address: str) -> None:
    """``--cluster ADDRESS`` looked at before anything opens: Dask's own parser fails a
    typo with a traceback, after the run's outputs are open."""
    m = _SCHEDULER.fullmatch(address)
    if m is None or not 0 < int(m.group(3)) < 65536:
        raise ConfigError(
            f"--cluster {address!r} is not a Dask scheduler address: give"
            " tcp://HOST:PORT (or tls://HOST:PORT), e.g. tcp://10.0.0.5:8786"
        )
