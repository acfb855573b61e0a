"""Target health without sockets: the streak rules as a table, and the state machine (fail
fast, outage, probe, recovery, verdicts on spent budgets) driven by hand. The same rules
over real sockets are in test_outage.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from bulksend.config import RetryPolicy, SendOptions
from bulksend.errors import (
    AnswerTooLarge,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    ProtocolError,
    RequestTimeout,
    TransportError,
)
from bulksend.health import Admit, Failure, Streak, TargetHealth, Verdict, failure_of

REFUSED = ConnectError("connection to 127.0.0.1:9 refused", "refused")
FAST = RetryPolicy(max_retries=3, backoff_base=0.001, backoff_max=0.002)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (REFUSED, (True, "refused")),
        (ConnectError("cannot resolve host x.invalid", "unknown-host"), (True, "unknown-host")),
        (ConnectError("TLS certificate of h:443 not trusted", "tls-verify"), (True, "tls-verify")),
        (ConnectTimeout("connect to h:80 timed out"), (True, "connect-timeout")),
        (RequestTimeout("no answer within 1s"), (False, "timeout")),
        (ConnectionClosed("connection closed before a complete answer"), (False, "closed")),
        (ProtocolError("malformed HTTP answer"), None),  # something answered
        (AnswerTooLarge("answer over 10 bytes"), None),
    ],
)
def test_which_failures_say_the_target_may_be_unreachable(
    exc: TransportError, expected: tuple[bool, str] | None
) -> None:
    failure = failure_of(exc, 7)
    got = None if failure is None else (failure.connect, failure.cause)
    assert got == expected


def connect(conn: int) -> Failure:
    return Failure(conn, True, "refused", "refused")


def request(conn: int) -> Failure:
    return Failure(conn, False, "closed", "closed")


@pytest.mark.parametrize(
    ("concurrency", "failures", "outage_after"),
    [
        # (a) four connect failures, even on one connection (nothing was sent: not the record)
        (1, [connect(0)] * 4, 4),
        (64, [connect(0)] * 4, 4),
        # (b) request failures on min(concurrency, 4) different connections
        (64, [request(c) for c in range(4)], 4),
        (2, [request(0), request(1)], 2),
        (4, [request(0), request(0), request(1), request(2), request(3)], 5),
        # one connection's request failures (a record the target chokes on): never
        (64, [request(0)] * 50, None),
        (1, [request(0)] * 50, None),
        (64, [request(0), request(1), request(2)], None),
        (64, [connect(0), connect(0), connect(0)], None),
    ],
)
def test_streak_rules(concurrency: int, failures: list[Failure], outage_after: int | None) -> None:
    streak = Streak(concurrency)
    verdicts = [streak.add(f) for f in failures]
    first = verdicts.index(True) + 1 if True in verdicts else None
    assert first == outage_after


def test_an_answer_ends_a_streak_and_the_next_failure_starts_another() -> None:
    streak = Streak(4)
    assert not any(streak.add(request(c)) for c in range(3))
    first = streak.id
    streak.end()
    assert not streak.add(request(3))  # three of the old streak do not count any more
    assert streak.id == first + 1 and streak.failures == 1


class Run:
    """A TargetHealth with its callbacks recorded."""

    def __init__(self, concurrency: int = 4, outage_timeout: float = 300.0) -> None:
        self.stops = 0
        self.recoveries = 0
        options = SendOptions(concurrency=concurrency, retry=FAST, outage_timeout=outage_timeout)
        self.health = TargetHealth(
            options, random.Random(1), on_stop=self._stop, on_recover=self._recover
        )

    def _stop(self) -> None:
        self.stops += 1

    def _recover(self) -> None:
        self.recoveries += 1


async def test_refused_before_any_answer_stops_at_once_naming_the_cause() -> None:
    run = Run()
    h = run.health
    verdicts = [h.on_failure(REFUSED, conn) for conn in ("a", "b", "c", "d")]
    assert verdicts == [Verdict.SUSPECT] * 3 + [Verdict.OUTAGE]
    assert h.stopping and not h.down and run.stops == 1
    assert h.error is not None and h.error.cause == "refused"
    assert "connection to 127.0.0.1:9 refused" in str(h.error)
    assert await h.admit() is Admit.STOP  # whoever comes next is withheld


async def test_an_untrusted_certificate_names_the_ca_bundle_flag() -> None:
    run = Run()
    tls = ConnectError("TLS certificate of h:443 not trusted: self-signed", "tls-verify")
    for conn in range(4):
        run.health.on_failure(tls, conn)
    assert run.health.error is not None and "--ca-bundle" in str(run.health.error)


async def test_a_connect_timeout_at_the_start_is_an_outage_to_ride_out_not_a_fail_fast() -> None:
    run = Run()
    h = run.health
    h.on_failure(ConnectTimeout("connect to h:80 timed out"), 0)
    for conn in range(1, 4):
        h.on_failure(REFUSED, conn)
    assert h.down and not h.stopping and run.stops == 0
    h.drain()


async def test_mid_run_the_target_is_probed_by_one_waiting_record_and_recovers() -> None:
    run = Run()
    h = run.health
    h.on_answer()
    for conn in range(4):
        h.on_failure(ConnectionClosed("closed"), conn)
    assert h.down and not h.stopping
    gate = h.gate()
    assert gate is not None
    gate.close()  # not awaited here: the pool awaits it
    note = h.note()
    assert note is not None and note.startswith("target unreachable since ")
    assert "probing" in note
    waiting = [asyncio.ensure_future(h.admit()) for _ in range(3)]
    first = await asyncio.wait_for(asyncio.shield(waiting[0]), 10)
    assert first is Admit.PROBE and not any(w.done() for w in waiting[1:])
    # The probe fails: it goes to the back of the line, the next waiter probes next.
    assert h.on_failure(REFUSED, 0, probe=True) is Verdict.OUTAGE
    again = asyncio.ensure_future(h.admit())
    assert await asyncio.wait_for(asyncio.shield(waiting[1]), 10) is Admit.PROBE
    assert not waiting[2].done() and not again.done()
    h.on_answer(probe=True)
    assert [await w for w in (waiting[2], again)] == [Admit.GO, Admit.GO]
    assert not h.down and h.gate() is None and h.note() is None
    assert (run.recoveries, h.outages, h.probes) == (1, 1, 2)


async def test_an_outage_past_the_timeout_stops_the_run() -> None:
    run = Run(outage_timeout=0.05)
    h = run.health
    h.on_answer()
    for conn in range(4):
        h.on_failure(REFUSED, conn)
    waiter = asyncio.ensure_future(h.admit())
    # Probes come and fail until the deadline; the waiter ends withheld.
    for _ in range(1000):
        got = await asyncio.wait_for(waiter, 10)
        if got is Admit.STOP:
            break
        h.on_failure(REFUSED, 0, probe=True)
        waiter = asyncio.ensure_future(h.admit())
    assert h.stopping and run.stops == 1
    assert h.error is not None and h.error.cause == "outage"
    assert "--outage-timeout 0.05 s" in str(h.error)


async def test_a_spent_budget_waits_for_the_verdict_an_answer_says_own() -> None:
    run = Run()
    h = run.health
    h.on_answer()
    h.enter()
    h.enter()  # another record still at work: it will bring the news
    assert h.on_failure(ConnectionClosed("closed"), "mine") is Verdict.SUSPECT
    parked = asyncio.ensure_future(h.verdict(h.streak.id))
    await asyncio.sleep(0)
    assert not parked.done()
    h.on_answer()
    assert await parked is Verdict.OWN


async def test_a_spent_budget_is_refunded_when_its_streak_becomes_an_outage() -> None:
    run = Run()
    h = run.health
    h.on_answer()
    h.enter()
    h.enter()
    h.on_failure(ConnectionClosed("closed"), "mine")
    streak = h.streak.id
    parked = asyncio.ensure_future(h.verdict(streak))
    await asyncio.sleep(0)
    for conn in range(3):
        h.on_failure(REFUSED, conn)
    assert await parked is Verdict.OUTAGE and h.was_outage(streak) and h.down
    h.drain()


@pytest.mark.parametrize(
    ("exc", "verdict"), [(REFUSED, Verdict.OUTAGE), (ConnectionClosed("closed"), Verdict.OWN)]
)
async def test_with_no_one_left_to_tell_the_last_failure_decides(
    exc: TransportError, verdict: Verdict
) -> None:
    """A connect failure cannot be the record's own: the target is unreachable. A request
    failure may be (a body the target chokes on): the record fails."""
    run = Run()
    h = run.health
    h.on_answer()
    h.enter()
    h.on_failure(exc, "mine")
    assert await asyncio.wait_for(h.verdict(h.streak.id), 10) is verdict
    assert h.down is (verdict is Verdict.OUTAGE)
    h.drain()


async def test_a_drain_while_unreachable_withholds_the_waiters_and_opens_the_gate() -> None:
    run = Run()
    h = run.health
    h.on_answer()
    for conn in range(4):
        h.on_failure(REFUSED, conn)
    waiter = asyncio.ensure_future(h.admit())
    gate = h.gate()
    assert gate is not None
    await asyncio.sleep(0)
    h.drain()
    assert await asyncio.wait_for(waiter, 10) is Admit.STOP
    await asyncio.wait_for(gate, 10)
    assert h.error is None  # a drain is the user's stop, not an error
