"""Live metrics of a running ``send`` or ``load``: Prometheus text at ``/metrics``
(``--metrics-addr HOST:PORT``), so an hours-long backfill can be watched as any service is.

The shape::

    MetricsSource.figures() -> Figures   what a run has done so far: a local run
                                         (``RunFigures``), or a ``--workers`` driver's
                                         sum of its shards' posts (``ShardedFigures``)
    FiguresCollector(source)             turns Figures into metric families, when scraped,
                                         in a private CollectorRegistry (one per run)
    MetricsEndpoint.bind(addr)           the listening socket, bound before the first send
                                         (a port in use is one line and exit 2)
    endpoint.serve(source)               aiohttp on the run's own event loop, until cancelled

Nothing is counted on the hot path for these figures but the requests: everything else is
read, when scraped, from what the run keeps anyway (its ``Stats``, the Sender's counters
and health). ``requests_total`` counts attempts, which only delivery sees: ``AttemptCounts``
is an attempt observer (one dict increment per attempt) that runs only with
``--metrics-addr``.

A ``--workers``/``--cluster`` run serves /metrics from its driver: each shard posts its
``Figures`` with its progress every second (``post_of``: ~0.3 kB more a post, its
histograms as bucket counts at ``BUCKETS_S``), and ``ShardedFigures`` adds the shards up,
so that no counter goes back when Dask runs a shard again (see there).

Served on the run's loop, not in prometheus_client's thread: a scrape reads the stats while
nothing changes them (a thread would iterate counters the loop is adding to), and costs
the loop one short callback per scrape (``benchmarks/bench_metrics.py`` measures both).

The metrics (``code`` is the HTTP status, or the error_code when no answer came)::

    bulksend_records_total{status="ok|failed|invalid|skipped"}   records done
    bulksend_requests_total{code="200|429|...|TIMEOUT|CONNECT_ERROR|..."}  HTTP attempts
    bulksend_retries_total                  attempts beyond each record's first (done records)
    bulksend_in_flight                      requests in flight now
    bulksend_target_rate                    the schedule's rate now, msg/s (0: unpaced)
    bulksend_late_total                     load: sends > 10 ms after their intended time
    bulksend_request_duration_seconds       histogram, per ok record (see below)
    bulksend_corrected_duration_seconds     load: the same from each intended send time
    bulksend_outages_total, bulksend_target_down   the target was / is unreachable
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from bulksend.errors import ConfigError
from bulksend.result import FAILED, INVALID, OK, SKIPPED, Result
from bulksend.stats import LoadStats, Stats

if TYPE_CHECKING:
    from bulksend.sender import Sender

#: Upper bounds (seconds) of the duration histograms' buckets: Prometheus's defaults,
#: with 1 ms below and 30 s, 60 s above (a backfill against a slow or stalling target).
BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
STATUSES = (OK, FAILED, INVALID, SKIPPED)


@dataclass(frozen=True)
class Figures:
    """A run's figures so far: what ``/metrics`` shows."""

    #: Records done, by status (ok, failed, invalid, skipped).
    records: Mapping[str, int]
    #: HTTP attempts by code: the HTTP status as text, or the error_code of an attempt
    #: that got no answer (``TIMEOUT``, ``CONNECT_ERROR``, ...).
    requests: Mapping[str, int]
    #: Attempts beyond each record's first, over the records done (as ``--stats`` counts).
    retries: int
    in_flight: int
    #: The schedule's rate now, msg/s; 0 unpaced.
    target_rate: float
    #: Load only: sends that went out late (None: not a load).
    late: int | None = None
    #: Latency of each ok record in µs (``latency_ms`` of the ledger: first attempt's start
    #: to the final answer), as an HdrHistogram, or already in Prometheus's buckets (what
    #: shards post); None: no latency kept.
    latency: HdrHistogram | Buckets | None = None
    #: Load only: latency from each ok message's intended send time, µs.
    corrected: HdrHistogram | Buckets | None = None
    #: Outages of the target so far, and whether it is unreachable now.
    outages: int = 0
    down: bool = False


class MetricsSource(Protocol):
    """Whatever can say how a run is going: a local run (``RunFigures``) or the merged
    counts of a ``--workers`` run's shards on its driver. Called on the loop that serves
    /metrics, once per scrape."""

    def figures(self) -> Figures: ...


class AttemptCounts:
    """An attempt observer (``Sender(observers=...)``): HTTP attempts by status, or by
    error_code when no answer came. One dict increment per attempt; stringified when read."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int | str | None, int] = {}

    def on_attempt(self, result: Result) -> None:
        key = result.http_status if result.http_status is not None else result.error_code
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1

    def by_code(self) -> dict[str, int]:
        return {
            str(code) if code is not None else "NO_ANSWER": n for code, n in self.counts.items()
        }


@dataclass
class RunFigures:
    """``MetricsSource`` of a run in this process: its stats, its Sender, its attempts."""

    stats: Stats | LoadStats
    sender: Sender
    attempts: AttemptCounts
    #: Monotonic time the run started: a load's ramp is a function of the time since.
    started: float = field(default_factory=time.monotonic)

    def figures(self) -> Figures:
        stats, sender = self.stats, self.sender
        load = stats if isinstance(stats, LoadStats) else None
        base = load.base if load is not None else stats
        assert isinstance(base, Stats)
        schedule = sender.schedule
        rate_at = getattr(schedule, "rate_at", None)  # a load's stages ramp; a Schedule not
        rate = rate_at(time.monotonic() - self.started) if rate_at is not None else schedule.rate
        health = sender.health
        return Figures(
            records=dict(base.counts),
            requests=self.attempts.by_code(),
            retries=base.retries,
            in_flight=sender.counters.in_flight,
            target_rate=float(rate),
            late=load.late if load is not None else None,
            latency=base.latency.histogram(),
            corrected=load.corrected.histogram() if load is not None else None,
            outages=health.outages,
            down=health.down,
        )


# --- a --workers/--cluster run: what shards post, added up in the driver ------------------


def post_of(figures: Figures, attempt: str) -> dict[str, Any]:
    """``figures`` as a shard posts them to its driver (msgpack-able: Dask's event log
    carries them), marked with ``attempt``: a token of this run of the shard."""
    return {
        "attempt": attempt,
        "records": dict(figures.records),
        "requests": dict(figures.requests),
        "retries": figures.retries,
        "in_flight": figures.in_flight,
        "target_rate": figures.target_rate,
        "late": figures.late,
        "latency": _wire(figures.latency),
        "corrected": _wire(figures.corrected),
        "outages": figures.outages,
        "down": figures.down,
    }


def figures_of(post: Mapping[str, Any]) -> tuple[str, Figures]:
    """The attempt and the Figures of a shard's post (``post_of``)."""
    late = post["late"]
    return str(post["attempt"]), Figures(
        records={str(k): int(v) for k, v in post["records"].items()},
        requests={str(k): int(v) for k, v in post["requests"].items()},
        retries=int(post["retries"]),
        in_flight=int(post["in_flight"]),
        target_rate=float(post["target_rate"]),
        late=None if late is None else int(late),
        latency=_unwire(post["latency"]),
        corrected=_unwire(post["corrected"]),
        outages=int(post["outages"]),
        down=bool(post["down"]),
    )


def _wire(hist: HdrHistogram | Buckets | None) -> list[float] | None:
    if hist is None:
        return None
    buckets = _buckets(hist)
    return [*buckets.cumulative, buckets.sum_s]


def _unwire(counts: list[float] | None) -> Buckets | None:
    if counts is None:
        return None
    *cumulative, sum_s = counts
    return Buckets(tuple(int(n) for n in cumulative), float(sum_s))


class ShardedFigures:
    """``MetricsSource`` of a ``--workers``/``--cluster`` driver: the sum over its shards
    of what they post (``add(shard, post)``, called on the driver's loop).

    Subtleness ahead! A Prometheus counter must never go back, yet a shard may run more
    than once in a run: Dask runs it again when its worker is lost, and the new attempt
    starts afresh from what the lost one left in the shard's ledger part. So two kinds of
    counters, two rules:

    * What the records done say (records by status, retries, late sends, the duration
      histograms). An attempt counts the results it reads from its part as its own, so
      each post covers the shard's work so far. A new attempt may start below what the
      lost one posted (results counted but not yet written when it died: they are sent
      again), so a shard shows, figure by figure and bucket by bucket, the most any of
      its posts said.
    * What an attempt did itself (requests by code, outages). Each attempt's counts start
      at 0 and are its own: a shard shows the sum over its attempts of each one's latest
      post (keyed by shard and attempt).

    Gauges (in flight, the target rate, the target down) are each shard's latest post.

    Every request is counted once, but for those a lost worker made after its last post
    (no one can count them). A shard's last post is its final count, and the driver has it
    before the shard's result (``shard_task._ShardHooks.finish``), so at the end the
    records equal the merged ledger's. (A shard writes a result's ledger line in the loop
    turn after it counts it, while a post takes milliseconds to leave the worker: a lost
    attempt's post all but never counts a result its part lacks. If one did, and the
    record ended otherwise when sent again, the end would count that record twice.)
    """

    def __init__(self, *, load: bool = False) -> None:
        self.load = load
        #: The target rate now, when the driver knows it better than the sum of the
        #: shards' (a load's schedule); None: the sum of the shards' latest posts.
        self.target_rate: Callable[[], float] | None = None
        self._done: dict[int, Figures] = {}
        self._own: dict[tuple[int, str], Figures] = {}
        self._now: dict[int, Figures] = {}

    def add(self, shard: int, post: Mapping[str, Any]) -> None:
        attempt, figures = figures_of(post)
        done = self._done.get(shard)
        self._done[shard] = figures if done is None else _most(done, figures)
        own = self._own.get((shard, attempt))
        self._own[shard, attempt] = figures if own is None else _most(own, figures)
        self._now[shard] = figures

    def figures(self) -> Figures:
        done, own, now = self._done.values(), self._own.values(), self._now.values()
        records: Counter[str] = Counter()
        latency = corrected = Buckets.empty()
        for f in done:
            records.update(f.records)
            latency += _buckets(f.latency)
            corrected += _buckets(f.corrected)
        requests: Counter[str] = Counter()
        for f in own:
            requests.update(f.requests)
        rate = self.target_rate
        return Figures(
            records=dict(records),
            requests=dict(requests),
            retries=sum(f.retries for f in done),
            in_flight=sum(f.in_flight for f in now),
            target_rate=rate() if rate is not None else sum(f.target_rate for f in now),
            late=sum(f.late or 0 for f in done) if self.load else None,
            latency=latency,
            corrected=corrected if self.load else None,
            outages=sum(f.outages for f in own),
            down=any(f.down for f in now),
        )


def _most(a: Figures, b: Figures) -> Figures:
    """Counter by counter the larger of two posts of one shard; ``b``'s gauges (the later)."""

    def most_counts(x: Mapping[str, int], y: Mapping[str, int]) -> dict[str, int]:
        return {k: max(x.get(k, 0), y.get(k, 0)) for k in x.keys() | y.keys()}

    return Figures(
        records=most_counts(a.records, b.records),
        requests=most_counts(a.requests, b.requests),
        retries=max(a.retries, b.retries),
        in_flight=b.in_flight,
        target_rate=b.target_rate,
        late=None if a.late is None and b.late is None else max(a.late or 0, b.late or 0),
        latency=_buckets(a.latency).most(_buckets(b.latency)),
        corrected=_buckets(a.corrected).most(_buckets(b.corrected)),
        outages=max(a.outages, b.outages),
        down=b.down,
    )


def _buckets(hist: HdrHistogram | Buckets | None) -> Buckets:
    if hist is None:
        return Buckets.empty()
    return hist if isinstance(hist, Buckets) else Buckets.of(hist)


def histogram_buckets(
    hist: HdrHistogram, bounds_s: tuple[float, ...] = BUCKETS_S
) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (cumulative, ``+Inf`` last) and the sum in seconds of a µs
    HdrHistogram.

    A bucket counts the values whose HdrHistogram bucket holds the bound or lies below it:
    a value at most 0.1 % (3 significant digits) above a bound may count in it. The sum is
    hdrh's (each value taken as the middle of its bucket, as ``get_mean_value`` does).

    Both read off the counts array in one pass of C loops: a scrape must not hold the loop
    for a walk over every recorded value (hdrh's iterators cost ~µs a step in Python; its
    mean took ~150 ms of a million latencies), nor for a Python step per bucket (~10 ms);
    this takes ~1 ms a histogram (a scrape of two: 13 ms before, 3-4 ms after;
    ``benchmarks/bench_metrics.py``), once a second on each shard of a ``--workers`` run
    with /metrics (``benchmarks/bench_metrics_post.py``)."""
    total = int(hist.get_total_count())
    if not total:
        return [*((_le(b), 0.0) for b in bounds_s), ("+Inf", 0.0)], 0.0
    top = hist.get_counts_array_index(hist.max_value)
    counts = hist.counts[: top + 1]
    cumulative = list(itertools.accumulate(counts))
    buckets = []
    for bound in bounds_s:
        index = hist.get_counts_array_index(int(bound * 1_000_000))
        buckets.append((_le(bound), float(cumulative[min(index, top)])))
    buckets.append(("+Inf", float(total)))
    sum_us = sum(map(operator.mul, counts, _middles(hist)))
    return buckets, sum_us / 1_000_000


#: The middle value of each bucket, by histogram layout: the same for every histogram of
#: a run (``stats.new_histogram``), made once (~10 ms) rather than at each scrape.
_MIDDLES: dict[tuple[int, int, int], list[int]] = {}


def _middles(hist: HdrHistogram) -> list[int]:
    """Each bucket's middle value (its lowest plus half its width, as hdrh's mean takes
    it), for every bucket of ``hist``'s layout."""
    layout = (hist.unit_magnitude, hist.sub_bucket_half_count_magnitude, hist.counts_len)
    middles = _MIDDLES.get(layout)
    if middles is None:
        value_at = hist.get_value_from_index
        lows = [value_at(index) for index in range(hist.counts_len + 1)]
        middles = [low + ((high - low) >> 1) for low, high in itertools.pairwise(lows)]
        _MIDDLES[layout] = middles
    return middles


def _le(bound: float) -> str:
    return f"{bound:g}"


_LES = (*(_le(b) for b in BUCKETS_S), "+Inf")


@dataclass(frozen=True, slots=True)
class Buckets:
    """A duration histogram as Prometheus shows it: how many values are at or below each
    bound of ``BUCKETS_S``, then all of them (cumulative), and their sum in seconds.

    What a shard posts of its HdrHistograms: 16 integers and a float. A post is then
    ~0.4 kB in all, against 1.5 kB (a thousand latencies) to 13 kB (a million) with hdrh's
    encoded form, and the driver adds 16 integers a shard rather than decoding and adding
    histograms every second (``benchmarks/bench_metrics_post.py``)."""

    cumulative: tuple[int, ...]
    sum_s: float

    @classmethod
    def of(cls, hist: HdrHistogram) -> Buckets:
        buckets, sum_s = histogram_buckets(hist)
        return cls(tuple(int(n) for _, n in buckets), sum_s)

    @classmethod
    def empty(cls) -> Buckets:
        return cls((0,) * len(_LES), 0.0)

    def prometheus(self) -> list[tuple[str, float]]:
        return [(le, float(n)) for le, n in zip(_LES, self.cumulative, strict=True)]

    def __add__(self, other: Buckets) -> Buckets:
        return Buckets(
            tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True)),
            self.sum_s + other.sum_s,
        )

    def most(self, other: Buckets) -> Buckets:
        """Each bucket's larger count, and the larger sum: still cumulative."""
        return Buckets(
            tuple(max(a, b) for a, b in zip(self.cumulative, other.cumulative, strict=True)),
            max(self.sum_s, other.sum_s),
        )


class FiguresCollector(Collector):
    """The metric families of ``source.figures()``, made when scraped."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        f = self.source.figures()
        records = CounterMetricFamily(
            "bulksend_records", "Records done, by final status.", labels=["status"]
        )
        for status in STATUSES:
            records.add_metric([status], f.records.get(status, 0))
        yield records
        requests = CounterMetricFamily(
            "bulksend_requests",
            "HTTP attempts, by status code (the error_code when no answer came).",
            labels=["code"],
        )
        for code, n in sorted(f.requests.items()):
            requests.add_metric([code], n)
        yield requests
        yield CounterMetricFamily(
            "bulksend_retries",
            "Attempts beyond each record's first, over the records done.",
            value=f.retries,
        )
        yield GaugeMetricFamily("bulksend_in_flight", "Requests in flight.", value=f.in_flight)
        yield GaugeMetricFamily(
            "bulksend_target_rate",
            "The schedule's rate now, messages per second (0: unpaced).",
            value=f.target_rate,
        )
        if f.late is not None:
            yield CounterMetricFamily(
                "bulksend_late",
                "Sends that went out more than 10 ms after their intended time.",
                value=f.late,
            )
        yield CounterMetricFamily(
            "bulksend_outages", "Times the target became unreachable.", value=f.outages
        )
        yield GaugeMetricFamily(
            "bulksend_target_down", "1 while the target is unreachable.", value=int(f.down)
        )
        if f.latency is not None:
            yield _histogram(
                "bulksend_request_duration_seconds",
                "Latency of each ok record: its first attempt's start to the final answer.",
                f.latency,
            )
        if f.corrected is not None:
            yield _histogram(
                "bulksend_corrected_duration_seconds",
                "Latency of each ok message from its intended send time (coordinated "
                "omission corrected).",
                f.corrected,
            )


def _histogram(name: str, doc: str, hist: HdrHistogram | Buckets) -> HistogramMetricFamily:
    if isinstance(hist, Buckets):
        buckets, sum_s = hist.prometheus(), hist.sum_s
    else:
        buckets, sum_s = histogram_buckets(hist)
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=sum_s)


def registry_for(source: MetricsSource) -> CollectorRegistry:
    """A registry of this run's own (the process-wide default would mix runs, and list
    the interpreter's metrics, which a short-lived sender does not need)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(source))
    return registry


def parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, or ``:PORT`` (every interface, as Prometheus
    exporters read it). ConfigError otherwise."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 <= port <= 65535 or (":" in host and not text.startswith("[")):
        raise ConfigError(
            f"--metrics-addr {text!r}: want HOST:PORT, e.g. 127.0.0.1:9464 or :9464 for every"
            " interface"
        )
    return host, port


class MetricsEndpoint:
    """The socket /metrics is served on, bound when made (``bind``), so a port in use stops
    the run before its first send; ``serve`` then answers on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def bind(cls, addr: str) -> MetricsEndpoint:
        host, port = parse_addr(addr)
        try:
            if host:
                family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
                sock = socket.create_server((host, port), family=family)
            elif socket.has_dualstack_ipv6():
                sock = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
            else:
                sock = socket.create_server(("", port))
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ConfigError(f"--metrics-addr {addr}: cannot listen there: {why}") from None
        sock.setblocking(False)
        return cls(sock)

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` as bound (the port chosen when 0 was given)."""
        host, port = self.sock.getsockname()[:2]
        if host in ("::", "0.0.0.0"):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/metrics"

    async def serve(
        self,
        source: MetricsSource,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer ``GET /metrics`` with ``source``'s figures until cancelled; closes the
        socket at the end."""
        async with self.serving(source):
            task_status.started()
            await anyio.sleep_forever()

    @contextlib.asynccontextmanager
    async def serving(self, source: MetricsSource) -> AsyncIterator[None]:
        """Answer ``GET /metrics`` with ``source``'s figures inside the block; closes the
        socket at its end. The answers need no task of ours: aiohttp's server handles each
        connection in its own."""
        # aiohttp's server is imported only by runs that serve metrics.
        from aiohttp import web

        registry = registry_for(source)

        async def metrics(request: web.Request) -> web.Response:
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        # A scrape is one short answer: at the end, wait for one in progress, not 60 s.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.SockSite(runner, self.sock).start()
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
