"""Table tests of the pure pieces: pacer, backoff, Retry-After, AIMD, key lanes."""

from __future__ import annotations

import random

import pytest

from bulksend.adaptive import AIMD
from bulksend.config import RetryPolicy
from bulksend.ordering import KeyLanes, key_function
from bulksend.pacer import Schedule, pace
from bulksend.record import Record
from bulksend.retry import MAX_RETRY_AFTER_S, compute_backoff, parse_retry_after


@pytest.mark.parametrize(
    ("elapsed", "sent", "rate", "wait"),
    [
        (0.0, 0, 100.0, 0.0),  # the first message goes at once: no burst, no delay
        (0.0, 1, 100.0, 0.01),
        (0.005, 1, 100.0, 0.005),
        (1.0, 100, 100.0, 0.0),
        (2.0, 100, 100.0, -1.0),  # behind schedule: send now (negative = overdue)
        (0.0, 1000, 0.0, 0.0),  # unpaced
        (0.0, 5, -1.0, 0.0),  # nonsense rate is unpaced, not a crash
    ],
)
def test_pace(elapsed: float, sent: int, rate: float, wait: float) -> None:
    assert pace(elapsed, sent, rate) == pytest.approx(wait)


@pytest.mark.parametrize(
    ("rate", "anchor", "sent", "due"),
    [
        (100.0, (0.0, 0), 0, 0.0),  # the first message is due at once
        (100.0, (0.0, 0), 1, 0.01),
        (100.0, (0.0, 0), 250, 2.5),
        (20_000.0, (0.0, 0), 20_000, 1.0),  # high rates: still each message's own time
        (100.0, (5.0, 50), 50, 5.0),  # a later segment is due from its anchor ...
        (100.0, (5.0, 50), 60, 5.1),
        (100.0, (5.0, 50), 40, 4.9),  # ... and before it, by the same line (never asked)
        (0.0, (3.0, 7), 1_000, 3.0),  # unpaced: everything is due at the anchor, now
        (-5.0, (0.0, 0), 9, 0.0),  # a nonsense rate is unpaced, not a crash
        (1e-9, (0.0, 0), 1, 1e9),  # a tiny rate: far away, finite
    ],
)
def test_due_at(rate: float, anchor: tuple[float, int], sent: int, due: float) -> None:
    """The pool's one question to the pacer: when is message ``sent`` due (seconds after
    the start)? Absolute times, so a late wake-up is caught up, never carried as drift."""
    s = Schedule(rate, anchor_elapsed=anchor[0], anchor_sent=anchor[1])
    assert s.due_at(sent) == pytest.approx(due)


def test_due_at_after_rate_changes_to_and_from_unpaced() -> None:
    s = Schedule(0.0)
    s.set_rate(10.0, 2.0, 30)  # from unpaced: the paced segment starts now, at message 30
    assert s.due_at(30) == pytest.approx(2.0) and s.due_at(31) == pytest.approx(2.1)
    s.set_rate(0.0, 2.5, 35)  # back to unpaced: due at once from then on
    assert s.due_at(35) == s.due_at(10_000) == pytest.approx(2.5)


def test_schedule_rate_change_keeps_due_times_absolute_and_never_bursts() -> None:
    s = Schedule(10.0)
    assert s.wait(0.0, 0) == 0.0 and s.wait(0.0, 10) == pytest.approx(1.0)
    # At 0.5 s, 5 sent; rate goes to 100/s: message 5 was due at 0.5 s, then every 10 ms.
    s.set_rate(100.0, 0.5, 5)
    assert s.wait(0.5, 5) == pytest.approx(0.0) and s.wait(0.5, 6) == pytest.approx(0.01)
    # Late change: at 0.2 s with 5 sent (message 5 due at 0.5 s): the new segment starts
    # at 0.5 s, not now, so nothing goes early.
    s2 = Schedule(10.0)
    s2.set_rate(1000.0, 0.2, 5)
    assert s2.wait(0.2, 5) == pytest.approx(0.3)


def test_backoff_is_full_jitter_under_a_capped_exponential() -> None:
    policy = RetryPolicy(backoff_base=0.2, backoff_max=20.0)
    rng = random.Random(1)
    for n, ceiling in [
        (0, 0.2),
        (1, 0.4),
        (3, 1.6),
        (6, 12.8),
        (7, 20.0),
        (60, 20.0),
        (5000, 20.0),
    ]:
        draws = [compute_backoff(n, policy, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.8 * ceiling  # jitter spans the whole range, not a fixed wait


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("3", 3.0),
        (" 0.5 ", 0.5),
        ("-4", 0.0),
        ("99999999", MAX_RETRY_AFTER_S),
        ("Thu, 26 Nov 2026 09:00:10 GMT", 10.0),
        ("Thu, 26 Nov 2026 08:59:00 GMT", 0.0),  # in the past: retry now
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1795683600.0  # 2026-11-26 09:00:00 UTC
    got = parse_retry_after(value, now)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_aimd_decreases_once_per_window_from_accepted_rate_and_recovers_additively() -> None:
    c = AIMD(0.0, decrease=0.8, increase_fraction=0.02, window=1.0)
    assert c.on_throttle(0.1, accepted_rate=0.0) is None  # nothing measured yet
    assert c.on_throttle(1.0, accepted_rate=500.0) == pytest.approx(400.0)
    assert c.on_throttle(1.5, accepted_rate=500.0) is None  # same window: no second cut
    assert c.on_tick(1.9) is None
    assert c.on_tick(2.0) == pytest.approx(408.0)  # +2% of 400 per quiet window
    assert c.on_tick(2.5) is None
    assert c.on_tick(3.0) == pytest.approx(416.0)
    assert c.on_throttle(3.2, accepted_rate=450.0) == pytest.approx(0.8 * 416.0)
    assert c.changes == 4


def test_aimd_respects_ceiling_and_floor() -> None:
    c = AIMD(100.0, ceiling=100.0, floor=50.0, window=1.0)
    assert c.on_tick(5.0) is None  # at the ceiling: no increase
    assert c.on_throttle(6.0, accepted_rate=10.0) == 50.0
    for t in range(7, 200):
        c.on_tick(float(t))
    assert c.rate == 100.0


def rec(seq: int, keys: str | None, topic: str = "t") -> Record:
    return Record(
        seq=seq,
        source=f"f:{seq + 1}",
        topic=topic,
        body="b",
        properties=(("KEYS", keys),) if keys else (),
    )


def test_key_lanes_serialise_a_key_and_let_others_through() -> None:
    lanes = KeyLanes(key_function(None))
    a0, a1, b0, a2, n0 = rec(0, "a"), rec(1, "a"), rec(2, "b"), rec(3, "a"), rec(4, None)
    assert lanes.admit(a0) and not lanes.admit(a1) and lanes.admit(b0) and not lanes.admit(a2)
    assert lanes.admit(n0) and lanes.release(n0) is None  # no key: never waits
    assert lanes.waiting == 2 and lanes.busy_keys == 2
    assert lanes.release(a0) is a1 and lanes.release(a1) is a2 and lanes.release(a2) is None
    assert lanes.release(b0) is None and lanes.waiting == 0 and lanes.busy_keys == 0


def test_key_function_fields() -> None:
    r = Record(
        seq=0,
        source="f:1",
        topic="tp",
        body="b",
        properties=(("KEYS", "k"), ("TAGS", "g"), ("shard", "7")),
        id="i",
    )
    assert [
        key_function(f)(r) for f in (None, "keys", "TAGS", "topic", "id", "shard", "absent")
    ] == ["k", "k", "g", "tp", "i", "7", None]
