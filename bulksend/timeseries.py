"""A run's figures second by second: an observer (``add(result)``) that both ``bulksend load``
(the live ``--timeseries`` file, ``--abort-on-fail``, the progress line) and ``bulksend
report`` (the HTML charts) feed with Results, so both see the same seconds.

Buckets are whole wall-clock seconds (epoch seconds, as the Result's ``*_at`` fields are
epoch milliseconds), which needs no agreed start time: a run's live series and the one
rebuilt from its ledger put every message in the same bucket. Each message is counted in
the bucket of each of its own times:

* ``intended`` by ``intended_at``, ``sent`` by ``started_at`` (first attempt);
* ``ok``, ``failed``, latency, HTTP status and error code by ``done_at`` (final answer);
* ``in_flight`` at a bucket's end = sent so far - answered so far.

Latency per bucket is a sparse log-bucketed histogram (``LatencyBins``; values within 2% share
a bin), ~100 bins for a typical second rather than an HdrHistogram's fixed 190 KB. With
``max_points`` the series keeps at most that many buckets: past it the bucket width doubles
and neighbours merge (so a 10-million-message ledger still charts in a few hundred points).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bulksend.result import FAILED, OK, Result

#: Relative width of a latency bin: a percentile read from the bins is within 1% (half a
#: bin) of the exact one, enough for a chart and a per-second threshold.
GROWTH = 1.02
_LOG_GROWTH = math.log(GROWTH)
#: Latencies below 1 µs count as 1 µs (the HdrHistogram floor in ``bulksend.stats``).
_FLOOR_MS = 0.001
_log = math.log


def _round(ms: float) -> float:
    return round(ms, 3)


class LatencyBins:
    """A sparse histogram of latencies (ms): bin ``i`` holds values in
    ``[FLOOR * GROWTH**i, FLOOR * GROWTH**(i+1))``; exact count, sum and max beside."""

    __slots__ = ("bins", "count", "max_ms", "sum_ms")

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        if ms < _FLOOR_MS:
            ms = _FLOOR_MS
        i = int(_log(ms / _FLOOR_MS) / _LOG_GROWTH)
        bins = self.bins
        bins[i] = bins.get(i, 0) + 1
        self.count += 1
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: LatencyBins) -> None:
        for i, n in other.bins.items():
            self.bins[i] = self.bins.get(i, 0) + n
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0..100) in ms, as a bin's geometric middle (never above
        the exact max); 0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(p / 100 * self.count))
        seen = 0
        for i in sorted(self.bins):
            seen += self.bins[i]
            if seen >= rank:
                return min(self.max_ms, _FLOOR_MS * math.pow(GROWTH, i + 0.5))
        return self.max_ms  # pragma: no cover - rank <= count

    @property
    def mean(self) -> float:
        return self.sum_ms / self.count if self.count else 0.0

    def summary(self) -> dict[str, float]:
        """The threshold/stats keys: p50, p90, p99, p99_9, p99_99, max, mean (ms)."""
        return {
            "p50": _round(self.percentile(50)),
            "p90": _round(self.percentile(90)),
            "p99": _round(self.percentile(99)),
            "p99_9": _round(self.percentile(99.9)),
            "p99_99": _round(self.percentile(99.99)),
            "max": _round(self.max_ms),
            "mean": _round(self.mean),
        }


@dataclass(slots=True)
class Bucket:
    """What happened in one bucket of time (see the module docstring for which time)."""

    intended: int = 0
    sent: int = 0
    ok: int = 0
    failed: int = 0
    #: Corrected latency (from the intended send time) and service latency (from the
    #: actual send) of the ok answers.
    latency: LatencyBins = field(default_factory=LatencyBins)
    service: LatencyBins = field(default_factory=LatencyBins)
    #: Final answers by HTTP status ("none" when there was no HTTP answer).
    statuses: Counter[str] = field(default_factory=Counter)
    #: Failed answers by error code.
    errors: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Bucket) -> None:
        self.intended += other.intended
        self.sent += other.sent
        self.ok += other.ok
        self.failed += other.failed
        self.latency.merge(other.latency)
        self.service.merge(other.service)
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)


@dataclass(frozen=True, slots=True)
class Row:
    """One bucket, ready to format: starting ``t`` (epoch s), ``width`` seconds long."""

    t: int
    width: int
    bucket: Bucket
    #: Sent but not yet answered at the bucket's end.
    in_flight: int

    def to_json(self) -> dict[str, Any]:
        """The ``--timeseries`` line: counts, then corrected and service latency (ms)."""
        b = self.bucket
        return {
            "t": self.t,
            "width_s": self.width,
            "intended": b.intended,
            "sent": b.sent,
            "ok": b.ok,
            "failed": b.failed,
            "in_flight": self.in_flight,
            "p50": _round(b.latency.percentile(50)),
            "p90": _round(b.latency.percentile(90)),
            "p99": _round(b.latency.percentile(99)),
            "max": _round(b.latency.max_ms),
            "service_p50": _round(b.service.percentile(50)),
            "service_p99": _round(b.service.percentile(99)),
            "http_status": dict(sorted(b.statuses.items())),
            "errors": dict(b.errors.most_common()),
        }

    def figures(self) -> dict[str, float]:
        """This bucket as threshold figures (``bulksend.thresholds``): corrected latency
        (none without an ok answer), error_rate, and rate = answers per second."""
        b = self.bucket
        done = b.ok + b.failed
        return {
            **(b.latency.summary() if b.ok else {}),
            "error_rate": b.failed / done if done else 0.0,
            "rate": done / self.width,
        }


#: A bucket's ``statuses`` key for each HTTP status seen so far ("none": no HTTP answer).
_STATUS_KEYS: dict[int | None, str] = {None: "none"}


def _status_key(http_status: int | None) -> str:
    key = _STATUS_KEYS[http_status] = str(http_status)
    return key


class Timeseries:
    """Buckets of ``width`` seconds (1, doubling past ``max_points`` when that is set)."""

    def __init__(self, *, max_points: int | None = None) -> None:
        if max_points is not None and max_points < 2:
            raise ValueError("max_points must be at least 2")
        self.max_points = max_points
        self.width = 1
        self._buckets: dict[int, Bucket] = {}
        self._first: int | None = None
        self._last: int | None = None
        #: Live use (``pop``): the first key not yet popped, and running sums for in_flight.
        self._cursor: int | None = None
        self._sent_so_far = 0
        self._done_so_far = 0
        #: The bucket the last intended, sent and done time fell in, by the time's own key
        #: (-1: none; keys are >= 0): a key moved to the cursor still finds its bucket.
        self._intended_key: int = -1
        self._sent_key: int = -1
        self._done_key: int = -1
        self._intended = self._sent = self._done = Bucket()

    def _bucket(self, key: int) -> Bucket:
        """The bucket of ``key`` (epoch ms // (1000 * width)), made if need be."""
        if self._cursor is not None and key < self._cursor:
            # Only a clock step can bring a time from before a popped second: count it in
            # the oldest open bucket rather than lose it.
            key = self._cursor
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket()
            if self._first is None or key < self._first:
                self._first = key
            if self._last is None or key > self._last:
                self._last = key
        return bucket

    def add(self, result: Result) -> None:
        """Count one Result (invalid and skipped ones hold no times and are left out)."""
        status = result.status
        if status != OK and status != FAILED:
            return
        # Each of a message's times nearly always falls in the bucket the same time of the
        # previous message did: those buckets are kept at hand, one per kind of time (a
        # load behind its schedule has its intended times seconds before its answers).
        scale = 1000 * self.width
        at = result.intended_at
        if at is not None:
            key = at // scale
            if key != self._intended_key:
                self._intended_key, self._intended = key, self._bucket(key)
            self._intended.intended += 1
        at = result.started_at
        if at is not None:
            key = at // scale
            if key != self._sent_key:
                self._sent_key, self._sent = key, self._bucket(key)
            self._sent.sent += 1
        at = result.done_at
        if at is not None:
            key = at // scale
            if key != self._done_key:
                self._done_key, self._done = key, self._bucket(key)
            b = self._done
            http = result.http_status
            statuses, named = b.statuses, _STATUS_KEYS.get(http) or _status_key(http)
            statuses[named] = statuses.get(named, 0) + 1  # a Counter's ``+= 1`` costs twice
            if status == OK:
                b.ok += 1
                latency = result.latency_ms
                if latency is not None:
                    b.service.add(latency)
                    b.latency.add(latency + (result.queue_ms or 0.0))
            else:
                b.failed += 1
                b.errors[result.error_code or "UNKNOWN"] += 1
        if self.max_points is not None:
            while self.span > self.max_points:
                self._coarsen()

    def _forget_buckets_at_hand(self) -> None:
        self._intended_key = self._sent_key = self._done_key = -1
        self._intended = self._sent = self._done = Bucket()

    @property
    def span(self) -> int:
        """Buckets from the first to the last, empty ones included."""
        if self._first is None or self._last is None:
            return 0
        return self._last - self._first + 1

    def _coarsen(self) -> None:
        merged: dict[int, Bucket] = {}
        for key, bucket in self._buckets.items():
            into = merged.get(key // 2)
            if into is None:
                merged[key // 2] = bucket
            else:
                into.merge(bucket)
        self._buckets = merged
        self.width *= 2
        self._forget_buckets_at_hand()
        assert self._first is not None and self._last is not None
        self._first //= 2
        self._last //= 2
        if self._cursor is not None:
            self._cursor //= 2

    def get(self, t: int) -> Bucket | None:
        """The bucket holding epoch second ``t``, if any (a peek: nothing is removed)."""
        return self._buckets.get(t // self.width)

    def rows(self) -> Iterator[Row]:
        """Every bucket from the first to the last, empty ones included, in time order."""
        if self._first is None or self._last is None:
            return
        sent = done = 0
        for key in range(self._first, self._last + 1):
            bucket = self._buckets.get(key) or Bucket()
            sent += bucket.sent
            done += bucket.ok + bucket.failed
            yield Row(key * self.width, self.width, bucket, sent - done)

    def pop(self, before_ms: int | None = None) -> list[Row]:
        """Remove and return, in time order, the buckets that end at or before ``before_ms``
        (epoch ms; None: all of them), empty ones included. Live use: the caller knows
        when a bucket can no longer change (``bulksend.load``)."""
        if self._first is None or self._last is None:
            return []
        if self._cursor is None:
            self._cursor = self._first
        last = self._last if before_ms is None else before_ms // (1000 * self.width) - 1
        if self._cursor <= last:
            self._forget_buckets_at_hand()  # some may be popped below
        out = []
        while self._cursor <= last:
            bucket = self._buckets.pop(self._cursor, None) or Bucket()
            self._sent_so_far += bucket.sent
            self._done_so_far += bucket.ok + bucket.failed
            out.append(
                Row(
                    self._cursor * self.width,
                    self.width,
                    bucket,
                    self._sent_so_far - self._done_so_far,
                )
            )
            self._cursor += 1
        return out
