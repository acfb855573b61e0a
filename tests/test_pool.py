"""The pool alone, with spy couriers in place of HTTP: it knows nothing of delivery beyond
``Courier.deliver(record, intended) -> Result`` and ``Courier.try_start`` (by callback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from bulksend.config import SendOptions
from bulksend.errors import SinkError
from bulksend.pacer import Schedule
from bulksend.pool import Pool
from bulksend.record import Invalid, Item, Record
from bulksend.result import OK, Result, result_for


class Spy:
    """Couriers that take a loop turn per record and count what they saw."""

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.in_flight = 0
        self.peak = 0
        self.opened = 0
        self.closed = 0
        self.reached: dict[int, asyncio.Event] = {}

    def open(self) -> Courier:
        self.opened += 1
        return Courier(self)


class Courier:
    def __init__(self, spy: Spy) -> None:
        self.spy = spy

    async def _deliver(self, record: Record) -> Result:
        spy = self.spy
        spy.in_flight += 1
        spy.peak = max(spy.peak, spy.in_flight)
        await asyncio.sleep(0)
        spy.in_flight -= 1
        spy.delivered.append(record.seq)
        if (event := spy.reached.get(len(spy.delivered))) is not None:
            event.set()
        result = result_for(record, OK)
        result.attempts = 1
        return result

    def deliver(self, record: Record, intended: float) -> Awaitable[Result]:
        return self._deliver(record)

    def close(self) -> None:
        self.spy.closed += 1


def records(n: int) -> list[Item]:
    return [Record(seq=i, source=f"in:{i + 1}", topic="t", body=f"m{i}") for i in range(n)]


async def test_every_item_one_result_bounded_in_flight_and_couriers_closed() -> None:
    spy = Spy()
    pool = Pool(SendOptions(concurrency=4), Schedule(0), spy.open)
    items = [*records(50), Invalid(seq=50, source="in:51", raw="{", error="malformed JSON")]
    got: list[Result] = []
    await pool.run(items, lambda item, result: got.append(result), done=lambda i: i.seq == 7)
    by_seq = {r.seq: r.status for r in got}
    assert len(got) == 51 and by_seq[7] == "skipped" and by_seq[50] == "invalid"
    assert sorted(spy.delivered) == [i for i in range(50) if i != 7]
    assert spy.peak <= 4 and spy.opened == spy.closed == 4
    assert pool.counters.dispatched == 49 and pool.counters.ok == 49


async def test_on_dispatch_can_hold_every_new_record_until_released() -> None:
    """The gate a target-health observer uses: while held, nothing new goes out."""
    spy = Spy()
    spy.reached[3] = three = asyncio.Event()
    gate = asyncio.Event()
    calls = 0

    def on_dispatch(now: float) -> Awaitable[bool] | None:
        nonlocal calls
        calls += 1
        return gate.wait() if calls == 4 else None

    pool = Pool(SendOptions(concurrency=2), Schedule(0), spy.open, on_dispatch=on_dispatch)
    run = asyncio.create_task(pool.run(records(10), lambda item, result: None))
    await asyncio.wait_for(three.wait(), 10)
    for _ in range(50):  # many loop turns: a record let through would be delivered by now
        await asyncio.sleep(0)
    assert len(spy.delivered) == 3 and not run.done()
    gate.set()
    await asyncio.wait_for(run, 10)
    assert sorted(spy.delivered) == list(range(10))


async def test_a_drain_while_held_sends_nothing_more() -> None:
    spy = Spy()
    gate = asyncio.Event()
    pool = Pool(
        SendOptions(concurrency=2),
        Schedule(0),
        spy.open,
        on_dispatch=lambda now: gate.wait() if pool.counters.dispatched == 2 else None,
    )
    run = asyncio.create_task(pool.run(records(10), lambda item, result: None))
    for _ in range(50):
        await asyncio.sleep(0)
    pool.stop()
    gate.set()
    await asyncio.wait_for(run, 10)
    assert sorted(spy.delivered) == [0, 1]


# --- couriers that deliver by callback (the hot path) -------------------------------------


class CallbackSpy:
    """Couriers with ``try_start``: each answer comes a loop turn later, by callback. Records
    what went out, with its intended time and the time it was started."""

    def __init__(self, *, refuse_first: bool = False) -> None:
        self.started: list[tuple[int, float, float]] = []  # (seq, intended, started)
        self.in_flight = 0
        self.peak = 0
        self.closed = 0
        self.by_task = 0
        self.refuse_first = refuse_first

    def open(self) -> CallbackCourier:
        return CallbackCourier(self)


class CallbackCourier:
    def __init__(self, spy: CallbackSpy) -> None:
        self.spy = spy
        self.connected = not spy.refuse_first

    def _result(self, record: Record) -> Result:
        self.spy.in_flight -= 1
        result = result_for(record, OK)
        result.attempts = 1
        return result

    def try_start(self, record: Record, intended: float, done: Callable[[Result], None]) -> bool:
        if not self.connected:
            return False  # like a courier with no open connection yet: the pool awaits deliver
        spy = self.spy
        spy.started.append((record.seq, intended, time.monotonic()))
        spy.in_flight += 1
        spy.peak = max(spy.peak, spy.in_flight)
        asyncio.get_running_loop().call_soon(lambda: done(self._result(record)))
        return True

    async def _deliver(self, record: Record, intended: float) -> Result:
        spy = self.spy
        spy.by_task += 1
        spy.started.append((record.seq, intended, time.monotonic()))
        spy.in_flight += 1
        spy.peak = max(spy.peak, spy.in_flight)
        await asyncio.sleep(0)
        self.connected = True
        return self._result(record)

    def deliver(self, record: Record, intended: float) -> Awaitable[Result]:
        return self._deliver(record, intended)

    def close(self) -> None:
        self.spy.closed += 1


class CountingPool(Pool):
    """Counts the pacing timers armed."""

    arms = 0

    def _arm(self, delay: float) -> None:
        if self._timer is None:
            self.arms += 1
        super()._arm(delay)


async def test_callback_couriers_every_record_once_bounded_and_closed() -> None:
    spy = CallbackSpy(refuse_first=True)
    pool = Pool(SendOptions(concurrency=8), Schedule(0), spy.open)
    got: list[Result] = []
    await asyncio.wait_for(pool.run(records(500), lambda item, r: got.append(r)), 30)
    assert sorted(r.seq for r in got) == list(range(500))
    assert sorted(seq for seq, _, _ in spy.started) == list(range(500))
    # The first record of each courier went by task (it "connected"), the rest by callback.
    assert spy.by_task == 8 and spy.peak <= 8 and spy.closed == 8
    assert pool.counters.in_flight == 0 and pool.counters.ok == 500


async def test_paced_by_the_loop_turn_one_timer_for_many_records_never_early() -> None:
    """At 20,000/s a timer per record would be 400 timers; by the loop turn (the loop's
    timers tick in milliseconds) each wake-up releases every record due by then."""
    rate, n = 20_000.0, 400
    spy = CallbackSpy()
    pool = CountingPool(SendOptions(concurrency=64), Schedule(rate), spy.open)
    await asyncio.wait_for(pool.run(records(n), lambda item, r: None), 30)
    started = sorted(spy.started)
    assert [seq for seq, _, _ in started] == list(range(n))
    t0 = started[0][1]
    for seq, intended, at in started:
        # Each record keeps its own intended time, exactly the schedule's ...
        assert intended == pytest.approx(t0 + seq / rate, abs=1e-9)
        # ... and never goes before it.
        assert at >= intended
    assert 1 <= pool.arms < n / 4


class Offset(Schedule):
    """A schedule whose first record is due ``offset`` seconds after the start (a shard's
    slot in an interleaved stream)."""

    def __init__(self, rate: float, offset: float) -> None:
        super().__init__(rate)
        self.offset = offset

    def due_at(self, sent: int) -> float:
        return self.offset + super().due_at(sent)


async def test_a_schedule_whose_first_record_is_due_later_still_sends_it() -> None:
    # The clock starts once, with the first look at a record: restarted on every look
    # until a first record went, a first record due after 0 would never be due.
    spy = CallbackSpy()
    pool = CountingPool(SendOptions(concurrency=4), Offset(1_000.0, 0.05), spy.open)
    await asyncio.wait_for(pool.run(records(20), lambda item, r: None), 10)
    started = sorted(spy.started)
    assert [seq for seq, _, _ in started] == list(range(20))
    first_intended, first_at = started[0][1], started[0][2]
    assert first_at >= first_intended
    assert started[1][1] - first_intended == pytest.approx(0.001, abs=1e-9)


async def test_a_courier_waits_for_its_results_write_before_its_next_record() -> None:
    """on_result's awaitable (the ledger line's write) holds the courier: with one courier,
    record 1 does not go out before record 0's write is done."""
    spy = CallbackSpy()
    written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    pool = Pool(SendOptions(concurrency=1), Schedule(0), spy.open)

    def on_result(item: Item, result: Result) -> Awaitable[None] | None:
        return written if result.seq == 0 else None

    run = asyncio.create_task(pool.run(records(3), on_result))
    for _ in range(50):  # many loop turns: a record let through would be out by now
        await asyncio.sleep(0)
    assert [seq for seq, _, _ in spy.started] == [0] and not run.done()
    written.set_result(None)
    await asyncio.wait_for(run, 10)
    assert [seq for seq, _, _ in spy.started] == [0, 1, 2]


async def test_an_error_from_on_result_in_a_callback_stops_the_run_with_that_error() -> None:
    spy = CallbackSpy()
    pool = Pool(SendOptions(concurrency=4), Schedule(0), spy.open)

    def on_result(item: Item, result: Result) -> None:
        if result.seq == 10:
            raise SinkError("cannot write out.jsonl: No space left on device")

    with pytest.raises(SinkError, match="No space left"):
        await asyncio.wait_for(pool.run(records(1000), on_result), 10)
    assert len(spy.started) < 1000 and spy.closed == 4


@pytest.mark.parametrize("rate", [0.0, 100.0], ids=["unpaced", "paced"])
async def test_a_drain_reports_what_is_in_flight_and_sends_nothing_more(rate: float) -> None:
    """stop() after the third result: the records in flight then finish and are reported;
    no courier takes another (read but unsent records are left for --resume)."""
    spy = CallbackSpy()
    pool = Pool(SendOptions(concurrency=4), Schedule(rate), spy.open)
    got: list[Result] = []

    def on_result(item: Item, result: Result) -> None:
        got.append(result)
        if len(got) == 3:
            pool.stop()

    await asyncio.wait_for(pool.run(records(50), on_result), 10)
    assert 3 <= len(got) <= 3 + 4 and sorted(r.seq for r in got) == sorted(
        seq for seq, _, _ in spy.started
    )


async def test_cancelling_the_run_closes_every_courier_and_reports_nothing_late() -> None:
    spy = CallbackSpy()
    pool = Pool(SendOptions(concurrency=4), Schedule(0), spy.open)
    got: list[Result] = []
    run = asyncio.create_task(pool.run(records(100_000), lambda item, r: got.append(r)))
    for _ in range(20):
        await asyncio.sleep(0)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    reported = len(got)
    for _ in range(20):  # answers still under way come back: nobody takes them
        await asyncio.sleep(0)
    assert spy.closed == 4 and len(got) == reported < 100_000


async def test_a_rate_change_takes_effect_at_once() -> None:
    """At 1 record/s, 20 records take 19 s; the rate goes to 10,000/s after the first
    result, so the rest go at once (the armed timer for the old rate is dropped)."""
    spy = CallbackSpy()
    pool = Pool(SendOptions(concurrency=4), Schedule(1.0), spy.open)

    def on_result(item: Item, result: Result) -> None:
        if result.seq == 0:
            pool.set_rate(10_000.0)

    await asyncio.wait_for(pool.run(records(20), on_result), 10)
    assert len(spy.started) == 20


async def test_an_error_from_on_dispatch_stops_the_run_with_that_error() -> None:
    """Records are released from loop callbacks (a timer, an answer): an error raised there
    must still end ``run()``, not vanish into the loop's exception handler."""
    spy = CallbackSpy()

    def on_dispatch(now: float) -> None:
        if pool.counters.dispatched == 20:
            raise RuntimeError("observer bug")

    pool = Pool(SendOptions(concurrency=4), Schedule(0), spy.open, on_dispatch=on_dispatch)
    with pytest.raises(RuntimeError, match="observer bug"):
        await asyncio.wait_for(pool.run(records(100), lambda item, r: None), 10)
    assert len(spy.started) == 20 and spy.closed == 4
