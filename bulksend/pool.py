"""The pool: a dispatcher paces records into a bounded queue; ``concurrency`` workers, each
holding one ``Courier``, deliver them and report each result the moment it is in, in
completion order. The pool knows no HTTP: how a record is delivered is the courier's
business (``bulksend.delivery``); the pool decides only *when* and *by which worker*.

This module and ``delivery`` are the only code that reads the clock and sleeps for a send,
so the pacer, the retry policy, AIMD and the key lanes stay pure functions of what they are
told, testable with tables.

Clocks: ``time.monotonic()`` for every interval (latency, pacing), never ``loop.time()``:
uvloop's loop time has millisecond resolution, which would quantise loopback latencies
to whole milliseconds and pace high rates in 1 ms steps.

Shutdown order is fixed, so that nothing read is ever lost and nothing waits forever:
stop the source -> close the work queue (one sentinel per worker) -> workers finish what
they hold and report it -> the task group of ``run()`` ends -> ``run()`` returns.
``stop()`` enters that order early (a drain); cancelling ``run()`` cancels whatever still
runs.

Extension points, each a single place:

* ``on_dispatch(now)`` runs before each record is paced: periodic control (AIMD's quiet
  windows); when it returns an awaitable, dispatch waits for it (a gate that holds every
  new record while the target is down).
* ``_pace`` is the pacing driver: the one await between a record being read and it being
  due. Pacing by the loop turn (one wake-up releasing every record due by then) replaces
  this method and the queue hop below it, nothing else.
* A ``Courier`` does every attempt for a record; per-record work before the first attempt
  (a write-ahead intent) belongs there, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from bulksend.config import SendOptions
from bulksend.ordering import KeyLanes, key_function
from bulksend.pacer import Pacer
from bulksend.record import Invalid, Item, Record
from bulksend.result import FAILED, INVALID, OK, SKIPPED, Result, result_for

#: Records pulled from a blocking source per hop to a worker thread.
READ_BATCH = 512
#: --ordered: records that may wait in key lanes, per unit of concurrency, before the
#: dispatcher stops reading (a hot key must not pull the whole input into memory).
LANE_WAITING_PER_WORKER = 16

Items = Iterable[Item] | AsyncIterable[Item]
#: A record on its way to a worker, with the monotonic time it was due (0.0 when unpaced).
Work = tuple[Record, float]
#: Called with each item and its result as it completes; may return an awaitable.
OnResult = Callable[[Item, Result], Awaitable[None] | None]


class BatchSource(Protocol):
    """A blocking source that hands out records n at a time (``bulksend.sources.Inputs``)."""

    def batches(self, n: int) -> Iterator[list[Item]]: ...


class Courier(Protocol):
    """One worker's means of delivery: every attempt for a record, always a Result."""

    def deliver(self, record: Record, intended: float) -> Awaitable[Result]:
        """``intended``: the monotonic time the pacer meant it to go (0.0 = unpaced)."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Counters:
    """Live figures for progress hooks and adaptive control; the pool and the couriers
    write, others read."""

    dispatched: int = 0
    in_flight: int = 0
    retrying: int = 0
    ok: int = 0


def invalid_result(item: Invalid) -> Result:
    result = result_for(item, INVALID)
    result.error_code = "INVALID_RECORD"
    result.error_msg = item.error
    return result


def skipped_result(item: Item) -> Result:
    return result_for(item, SKIPPED)


class Pool:
    """Bounded workers fed by one pacing dispatcher. See the module docstring."""

    def __init__(
        self,
        options: SendOptions,
        schedule: Pacer,
        open_courier: Callable[[], Courier],
        *,
        counters: Counters | None = None,
        on_dispatch: Callable[[float], Awaitable[None] | None] | None = None,
    ) -> None:
        self.options = options
        self.schedule = schedule
        self.counters = counters or Counters()
        self._open_courier = open_courier
        self._on_dispatch = on_dispatch
        self._key_of = key_of = key_function(options.order_by)
        self._lanes: KeyLanes[Work] | None = (
            KeyLanes(lambda w: key_of(w[0])) if options.ordered else None
        )
        self._failed_keys: dict[str, int] = {}
        self._lane_space = asyncio.Event()
        self._stopping = asyncio.Event()
        self._t0 = 0.0

    def stop(self) -> None:
        """Drain: read no more records; what is in flight finishes and is reported."""
        self._stopping.set()
        self._lane_space.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def set_rate(self, rate: float) -> None:
        """Change the paced rate from now on (adaptive control, ramps). 0 = unpaced."""
        elapsed = time.monotonic() - self._t0
        self.schedule.set_rate(rate, elapsed, self.counters.dispatched)

    async def run(
        self,
        items: Items | BatchSource,
        on_result: OnResult,
        *,
        done: Callable[[Item], bool] | None = None,
    ) -> None:
        """Deliver every record; ``on_result(item, result)`` for each item as it completes
        (invalid items as ``invalid``, items ``done(item)`` says were sent before as
        ``skipped``). Returns when every item is reported or a drain finished.

        Subtleness ahead! A worker reports its result itself, the moment the answer is in,
        with no queue between it and ``on_result``: a ledger written from ``on_result`` then
        trails the server by no more than the requests in flight, which is what bounds the
        duplicates a kill -9 can cause (a buffer here would add its size to that bound).
        """
        n = self.options.concurrency
        inbox: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=n)
        self._t0 = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    self._dispatch(items, done, inbox, on_result, n), name="bulksend-dispatch"
                )
                for i in range(n):
                    tg.create_task(
                        self._work(self._open_courier(), inbox, on_result),
                        name=f"bulksend-worker-{i}",
                    )
        except BaseExceptionGroup as group:
            # One failure (say, an input read error) is the run's failure: raise it as
            # itself so the CLI's one boundary can translate it.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    # --- dispatcher ----------------------------------------------------------------------

    @staticmethod
    async def _items(items: Items | BatchSource) -> AsyncGenerator[Item, None]:
        if hasattr(items, "batches"):
            # A blocking file source: read and parse a batch in a worker thread while the
            # loop keeps sending; one thread hop per READ_BATCH records.
            batches = items.batches(READ_BATCH)
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                for item in batch:
                    yield item
        elif isinstance(items, AsyncIterable):
            async for item in items:
                yield item
        else:
            for i, item in enumerate(items):
                yield item
                if i % READ_BATCH == READ_BATCH - 1:
                    await asyncio.sleep(0)  # let workers run while a long list is queued

    async def _dispatch(
        self,
        items: Items | BatchSource,
        done: Callable[[Item], bool] | None,
        inbox: asyncio.Queue[Work | None],
        on_result: OnResult,
        workers: int,
    ) -> None:
        monotonic = time.monotonic
        counters, schedule, lanes = self.counters, self.schedule, self._lanes
        on_dispatch = self._on_dispatch
        lane_limit = LANE_WAITING_PER_WORKER * self.options.concurrency
        async with contextlib.aclosing(self._items(items)) as stream:
            async for item in stream:
                if self._stopping.is_set():
                    break
                if done is not None and done(item):
                    if (waiting := on_result(item, skipped_result(item))) is not None:
                        await waiting
                    continue
                if isinstance(item, Invalid):
                    if (waiting := on_result(item, invalid_result(item))) is not None:
                        await waiting
                    continue
                if on_dispatch is not None and (held := on_dispatch(monotonic())) is not None:
                    await held
                    if self._stopping.is_set():
                        break
                if counters.dispatched == 0:
                    # The schedule starts with the first record, not with run(): reading
                    # the first batch takes a while, and a clock started before it would
                    # find the first messages overdue and send them in a burst.
                    self._t0 = monotonic()
                intended = 0.0
                if schedule.rate > 0:
                    intended = await self._pace(counters.dispatched)
                    if self._stopping.is_set():
                        break
                counters.dispatched += 1
                work = (item, intended)
                if lanes is not None:
                    while lanes.waiting >= lane_limit and not self._stopping.is_set():
                        self._lane_space.clear()
                        await self._lane_space.wait()
                    if not lanes.admit(work):
                        continue  # its key is busy: the worker holding the key sends it next
                await inbox.put(work)
        # Close the work queue: one sentinel per worker. Not in a ``finally``: when the run is
        # cancelled, nobody is left to take them and a full queue would block forever.
        for _ in range(workers):
            await inbox.put(None)

    async def _pace(self, n: int) -> float:
        """Wait until record ``n`` is due; its due time (monotonic). A drain (``stop()``)
        cuts a long pause short. Short pauses, the common case at any real rate, skip the
        cost of a cancellable wait."""
        intended = self._t0 + self.schedule.due_at(n)
        wait = intended - time.monotonic()
        if wait <= 0:
            return intended
        if wait < 0.05:
            await asyncio.sleep(wait)
            return intended
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._stopping.wait()
        return intended

    # --- workers -------------------------------------------------------------------------

    async def _work(
        self, courier: Courier, inbox: asyncio.Queue[Work | None], on_result: OnResult
    ) -> None:
        counters, lanes = self.counters, self._lanes
        deliver = courier.deliver if lanes is None else self._deliver_in_order(courier)
        try:
            while (work := await inbox.get()) is not None:
                next_work: Work | None = work
                while next_work is not None:
                    work = next_work
                    record = work[0]
                    counters.in_flight += 1
                    try:
                        result = await deliver(record, work[1])
                    finally:
                        counters.in_flight -= 1
                    if result.status == OK:
                        counters.ok += 1
                    if (waiting := on_result(record, result)) is not None:
                        await waiting
                    # Per-key order: this worker carries on with the key's next record.
                    next_work = lanes.release(work) if lanes is not None else None
                    if lanes is not None:
                        self._lane_space.set()
                        if self._stopping.is_set() and next_work is not None:
                            next_work = None  # drain: lane leftovers are for --resume
        finally:
            courier.close()

    def _deliver_in_order(self, courier: Courier) -> Callable[[Record, float], Awaitable[Result]]:
        """``courier.deliver`` with --on-key-failure skip: once a key's record finally
        failed, its later records are reported failed without being sent."""
        key_of, failed_keys = self._key_of, self._failed_keys
        skip = self.options.on_key_failure == "skip"

        async def deliver(record: Record, intended: float) -> Result:
            key = key_of(record)
            if key is not None and skip and key in failed_keys:
                result = result_for(record, FAILED)
                result.error_code = "KEY_FAILED"
                result.error_msg = (
                    f"not sent: record seq {failed_keys[key]} with the same key"
                    " failed (--on-key-failure skip)"
                )
                return result
            result = await courier.deliver(record, intended)
            if key is not None and result.status == FAILED:
                failed_keys.setdefault(key, record.seq)
            return result

        return deliver
