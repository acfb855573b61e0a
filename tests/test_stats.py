"""Stats observe: the bulk-fed latency histogram equals hdrh fed value by value."""

from __future__ import annotations

import random

from hdrh.histogram import HdrHistogram

from bulksend.result import Result
from bulksend.stats import Latencies, Stats, histogram_summary, new_histogram


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
