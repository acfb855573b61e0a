"""The pool: records are released onto ``concurrency`` couriers as the pacer lets them go,
and each result is reported the moment it is in, in completion order. The pool knows no
HTTP: how a record is delivered is the courier's business (``bulksend.delivery``); the pool
decides only *when* and *on which courier*.

This module and ``delivery`` are the only code that reads the clock and waits for a send,
so the pacer, the retry policy, AIMD and the key lanes stay pure functions of what they are
told, testable with tables.

Clocks: ``time.monotonic()`` for every interval (latency, pacing), never ``loop.time()``:
uvloop's loop time has millisecond resolution, which would quantise loopback latencies
to whole milliseconds.

How a record moves (no queue hop, no task and no Future per record on the common path)::

    reader task ──batch──> ready (bounded deque) ──_release()──> idle courier.try_start
                                  ^                     ^              │ (callback)
                                  └── space wanted ─────┤              v
                                        timer (paced) ──┘        _finished(result)
                                                                 on_result, courier idle

* ``_release()`` runs whenever something may have become possible: records read, a courier
  idle again, a pacing timer due, a hold lifted, the rate changed. It starts every ready
  record that is due on an idle courier, and arms *one* timer for the next record that is
  not due yet. Pacing is thus by the loop turn, as wrk2 and vegeta's pacer do at high rates:
  one wake-up releases every record due by then, each with its own intended time.
* A courier with ``try_start`` (a callback) delivers with no task; otherwise the pool
  awaits ``deliver()`` in a task of its group (first connects, retries, proxies, tests).

Shutdown order is fixed, so that nothing sent goes unreported and nothing waits forever:
stop the source -> release no more records -> couriers in flight finish and report ->
the task group of ``run()`` ends -> couriers closed -> ``run()`` returns. ``stop()``
enters that order early (a drain): records read but not released are neither sent nor
reported (left for --resume). Cancelling ``run()`` closes every courier at once.

Extension points, each a single place:

* ``on_dispatch(now)`` runs before each record is released: periodic control (AIMD's quiet
  windows); when it returns an awaitable, release waits for it (a gate that holds every
  new record while the target is down).
* A ``Courier`` does every attempt for a record; per-record work before the first attempt
  (a write-ahead intent) belongs there, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import math
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from typing import Protocol

from bulksend.config import SendOptions
from bulksend.ordering import KeyLanes, key_function
from bulksend.pacer import Pacer
from bulksend.record import Invalid, Item, Record
from bulksend.result import FAILED, INVALID, OK, SKIPPED, Result, result_for

#: Records pulled from a source per hop (a worker thread's batch, or a slice of a list). A
#: batch is parsed holding the GIL: 128 records (~0.4 ms) hold up a pacing tick that much at
#: most; 512 held it ~1.5 ms, a paced run's whole queue_ms budget.
READ_BATCH = 128
#: Records read ahead of the couriers, per unit of concurrency (at least READ_BATCH): enough
#: that a loop turn freeing every courier finds work, few enough that a drain leaves little
#: read and unsent.
READY_PER_WORKER = 2
#: --ordered: records that may wait in key lanes, per unit of concurrency, before the
#: reader stops reading (a hot key must not pull the whole input into memory).
LANE_WAITING_PER_WORKER = 16

Items = Iterable[Item] | AsyncIterable[Item]
#: A record on its way to a courier, with the monotonic time it was due (0.0 when unpaced).
Work = tuple[Record, float]
#: Called with each item and its result as it completes; may return an awaitable.
OnResult = Callable[[Item, Result], Awaitable[None] | None]
#: A courier's callback: the record's final Result, or an awaitable of it (the rest of the
#: delivery goes on in a task of the pool's group: a retry, say).
Done = Callable[[Result | Awaitable[Result]], None]


class BatchSource(Protocol):
    """A blocking source that hands out records n at a time (``bulksend.sources.Inputs``)."""

    def batches(self, n: int) -> Iterator[list[Item]]: ...


class Courier(Protocol):
    """One connection's means of delivery: every attempt for a record, always a Result.

    A courier may also offer ``try_start(record, intended, done) -> bool``: deliver by
    callback, calling ``done`` once, later (never from inside ``try_start``), with the
    Result or with an awaitable of it that the pool then awaits in a task; False means it
    cannot now (not connected, say) and the pool awaits ``deliver`` instead."""

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


class _Slot:
    """A courier and the record it carries (None when idle)."""

    __slots__ = ("courier", "done", "try_start", "work")

    def __init__(
        self, courier: Courier, finished: Callable[[_Slot, Result | Awaitable[Result]], None]
    ) -> None:
        self.courier = courier
        self.work: Work | None = None
        self.try_start: Callable[[Record, float, Done], bool] | None = getattr(
            courier, "try_start", None
        )
        # One callback per slot, made once; a partial, not a lambda: one Python frame less
        # per record.
        self.done: Done = functools.partial(finished, self)


class Pool:
    """Couriers fed by one pacing release loop. See the module docstring."""

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
        self._skip_failed_keys = options.ordered and options.on_key_failure == "skip"
        self._t0 = 0.0
        self._clock_started = False
        self._stopping = False
        # Set up by run():
        self._ready: deque[Record] = deque()
        self._idle: list[_Slot] = []
        self._busy = 0
        self._on_result: OnResult = lambda item, result: None
        self._group: asyncio.TaskGroup | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._held: asyncio.Future[None] | None = None
        #: The hold is our task around on_dispatch's coroutine (a drain cancels it).
        self._held_ours = False
        #: The reader waits on this while ``ready`` is full (or lanes are).
        self._space: asyncio.Future[None] | None = None
        self._ready_high = self._ready_low = 0
        self._source_done = False
        #: Resolved when every record read is reported (or a drain finished); an error that
        #: stops the run (a sink's) is set on it.
        self._finished_all: asyncio.Future[None] | None = None
        #: Futures returned by on_result and the slots waiting for each.
        self._blocked: dict[asyncio.Future[None], list[_Slot]] = {}
        self._releasing = False
        self._again = False
        self._closed = False

    def stop(self) -> None:
        """Drain: release no more records; what is in flight finishes and is reported."""
        if self._stopping:
            return
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held is not None:
            if self._held_ours:
                self._held.cancel()  # a hold is for records to come: there are none now
            self._held = None
        self._wake_reader()
        self._check_finished()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def set_rate(self, rate: float) -> None:
        """Change the paced rate from now on (adaptive control, ramps). 0 = unpaced."""
        elapsed = time.monotonic() - self._t0
        self.schedule.set_rate(rate, elapsed, self.counters.dispatched)
        if self._finished_all is not None:
            # The timer armed for the old rate may now be late or early: look again.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._release()

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

        Subtleness ahead! Each result goes to ``on_result`` the moment its answer is in,
        with no queue between: a ledger written from ``on_result`` then trails the server
        by no more than the requests in flight, which is what bounds the duplicates a
        kill -9 can cause (a buffer here would add its size to that bound). When
        ``on_result`` returns an awaitable (the ledger line's write), the courier takes no
        new record until it is done.
        """
        n = self.options.concurrency
        loop = asyncio.get_running_loop()
        self._on_result = on_result
        self._ready = deque()
        self._busy = 0
        self._source_done = self._closed = False
        self._blocked = {}
        self._ready_high = max(READ_BATCH, READY_PER_WORKER * n)
        self._ready_low = self._ready_high // 2
        self._idle = [_Slot(self._open_courier(), self._finished) for _ in range(n)]
        slots = list(self._idle)
        self._idle.reverse()  # popped from the end: the first courier opened goes first
        self._finished_all = loop.create_future()
        self._t0 = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._read(items, done), name="bulksend-read")
                try:
                    await self._finished_all
                except BaseException:
                    # Cancelled, or an error stops the run: answers that still come in
                    # while the group winds down are nobody's to report.
                    self._closed = True
                    raise
        except BaseExceptionGroup as eg:
            # One failure (say, an input read error) is the run's failure: raise it as
            # itself so the CLI's one boundary can translate it.
            if len(eg.exceptions) == 1:
                raise eg.exceptions[0] from None
            raise
        finally:
            self._closed = True
            self._stopping = True
            if self._timer is not None:
                self._timer.cancel()
            for slot in slots:
                slot.courier.close()

    # --- reading -------------------------------------------------------------------------

    @staticmethod
    async def _batches(items: Items | BatchSource) -> AsyncGenerator[list[Item], None]:
        if hasattr(items, "batches"):
            # A blocking file source: read and parse a batch in a worker thread while the
            # loop keeps sending; one thread hop per READ_BATCH records.
            batches = items.batches(READ_BATCH)
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                yield batch
        elif isinstance(items, AsyncIterable):
            async for item in items:
                yield [item]
        else:
            iterator = iter(items)
            while batch := list(itertools.islice(iterator, READ_BATCH)):
                yield batch

    async def _read(self, items: Items | BatchSource, done: Callable[[Item], bool] | None) -> None:
        """The reader: fills ``ready``, reports invalid and skipped items at once."""
        try:
            async with contextlib.aclosing(self._batches(items)) as batches:
                await self._read_batches(batches, done)
        finally:
            self._source_done = True
            self._check_finished()

    async def _read_batches(
        self, batches: AsyncIterator[list[Item]], done: Callable[[Item], bool] | None
    ) -> None:
        ready, on_result, lanes = self._ready, self._on_result, self._lanes
        lane_limit = LANE_WAITING_PER_WORKER * self.options.concurrency
        loop = asyncio.get_running_loop()
        async for batch in batches:
            for item in batch:
                if self._stopping:
                    return
                if done is not None and done(item):
                    if (waiting := on_result(item, skipped_result(item))) is not None:
                        await waiting
                elif isinstance(item, Invalid):
                    if (waiting := on_result(item, invalid_result(item))) is not None:
                        await waiting
                else:
                    ready.append(item)
            self._release()
            while not self._stopping and (
                len(ready) >= self._ready_high
                or (lanes is not None and lanes.waiting >= lane_limit)
            ):
                self._space = loop.create_future()
                await self._space
            if self._stopping:
                return
            # A list source is read without a thread hop: let the couriers run.
            await asyncio.sleep(0)

    def _wake_reader(self) -> None:
        space, self._space = self._space, None
        if space is not None and not space.done():
            space.set_result(None)

    # --- releasing -----------------------------------------------------------------------

    def _release(self) -> None:
        """Start every ready record that is due on an idle courier. Re-entrant calls (a
        courier finishing at once, a rate change from inside) are folded into the one
        running."""
        if self._releasing:
            self._again = True
            return
        self._releasing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._release_due()
        except Exception as exc:  # on_dispatch's, a courier's: the run cannot go on
            self._fail(exc)
            return
        finally:
            self._releasing = False
        if len(self._ready) <= self._ready_low:
            self._wake_reader()
        self._check_finished()

    def _release_due(self) -> None:
        ready, idle, lanes = self._ready, self._idle, self._lanes
        counters, schedule, on_dispatch = self.counters, self.schedule, self._on_dispatch
        monotonic = time.monotonic
        # Read once per call: a rate change (set_rate) runs this loop again. The clock is
        # read again only before arming the timer: records started meanwhile took time.
        paced = schedule.rate > 0
        now = monotonic() if paced else 0.0
        while ready and idle and self._held is None and not self._stopping:
            if on_dispatch is not None:
                now = monotonic()
                if (held := on_dispatch(now)) is not None:
                    self._hold(held)
                    return
                if self._again:
                    return  # on_dispatch changed the rate: start over
            if not self._clock_started:
                # The schedule starts with the first record, not with run(): reading the
                # first batch takes a while, and a clock started before it would find the
                # first records overdue and send them in a burst. Started once, when
                # on_dispatch lets the first record go (a hold before it delays the clock
                # too): restarted on every look until a record went, a schedule whose first
                # record is due after 0 (a shard's slot) would never send.
                self._clock_started = True
                self._t0 = now = monotonic()
            intended = 0.0
            if paced:
                intended = self._t0 + schedule.due_at(counters.dispatched)
                if intended > now and intended > (now := monotonic()):
                    self._arm(intended - now)
                    return
            work = (ready.popleft(), intended)
            counters.dispatched += 1
            if lanes is not None and not lanes.admit(work):
                continue  # its key is busy: the courier holding the key sends it next
            self._start(idle.pop(), work)

    def _arm(self, delay: float) -> None:
        """One timer for the next record due; it releases every record due by then.

        The delay is rounded *up* to whole milliseconds, the resolution of the loop's
        timers (libuv's, epoll's): rounded to nearest, a wait under half a millisecond
        would be a zero timer that fires before the record is due, again and again (a busy
        loop at rates above 2,000/s). A record thus goes at most ~1 ms late, never early."""
        if self._timer is None and delay != math.inf:
            delay = math.ceil(delay * 1000.0) / 1000.0
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._release()

    def _hold(self, held: Awaitable[None]) -> None:
        """on_dispatch asked to wait: release nothing until ``held`` is done."""
        assert self._group is not None
        if isinstance(held, asyncio.Future):
            future: asyncio.Future[None] = held
            self._held_ours = False
        else:  # a coroutine, say: a task of the group (cancelled by a drain)
            future = self._group.create_task(_await(held))
            self._held_ours = True
        self._held = future

        def lifted(_: object) -> None:
            if self._held is future:
                self._held = None
                self._release()

        future.add_done_callback(lifted)

    # --- couriers ------------------------------------------------------------------------

    def _start(self, slot: _Slot, work: Work) -> None:
        record, intended = work
        slot.work = work
        self._busy += 1
        self.counters.in_flight += 1
        if self._skip_failed_keys:
            key = self._key_of(record)
            if key is not None and key in self._failed_keys:
                result = result_for(record, FAILED)
                result.error_code = "KEY_FAILED"
                result.error_msg = (
                    f"not sent: record seq {self._failed_keys[key]} with the same key"
                    " failed (--on-key-failure skip)"
                )
                self._finished(slot, result)
                return
        try_start = slot.try_start
        if try_start is not None and try_start(record, intended, slot.done):
            return
        self._finished(slot, slot.courier.deliver(record, intended))

    async def _await(self, slot: _Slot, delivery: Awaitable[Result]) -> None:
        result = await delivery
        self._finished(slot, result)

    def _finished(self, slot: _Slot, result: Result | Awaitable[Result]) -> None:
        """A courier's record is done: report it; the courier is free once its result is
        written (when ``on_result`` waits), or at once. An awaitable is awaited first."""
        if self._closed:
            if inspect.iscoroutine(result):
                result.close()  # the run was cancelled: nobody reads results any more
            return
        if not isinstance(result, Result):
            assert self._group is not None
            self._group.create_task(self._await(slot, result))
            return
        work = slot.work
        assert work is not None
        record = work[0]
        counters = self.counters
        counters.in_flight -= 1
        if result.status == OK:
            counters.ok += 1
        elif result.status == FAILED and self._skip_failed_keys:
            key = self._key_of(record)
            if key is not None:
                self._failed_keys.setdefault(key, record.seq)
        try:
            waiting = self._on_result(record, result)
        except BaseException as exc:  # a sink's error stops the run (raised by run())
            self._fail(exc)
            return
        if waiting is None:
            self._free(slot)
            return
        future = waiting if isinstance(waiting, asyncio.Future) else None
        if future is None:
            assert self._group is not None
            future = self._group.create_task(waiting)  # type: ignore[arg-type]
        # The lines of one loop turn share one write and one future: one callback for all.
        if (blocked := self._blocked.get(future)) is not None:
            blocked.append(slot)
        else:
            self._blocked[future] = [slot]
            future.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[None]) -> None:
        slots = self._blocked.pop(future, [])
        if self._closed:
            return
        if not future.cancelled() and (exc := future.exception()) is not None:
            self._fail(exc)
            return
        for slot in slots:
            self._free(slot, release=False)
        self._release()

    def _free(self, slot: _Slot, *, release: bool = True) -> None:
        work, slot.work = slot.work, None
        lanes = self._lanes
        if lanes is not None and work is not None:
            # Per-key order: this courier carries on with the key's next record.
            next_work = lanes.release(work)
            self._wake_reader()  # lane space
            if next_work is not None and not self._stopping:
                self._busy -= 1  # _start counts it again
                self._start(slot, next_work)
                return
            # a drain leaves lane leftovers for --resume
        self._busy -= 1
        self._idle.append(slot)
        if release and self._ready:
            self._release()
        elif not self._busy:
            self._check_finished()

    def _check_finished(self) -> None:
        finished = self._finished_all
        if finished is None or finished.done() or self._busy:
            return
        if self._stopping or (self._source_done and not self._ready):
            finished.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """Stop the run with ``exc`` (raised by ``run()``)."""
        finished = self._finished_all
        if finished is not None and not finished.done():
            finished.set_exception(exc)
        self.stop()


async def _await(awaitable: Awaitable[None]) -> None:
    await awaitable
