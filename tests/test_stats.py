"""Stats observe: the bulk-fed latency histogram equals hdrh fed value by value."""

from __future__ import annotations

import random

from hdrh.histogram import HdrHistogram

from bulksend.result import Result
from bulksend.stats import (
    LATE_MS,
    Latencies,
    LoadStats,
    Stats,
    histogram_summary,
    new_histogram,
)


def test_latencies_equal_recording_every_value_into_hdrh() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0, 2.5) for _ in range(20_000)] + [
        0.0,
        0.0004,
        1e-9,
        5e6,
        3_600_000.0,
    ]
    fast, direct = Latencies(), new_histogram()
    for ms in values:
        fast.add_ms(ms)
        direct.record_value(max(1, min(3_600_000_000, int(ms * 1000.0))))
    assert fast.count == len(values)
    assert fast.summary() == histogram_summary(direct)
    h: HdrHistogram = fast.histogram()
    for p in (0, 10, 50, 75, 90, 99, 99.9, 99.99, 100):
        assert h.get_value_at_percentile(p) == direct.get_value_at_percentile(p)
    assert (h.get_min_value(), h.get_max_value()) == (
        direct.get_min_value(),
        direct.get_max_value(),
    )


def test_stats_counts_and_latency_over_ok_only() -> None:
    s = Stats()
    s.add(
        Result(
            seq=0,
            source="f:1",
            id=None,
            status="ok",
            http_status=200,
            attempts=3,
            latency_ms=2.0,
            started_at=1000,
            done_at=3000,
        )
    )
    s.add(
        Result(
            seq=1,
            source="f:2",
            id=None,
            status="failed",
            http_status=503,
            attempts=6,
            latency_ms=900.0,
            error_code="DMS.00503001",
            started_at=1500,
            done_at=2500,
        )
    )
    s.add(Result(seq=2, source="f:3", id=None, status="invalid", error_code="INVALID_RECORD"))
    snap = s.snapshot()
    assert (snap["total"], snap["ok"], snap["failed"], snap["invalid"], snap["retries"]) == (
        3,
        1,
        1,
        1,
        7,
    )
    assert (
        snap["latency_ms"]["max"] == snap["latency_ms"]["p50"]
        and 1.99 <= snap["latency_ms"]["p50"] <= 2.01
    )
    assert snap["http_status"] == {"200": 1, "503": 1}
    assert snap["errors"] == {"DMS.00503001": 1, "INVALID_RECORD": 1}
    assert snap["elapsed_s"] == 2.0 and snap["throughput_msg_s"] == 1.0


def _mixed_results(n: int) -> list[Result]:
    """Every kind of Result a run reports, times out of order, some fields missing."""
    rng = random.Random(3)
    out = []
    for seq in range(n):
        status = rng.choice(["ok", "ok", "ok", "failed", "invalid", "skipped"])
        timed = status in ("ok", "failed") and rng.random() > 0.05
        intended = 1_700_000_000_000 + rng.randint(0, 5000) if timed else None
        queue = rng.choice([0.0, 0.5, 12.0, 900.0]) if intended is not None else None
        started = intended + int(queue or 0) if intended is not None else None
        latency = rng.lognormvariate(0, 2) if status in ("ok", "failed") else None
        out.append(
            Result(
                seq=seq,
                source="load",
                id=None,
                status=status,
                http_status=rng.choice([200, 503, None]) if status != "invalid" else None,
                attempts=rng.choice([0, 1, 1, 3]),
                latency_ms=latency,
                error_code=rng.choice([None, "DMS.00503001", "TIMEOUT"]),
                started_at=started,
                done_at=started + int(latency or 0) if started is not None else None,
                intended_at=intended,
                queue_ms=queue,
            )
        )
    return out


def test_load_stats_base_is_exactly_stats_fed_the_same_results() -> None:
    results = _mixed_results(3000)
    load, plain = LoadStats(), Stats()
    for r in results:
        load.add(r)
        plain.add(r)
    expected = plain.snapshot()
    assert plain.first_start is not None  # elapsed_s from the sends' span, not the clock
    assert load.base.snapshot() == expected
    snap = load.snapshot()
    assert snap["service_latency_ms"] == expected["latency_ms"]
    assert snap["late"] == sum(1 for r in results if (r.queue_ms or 0.0) > LATE_MS)
    intended = sorted(r.intended_at for r in results if r.intended_at is not None)
    assert snap["intended_rate_msg_s"] == round(
        (len(intended) - 1) / ((intended[-1] - intended[0]) / 1000.0), 1
    )
