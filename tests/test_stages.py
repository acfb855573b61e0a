"""Table tests of the ramp pacer (``bulksend.stages``): due times, counts, sad paths."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulksend.config import parse_duration
from bulksend.errors import ConfigError
from bulksend.pacer import Pacer
from bulksend.stages import RampPacer, Stages


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        (" 2 s ", 2.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-1s", "5x", "1s2", "fast"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("points", "n", "due"),
    [
        # constant 100/s: n / rate, message 0 at once (no start-up burst)
        (((0, 100), (10, 100)), 0, 0.0),
        (((0, 100), (10, 100)), 1, 0.01),
        (((0, 100), (10, 100)), 999, 9.99),
        # ramp 0 -> 100 over 10 s: integral 5 t^2 = n  =>  t = sqrt(n / 5)
        (((0, 0), (10, 100)), 0, 0.0),
        (((0, 0), (10, 100)), 5, 1.0),
        (((0, 0), (10, 100)), 20, 2.0),
        (((0, 0), (10, 100)), 499, math.sqrt(499 / 5)),
        # ramp 100 -> 1000 over 30 s (a = 30/s^2): 100 t + 15 t^2 = n
        (((0, 100), (30, 1000), (90, 1000)), 115, 1.0),
        (((0, 100), (30, 1000), (90, 1000)), 16500, 30.0),  # the ramp holds (100+1000)/2*30
        (((0, 100), (30, 1000), (90, 1000)), 16501, 30.001),  # then 1000/s flat
        # ramp down 100 -> 0 over 10 s: 100 t - 5 t^2 = n
        (((0, 100), (10, 0)), 95, 1.0),
        (((0, 100), (10, 0)), 495, 9.0),
        # a zero-rate segment is a pause: 100/s for 1 s, nothing for 4 s, 100/s again
        (((0, 100), (1, 100), (1.001, 0), (5, 0), (5.001, 100), (6, 100)), 99, 0.99),
        (((0, 100), (2, 0), (4, 0), (6, 100)), 100, 4.0 + math.sqrt(2 * 0 / 50)),
        (((0, 100), (2, 0), (4, 0), (6, 100)), 101, 4.0 + math.sqrt(2 / 50)),
    ],
)
def test_due_at(points: tuple[tuple[float, float], ...], n: int, due: float) -> None:
    assert Stages(points).due_at(n) == pytest.approx(due, abs=1e-9)


@pytest.mark.parametrize(
    ("points", "total"),
    [
        (((0, 100), (10, 100)), 1000),
        (((0, 200), (5, 200)), 1000),
        (((0, 0), (10, 100)), 500),
        (((0, 100), (30, 1000), (90, 1000)), 76500),
        (((0, 100), (2, 0), (4, 0), (6, 100)), 200),
        (((0, 3), (1, 3)), 3),
        (((0, 0.5), (3, 0.5)), 2),  # 1.5 expected: messages at 0 s and 2 s
        (((0, 0.1), (1, 0.1)), 1),  # less than one expected: message 0 still goes at 0 s
    ],
)
def test_total_and_past_the_end(points: tuple[tuple[float, float], ...], total: int) -> None:
    s = Stages(points)
    assert s.total == total
    assert s.due_at(total - 1) < s.duration
    assert s.due_at(total) == math.inf


@pytest.mark.parametrize(
    ("text", "points"),
    [
        ("0s:100,30s:1000,90s:1000", ((0, 100), (30, 1000), (90, 1000))),
        ("0:10, 1m:20", ((0, 10), (60, 20))),
        ("0ms:5,1500ms:5", ((0, 5), (1.5, 5))),
    ],
)
def test_parse(text: str, points: tuple[tuple[float, float], ...]) -> None:
    assert Stages.parse(text).points == points


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0s:100", "at least two points"),  # a single point
        ("0s:100,0s:200", "increasing time order"),
        ("0s:100,30s:1000,20s:500", "increasing time order"),  # unsorted
        ("5s:100,30s:100", "first stage point must be at 0s"),
        ("0s:-1,10s:100", "finite and >= 0"),
        ("0s:inf,10s:100", "finite and >= 0"),
        ("0s:0,10s:0", "send no message"),
        ("0s:100;10s:100", "not a duration"),
        ("0s100,10s:100", "TIME:RATE"),
        ("0s:abc,10s:100", "not a rate"),
        ("zero:1,10s:1", "not a duration"),
    ],
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Stages.parse(text)


@pytest.mark.parametrize(("rate", "duration"), [(0, 10), (-5, 10), (10, 0)])
def test_constant_refuses(rate: float, duration: float) -> None:
    with pytest.raises(ConfigError):
        Stages.constant(rate, duration)


def test_rate_at_and_expected() -> None:
    s = Stages.parse("0s:100,30s:1000,90s:1000")
    assert [s.rate_at(t) for t in (-1, 0, 15, 30, 60, 90, 100)] == [0, 100, 550, 1000, 1000, 0, 0]
    assert s.expected(0) == 0 and s.expected(30) == pytest.approx(16500)
    assert s.expected(90) == pytest.approx(76500) and s.expected(1e9) == pytest.approx(76500)
    assert s.mean_rate == pytest.approx(76500 / 90)


def test_negative_message_number_is_a_bug() -> None:
    with pytest.raises(ValueError, match="start at 0"):
        Stages.constant(1, 1).due_at(-1)


def test_ramp_pacer_is_a_pacer_and_always_paced() -> None:
    pacer: Pacer = RampPacer(Stages.parse("0s:0,10s:100"))  # starts at rate 0
    assert pacer.rate > 0  # the sender paces on rate > 0: a ramp from 0 must still be paced
    assert pacer.wait(0.0, 0) == 0.0
    assert pacer.wait(0.5, 5) == pytest.approx(0.5)
    assert pacer.due_at(20) == pytest.approx(2.0)


def test_ramp_pacer_set_rate_flattens_the_rest_without_a_burst() -> None:
    pacer = RampPacer(Stages.parse("0s:100,10s:100"))
    assert pacer.total == 1000
    # At 0.2 s with 50 sent (message 50 due at 0.5 s): 10/s from 0.5 s on, to 10 s.
    pacer.set_rate(10.0, 0.2, 50)
    assert pacer.due_at(50) == pytest.approx(0.5)
    assert pacer.due_at(51) == pytest.approx(0.6)
    assert pacer.total == 50 + 95
    assert pacer.rate_at(5.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="before the last rate change"):
        pacer.due_at(10)
    with pytest.raises(ValueError, match="> 0"):
        pacer.set_rate(0.0, 1.0, 60)
    with pytest.raises(ValueError, match="before its schedule ends"):
        pacer.set_rate(10.0, 10.5, 100)


@given(
    st.lists(
        st.tuples(st.floats(0.01, 20), st.floats(0, 500)),
        min_size=1,
        max_size=6,
    ),
    st.floats(0, 500),
)
def test_due_times_are_ordered_and_match_the_integral(
    steps: list[tuple[float, float]], first_rate: float
) -> None:
    points = [(0.0, first_rate)]
    for dt, rate in steps:
        points.append((points[-1][0] + dt, rate))
    try:
        s = Stages(tuple(points))
    except ConfigError:
        return  # every rate 0: refused, as tested above
    previous = -1.0
    for n in range(0, s.total, max(1, s.total // 200)):
        due = s.due_at(n)
        assert previous <= due < s.duration + 1e-9
        # Message n is due where the expected count reaches n (within float error).
        assert s.expected(due) == pytest.approx(n, abs=1e-6 * max(1, n))
        previous = due
