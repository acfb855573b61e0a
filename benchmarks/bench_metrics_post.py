"""What a ``--workers`` run's /metrics costs: the bytes each shard posts every second
through Dask's event log, the CPU to make a post (shard) and to add it up (driver).

    python benchmarks/bench_metrics_post.py [--latencies 1000,100000,1000000] [--shards 8]

For latency histograms holding each of ``--latencies`` values (lognormal, ~3 ms median,
a long tail to seconds: what a backfill against a real target accumulates), printed:

1. Bytes of one post as Dask's event log carries it (msgpack): the progress a shard posted
   before /metrics (the baseline), with the figures as posted (``metrics.post_of``: the
   histograms as bucket counts at the metric's bounds), and with the histograms as
   HdrHistogram's encoded form instead (the alternative: compressed, base64).
2. µs to make a post in the shard (the figures from its stats, the histogram's buckets)
   and to add one up in the driver (``ShardedFigures.add``), and µs for one scrape of
   ``--shards`` shards' sum, against decoding and adding ``--shards`` encoded
   HdrHistograms (what the driver would do every second with the alternative).
3. ns a shard spends counting each attempt by code (``AttemptCounts``, always on in a
   shard), against ``Stats.add`` of the same result (what every record costs any run).

The machine is shared: the times are noisy; the bytes are exact.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack
from hdrh.histogram import HdrHistogram
from prometheus_client.exposition import generate_latest

from bulksend.metrics import AttemptCounts, Figures, ShardedFigures, post_of, registry_for
from bulksend.result import OK, Result
from bulksend.stats import Latencies, Stats, new_histogram


def _progress(shard: int) -> dict[str, object]:
    """The progress a shard posted before /metrics (``shard_task._ShardHooks.progress``)."""
    return {
        "shard": shard,
        "ok": 812_345,
        "failed": 12,
        "invalid": 3,
        "skipped": 0,
        "total": 812_360,
        "in_flight": 64,
        "retrying": 2,
        "rate": 2000.0,
        "bytes_read": 123_456_789,
        "bytes_total": 987_654_321,
    }


def _figures(latencies: Latencies) -> Figures:
    return Figures(
        records={"ok": 812_345, "failed": 12, "invalid": 3, "skipped": 0},
        requests={"200": 812_345, "429": 230, "503": 41, "TIMEOUT": 2},
        retries=271,
        in_flight=64,
        target_rate=2000.0,
        latency=latencies.histogram(),
    )


def _per_call_us(fn: Callable[[], object], min_s: float = 0.5) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s:
        fn()
        n += 1
    return elapsed / n * 1e6


def bench(values: int, shards: int) -> None:
    rng = random.Random(values)
    latencies = Latencies()
    for _ in range(values):
        latencies.add_ms(rng.lognormvariate(1.1, 1.3))
    figures = _figures(latencies)
    hist = latencies.histogram()
    base = msgpack.packb(_progress(0))
    posted = msgpack.packb({**_progress(0), "metrics": post_of(figures, "0123456789abcdef")})
    post = post_of(figures, "0123456789abcdef")
    encoded = hist.encode()
    hdr = msgpack.packb({**_progress(0), "metrics": {**post, "latency": encoded}})
    print(f"\n{values:,} latencies in the histogram")
    print(f"  bytes a post: progress alone {len(base)}, with the figures {len(posted)}", end="")
    print(f" (+{len(posted) - len(base)}), with hdrh-encoded histograms instead {len(hdr)}")

    shard_us = _per_call_us(lambda: post_of(figures, "0123456789abcdef"))
    baseline_us = _per_call_us(lambda: _progress(0))
    sums = ShardedFigures()
    add_us = _per_call_us(lambda: sums.add(0, post))
    for i in range(shards):
        sums.add(i, post)
    registry = registry_for(sums)
    scrape_us = _per_call_us(lambda: generate_latest(registry))

    def decode_and_add() -> None:
        total = new_histogram()
        for _ in range(shards):
            total.add(HdrHistogram.decode(encoded))

    hdr_us = _per_call_us(decode_and_add)
    print(
        f"  shard: a post {shard_us:,.0f} µs (the progress alone {baseline_us:.1f} µs),"
        f" once a second"
    )
    print(
        f"  driver: add a post {add_us:,.0f} µs; a scrape of {shards} shards {scrape_us:,.0f} µs;"
        f" decoding and adding {shards} encoded histograms instead {hdr_us:,.0f} µs"
        f" ({hdr_us / add_us:.0f} x a post's adding)"
    )


def attempt_cost() -> None:
    result = Result(
        seq=0,
        source="in:1",
        id="m",
        identity="in:1",
        status=OK,
        http_status=200,
        attempts=1,
        latency_ms=3.2,
        started_at=1,
        done_at=4,
    )
    counts, stats = AttemptCounts(), Stats()
    n = 200_000

    def per_call_ns(fn: Callable[[Result], None]) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn(result)
        return (time.perf_counter() - start) / n * 1e9

    count_ns, add_ns = per_call_ns(counts.on_attempt), per_call_ns(stats.add)
    print(
        f"\nan attempt counted by code: {count_ns:.0f} ns ({count_ns / add_ns:.2f} x Stats.add"
        f" of a result, {add_ns:.0f} ns)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latencies", default="1000,100000,1000000")
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    for values in (int(v) for v in args.latencies.split(",")):
        bench(values, args.shards)
    attempt_cost()


if __name__ == "__main__":
    main()
