"""Stats observe: ``Stats.add(result)`` for each Result, ``snapshot()`` for the figures.
Nothing here sends, sleeps or prints (reporters format; see ``summary.py``).

* ``Stats``: a ``send`` run's figures (the ``--stats`` document).
* ``LoadStats``: ``Stats`` plus the open-model split, as wrk2 reports it: ``latency_ms`` is
  the corrected latency, from each message's intended send time (``latency_ms + queue_ms``
  of the Result), and ``service_latency_ms`` the uncorrected one, from the actual send.
  Under a stall the first shows what a user waiting on a schedule saw; the second hides it
  (coordinated omission: the sends that would have measured the stall never went out
  during it).

Latency percentiles come from an HdrHistogram (3 significant digits, microsecond units,
1 µs to 1 hour), so memory stays constant however long the run and ``bulksend report`` can
rebuild exactly the same figures from a ledger.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

from bulksend.result import FAILED, INVALID, OK, SKIPPED, Result

_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000


def new_histogram() -> HdrHistogram:
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, 3)


def histogram_summary(hist: HdrHistogram) -> dict[str, float]:
    """p50/p90/p99/p99.9/p99.99/max/mean in milliseconds (0 when empty)."""
    if hist.get_total_count() == 0:
        return dict.fromkeys(("p50", "p90", "p99", "p99_9", "p99_99", "max", "mean"), 0.0)

    def ms(us: float) -> float:
        return round(us / 1000.0, 3)

    return {
        "p50": ms(hist.get_value_at_percentile(50)),
        "p90": ms(hist.get_value_at_percentile(90)),
        "p99": ms(hist.get_value_at_percentile(99)),
        "p99_9": ms(hist.get_value_at_percentile(99.9)),
        "p99_99": ms(hist.get_value_at_percentile(99.99)),
        "max": ms(hist.get_max_value()),
        "mean": ms(hist.get_mean_value()),
    }


class Latencies:
    """Latencies (ms) into an HdrHistogram, fed in bulk.

    hdrh's ``record_value`` costs ~1.5 µs of Python per value, a few per cent of a message's whole
    CPU budget. Here a value costs a dict increment on its HdrHistogram bucket (~0.4 µs);
    the counts go into the histogram, one ``record_value`` per bucket, when it is read.
    Subtleness ahead! Each value is reduced to the lowest value of the bucket it would land
    in anyway (3 significant digits = 2,048 sub-buckets, so ``shift = bit_length - 11``),
    hence percentiles, min, max and mean are exactly those of recording every value
    (``tests/test_stats.py`` checks it against hdrh itself).
    """

    __slots__ = ("_hist", "_pending")

    def __init__(self) -> None:
        self._hist = new_histogram()
        self._pending: dict[int, int] = {}

    def add_ms(self, ms: float) -> None:
        """Record one latency in milliseconds (whole µs, clamped to 1 µs .. 1 h)."""
        us = int(ms * 1000.0)
        if us < _LOWEST_US:
            us = _LOWEST_US
        elif us > _HIGHEST_US:
            us = _HIGHEST_US
        shift = us.bit_length() - 11
        if shift > 0:
            us = us >> shift << shift
        pending = self._pending
        pending[us] = pending.get(us, 0) + 1

    def histogram(self) -> HdrHistogram:
        """The HdrHistogram of every value added so far."""
        for value, count in self._pending.items():
            self._hist.record_value(value, count)
        self._pending.clear()
        return self._hist

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count()) + sum(self._pending.values())

    def summary(self) -> dict[str, float]:
        return histogram_summary(self.histogram())


class Stats:
    """Accumulates Results. ``total`` counts every record, invalid and skipped included;
    ``retries`` counts HTTP attempts beyond each record's first; latency is over ok records."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.retries = 0
        self.http_status: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency = Latencies()
        self.started = time.monotonic()
        self.finished: float | None = None
        self.rate_changes = 0
        #: Wall-clock span of the sends (ms since the epoch): first attempt's start, last
        #: answer. elapsed_s is this span when there is one, so that ``bulksend report``
        #: rebuilds exactly the figures of the run from its ledger.
        self.first_start: int | None = None
        self.last_done: int | None = None

    def add(self, result: Result) -> None:
        self.counts[result.status] += 1
        if result.started_at is not None and (
            self.first_start is None or result.started_at < self.first_start
        ):
            self.first_start = result.started_at
        if result.done_at is not None and (
            self.last_done is None or result.done_at > self.last_done
        ):
            self.last_done = result.done_at
        if result.attempts > 1:
            self.retries += result.attempts - 1
        if result.http_status is not None:
            self.http_status[result.http_status] += 1
        if result.error_code is not None and result.status != OK:
            self.errors[result.error_code] += 1
        if result.status == OK and result.latency_ms is not None:
            self.latency.add_ms(result.latency_ms)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def finish(self) -> None:
        self.finished = time.monotonic()

    def elapsed(self) -> float:
        """Seconds: the span of the sends when known, else since this Stats began."""
        if (
            self.first_start is not None
            and self.last_done is not None
            and self.last_done > self.first_start
        ):
            return (self.last_done - self.first_start) / 1000.0
        return (self.finished or time.monotonic()) - self.started

    def snapshot(self) -> dict[str, Any]:
        """The ``--stats`` JSON: field names are a contract."""
        elapsed = self.elapsed()
        done = self.counts[OK] + self.counts[FAILED]
        return {
            "total": self.total,
            "ok": self.counts[OK],
            "failed": self.counts[FAILED],
            "invalid": self.counts[INVALID],
            "skipped": self.counts[SKIPPED],
            "retries": self.retries,
            "elapsed_s": round(elapsed, 3),
            "throughput_msg_s": round(done / elapsed, 1) if elapsed > 0 else 0.0,
            "latency_ms": self.latency.summary(),
            "http_status": {str(k): v for k, v in sorted(self.http_status.items())},
            "errors": dict(self.errors.most_common()),
            "rate_changes": self.rate_changes,
        }


#: A send whose first attempt started more than this after its intended time is ``late``:
#: it waited for a free worker (the pool was full) or for a client too busy to keep up.
#: Below it is the event loop's ordinary wake-up jitter on a busy two-core machine.
LATE_MS = 10.0


class LoadStats:
    """``Stats`` of a paced run with corrected and service latency; see the module docstring.

    ``late`` counts records that went out more than ``LATE_MS`` after their intended time;
    ``intended_rate_msg_s`` and ``send_rate_msg_s`` are the schedule's and the actual sends'
    average rates (between the first and the last of each).
    """

    def __init__(self) -> None:
        self.base = Stats()
        self.corrected = Latencies()
        self.late = 0
        self.intended = _Span()
        self.sent = _Span()

    def add(self, result: Result) -> None:
        """``Stats.add`` and the load's own figures in one pass (the same figures as
        ``base.add(result)`` plus the spans: ``tests/test_stats.py`` holds them equal).
        Written out, not layered: a load adds every result on the event loop that also
        sends, ~2 µs per message layered, a few per cent of a core at 20,000 msg/s."""
        base = self.base
        status = result.status
        # get/set rather than ``+= 1``: a Counter's own subscript costs twice a dict's.
        counts = base.counts
        counts[status] = counts.get(status, 0) + 1
        started = result.started_at
        if started is not None:
            first = base.first_start
            if first is None or started < first:
                base.first_start = started
            sent = self.sent  # _Span.add, written out
            sent.count += 1
            if started < sent.first:
                sent.first = started
            if started > sent.last:
                sent.last = started
        done = result.done_at
        if done is not None:
            last = base.last_done
            if last is None or done > last:
                base.last_done = done
        intended = result.intended_at
        if intended is not None:
            span = self.intended
            span.count += 1
            if intended < span.first:
                span.first = intended
            if intended > span.last:
                span.last = intended
        if result.attempts > 1:
            base.retries += result.attempts - 1
        http = result.http_status
        if http is not None:
            statuses = base.http_status
            statuses[http] = statuses.get(http, 0) + 1
        queue = result.queue_ms or 0.0
        if queue > LATE_MS:
            self.late += 1
        if status == OK:
            latency = result.latency_ms
            if latency is not None:
                base.latency.add_ms(latency)
                self.corrected.add_ms(latency + queue)
        elif result.error_code is not None:
            base.errors[result.error_code] += 1

    @property
    def total(self) -> int:
        return self.base.total

    @property
    def rate_changes(self) -> int:
        return self.base.rate_changes

    @rate_changes.setter
    def rate_changes(self, n: int) -> None:
        self.base.rate_changes = n

    def finish(self) -> None:
        self.base.finish()

    def snapshot(self) -> dict[str, Any]:
        """``Stats.snapshot()``'s keys, ``latency_ms`` corrected, plus the load's own."""
        snap = self.base.snapshot()
        snap["service_latency_ms"] = snap["latency_ms"]
        snap["latency_ms"] = self.corrected.summary()
        snap["late"] = self.late
        snap["late_after_ms"] = LATE_MS
        snap["intended_rate_msg_s"] = self.intended.rate()
        snap["send_rate_msg_s"] = self.sent.rate()
        return snap


class _Span:
    """Count, first and last of a series of epoch-ms times."""

    __slots__ = ("count", "first", "last")

    def __init__(self) -> None:
        self.count = 0
        # Sentinels rather than None: one comparison per time, not two.
        self.first: float = math.inf
        self.last: float = -math.inf

    def add(self, at: int) -> None:
        self.count += 1
        if at < self.first:
            self.first = at
        if at > self.last:
            self.last = at

    def rate(self) -> float:
        """Events per second between the first and the last (n events, n - 1 gaps)."""
        if not self.last > self.first:
            return 0.0
        return round((self.count - 1) / ((self.last - self.first) / 1000.0), 1)
