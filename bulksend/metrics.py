"""Live metrics of a running ``send`` or ``load``: Prometheus text at ``/metrics``
(``--metrics-addr HOST:PORT``), so an hours-long backfill can be watched as any service is.

The shape::

    MetricsSource.figures() -> Figures   what a run has done so far: a local run
                                         (``RunFigures``), or a ``--workers`` driver's
                                         merged counts of its shards
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
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Protocol

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
    #: to the final answer), as an HdrHistogram; None: no latency kept.
    latency: HdrHistogram | None = None
    #: Load only: latency from each ok message's intended send time, µs.
    corrected: HdrHistogram | None = None
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


def histogram_buckets(
    hist: HdrHistogram, bounds_s: tuple[float, ...] = BUCKETS_S
) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (cumulative, ``+Inf`` last) and the sum in seconds of a µs
    HdrHistogram.

    A bucket counts the values whose HdrHistogram bucket holds the bound or lies below it:
    a value at most 0.1 % (3 significant digits) above a bound may count in it. The sum is
    hdrh's (each value taken as the middle of its bucket, as ``get_mean_value`` does).

    Both read off the counts array in one pass: a scrape must not hold the loop for a walk
    over every recorded value (hdrh's iterators cost ~µs a step in Python; its mean took
    ~150 ms of a million latencies, this ~7 ms: ``benchmarks/bench_metrics.py``)."""
    total = int(hist.get_total_count())
    if not total:
        return [*((_le(b), 0.0) for b in bounds_s), ("+Inf", 0.0)], 0.0
    top = hist.get_counts_array_index(hist.max_value)
    counts = hist.counts[: top + 1]
    cumulative = list(accumulate(counts))
    buckets = []
    for bound in bounds_s:
        index = hist.get_counts_array_index(int(bound * 1_000_000))
        buckets.append((_le(bound), float(cumulative[min(index, top)])))
    buckets.append(("+Inf", float(total)))
    value_at = hist.get_value_from_index
    sum_us = 0
    for index, n in enumerate(counts):
        if n:
            low = value_at(index)
            sum_us += n * (low + ((value_at(index + 1) - low) >> 1))
    return buckets, sum_us / 1_000_000


def _le(bound: float) -> str:
    return f"{bound:g}"


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


def _histogram(name: str, doc: str, hist: HdrHistogram) -> HistogramMetricFamily:
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
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
