"""The pool alone, with a spy courier in place of HTTP: it knows nothing of delivery beyond
``Courier.deliver(record, intended) -> Result``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from bulksend.config import SendOptions
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
