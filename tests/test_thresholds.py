"""Table tests of threshold parsing and checking (``bulksend.thresholds``)."""

from __future__ import annotations

import pytest

from bulksend.errors import ConfigError
from bulksend.thresholds import LATENCY_METRICS, Threshold, check, figures_of
from bulksend.timeseries import Bucket, Row

FIGURES = {
    "p50": 2.0,
    "p90": 50.0,
    "p99": 150.0,
    "p99_9": 400.0,
    "p99_99": 700.0,
    "max": 900.0,
    "mean": 8.0,
    "error_rate": 0.005,
    "rate": 960.0,
}


@pytest.mark.parametrize(
    ("text", "metric", "op", "value", "passes"),
    [
        ("p99<200ms", "p99", "<", 200.0, True),
        ("p99<150ms", "p99", "<", 150.0, False),
        ("p99<=150ms", "p99", "<=", 150.0, True),
        ("p90<=50ms", "p90", "<=", 50.0, True),
        ("p90<=49.9ms", "p90", "<=", 49.9, False),
        ("p50<1s", "p50", "<", 1000.0, True),
        ("p50<0.001s", "p50", "<", 1.0, False),
        ("p99.9<500", "p99_9", "<", 500.0, True),  # bare number: ms
        ("p99_9<0.3s", "p99_9", "<", 300.0, False),
        ("p99.99<800", "p99_99", "<", 800.0, True),
        ("p99_99<=0.5s", "p99_99", "<=", 500.0, False),
        ("max<1s", "max", "<", 1000.0, True),
        ("max < 800ms", "max", "<", 800.0, False),
        ("mean<10ms", "mean", "<", 10.0, True),
        ("mean>10ms", "mean", ">", 10.0, False),
        ("error_rate<0.01", "error_rate", "<", 0.01, True),
        ("error_rate<0.001", "error_rate", "<", 0.001, False),
        ("error_rate==0", "error_rate", "==", 0.0, False),
        ("rate>=950", "rate", ">=", 950.0, True),
        ("rate>=1000", "rate", ">=", 1000.0, False),
        ("RATE > 1e2", "rate", ">", 100.0, True),
    ],
)
def test_parse_and_check(text: str, metric: str, op: str, value: float, passes: bool) -> None:
    t = Threshold.parse(text)
    assert (t.metric, t.op, t.text) == (metric, op, text.strip())
    assert t.value == pytest.approx(value)
    [verdict] = check((t,), FIGURES)
    assert verdict.passed is passes
    assert verdict.actual == FIGURES[metric]
    assert verdict.line().startswith("pass" if passes else "FAIL")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p98<200ms", "unknown metric"),
        ("latency<200ms", "unknown metric"),
        ("p99<<200ms", "METRIC OP VALUE"),
        ("p99 200ms", "METRIC OP VALUE"),
        ("p99<", "METRIC OP VALUE"),
        ("p99<200min", "latency units are ms or s"),
        ("rate>=950ms", "plain number"),
        ("error_rate<1%", "METRIC OP VALUE"),
        ("", "METRIC OP VALUE"),
    ],
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Threshold.parse(text)


def test_figures_of_a_snapshot() -> None:
    snapshot = {
        "ok": 99,
        "failed": 1,
        "throughput_msg_s": 123.4,
        "latency_ms": {"p50": 1, "p90": 2, "p99": 3, "p99_9": 4, "max": 5, "mean": 1.5},
    }
    assert figures_of(snapshot) == {
        "p50": 1.0,
        "p90": 2.0,
        "p99": 3.0,
        "p99_9": 4.0,
        "max": 5.0,
        "mean": 1.5,
        "error_rate": 0.01,
        "rate": 123.4,
    }
    empty = {**snapshot, "ok": 0, "failed": 0}
    assert figures_of(empty)["error_rate"] == 0.0


def test_a_window_has_every_latency_metric_a_threshold_names() -> None:
    """--abort-on-fail judges each second's figures: a latency metric missing there would
    fail every window (nothing measured it) and stop a healthy run."""
    bucket = Bucket(ok=10_000)
    for i in range(10_000):
        bucket.latency.add(1.0 + i / 100)
    figures = Row(t=0, width=1, bucket=bucket, in_flight=0).figures()
    assert set(LATENCY_METRICS) <= set(figures)
    assert figures["p99_9"] <= figures["p99_99"] <= figures["max"]
    [verdict] = check((Threshold.parse("p99.99<1s"),), figures)
    assert verdict.passed and verdict.actual == figures["p99_99"]
