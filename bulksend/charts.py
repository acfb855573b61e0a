"""The HTML report's charts as data: ``chart_specs(report)`` turns a ``RunReport`` into the
JSON that ``bulksend/assets/report.js`` draws with uPlot (see ``bulksend.html``).

Rates in a bucket the run only partly covers (its first and last second: a run started at
.3 of a second covers 0.7 s of its first) are the bucket's count over the part covered, so
a steady run draws steady to its end; the page shades those buckets and their hover text
says how much of them the run covered.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bulksend.timeseries import GROWTH, LatencyBins, Row

if TYPE_CHECKING:
    from bulksend.html import RunReport

#: Status and error codes drawn as their own line; the rest are summed as "other".
TOP_CODES = 6
#: Bars in the latency histogram at most.
HISTOGRAM_BARS = 60
#: A partial bucket's rate is its count over the part of it the run covered, but never over
#: less than this fraction of the bucket: a run's first or last few milliseconds hold too
#: few messages for a rate, and would draw a spike.
MIN_COVERED = 0.1
_COLORS = {
    "intended": "#9e9e9e",
    "sent": "#1f77b4",
    "ok": "#2ca02c",
    "failed": "#d62728",
    "late": "#ff7f0e",
    "p50": "#1f77b4",
    "p90": "#ff7f0e",
    "p99": "#d62728",
    "p99.9": "#8c564b",
    "max": "#7f7f7f",
    "service p50": "#17becf",
    "service p99": "#9467bd",
    "in flight": "#555555",
    "other": "#888888",
}
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def chart_specs(report: RunReport) -> list[dict[str, Any]]:
    """Each chart as JSON for the page's script: ``id``, ``title``, ``kind`` ("time": x is
    each bucket's middle in seconds since the first bucket's start; "histogram": x is each
    bar's lower edge in ms, and one more, the last bar's upper edge), ``x``, ``series``
    (``label``, ``values`` with None for no value, ``color``, ``unit``, optional ``dash``,
    ``fill`` and ``scale`` "pct" for a right-hand percent axis), ``log`` (a log y scale),
    ``height`` (CSS px), ``partial`` (time charts: the buckets the run only partly covered,
    as ``[index, seconds covered]``) and ``empty`` (why there is nothing to draw, if so)."""
    frame = _Frame(report)
    b = [r.bucket for r in frame.rows]
    throughput = [
        _series(
            f"{name}/s",
            frame.rate([getattr(k, name) for k in b]),
            unit="msg/s",
            color=_COLORS[name],
            dash=name == "intended",
        )
        for name in ("intended", "sent", "ok", "failed")
        if name != "intended" or report.paced
    ]
    in_flight = _series("in flight", [r.in_flight for r in frame.rows], unit="msgs")
    error_rate = _series(
        "error rate",
        [_percent(k.failed, k.ok + k.failed) for k in b],
        unit="%",
        color=_COLORS["failed"],
    )
    charts = [
        frame.chart("throughput", "Throughput", throughput),
        frame.chart("inflight", "In flight (sent, not yet answered)", [in_flight], height=180),
        _latency_chart(report, frame),
        frame.chart(
            "errorrate", "Error rate (failed answers, % of answers)", [error_rate], height=180
        ),
    ]
    if report.paced:
        charts.append(_late_chart(report, frame))
    charts.append(_codes_chart(frame, "statuses", "HTTP statuses per second", "no answers"))
    charts.append(_codes_chart(frame, "codes", "Error codes per second", "no errors"))
    charts.append(_histogram_chart(report))
    return charts


class _Frame:
    """The time charts' common axis: the buckets, their x, and how much of each the run
    covered (all of it but for the first and the last)."""

    def __init__(self, report: RunReport) -> None:
        self.rows = list(report.timeseries.rows())
        t0 = self.rows[0].t if self.rows else 0
        self.x = [r.t - t0 + r.width / 2 for r in self.rows]
        self.covered = _coverage(self.rows, report.first_ms, report.last_ms)
        self.partial = [
            [i, round(c, 3)]
            for i, (r, c) in enumerate(zip(self.rows, self.covered, strict=True))
            if c < r.width
        ]

    def rate(self, counts: Sequence[int]) -> list[float | None]:
        """Per second: each count over the seconds its bucket covered (see MIN_COVERED)."""
        return [
            round(n / max(c, MIN_COVERED * r.width), 2)
            for n, r, c in zip(counts, self.rows, self.covered, strict=True)
        ]

    def chart(
        self,
        key: str,
        title: str,
        series: list[dict[str, Any]],
        *,
        log: bool = False,
        height: int = 260,
        empty: str | None = None,
    ) -> dict[str, Any]:
        return {
            "id": key,
            "title": title,
            "kind": "time",
            "x": self.x,
            "series": series,
            "log": log,
            "height": height,
            "partial": self.partial,
            "empty": empty if self.rows else "no data",
        }


def _series(label: str, values: Sequence[float | None], **style: Any) -> dict[str, Any]:
    return {"label": label, "values": values, "color": _COLORS.get(label), **style}


def _latency_chart(report: RunReport, frame: _Frame) -> dict[str, Any]:
    def pct(bins: Sequence[LatencyBins], p: float) -> list[float | None]:
        return [round(k.percentile(p), 3) if k.count else None for k in bins]

    corrected = [r.bucket.latency for r in frame.rows]
    service = [r.bucket.service for r in frame.rows]
    series = [
        _series(name, pct(corrected, p), unit="ms")
        for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
    ]
    series.append(
        _series("max", [round(k.max_ms, 3) if k.count else None for k in corrected], unit="ms")
    )
    if report.paced:
        series.append(_series("service p50", pct(service, 50.0), unit="ms", dash=True))
        series.append(_series("service p99", pct(service, 99.0), unit="ms", dash=True))
    title = "Latency over time, ms (log scale)" + (
        ": corrected, from the intended send; dashed: service, from the actual send"
        if report.paced
        else ""
    )
    empty = None if report.latency.count else "no ok answers"
    return frame.chart("latency", title, series, log=True, height=300, empty=empty)


def _late_chart(report: RunReport, frame: _Frame) -> dict[str, Any]:
    late = [report.late.get(r.t // r.width, 0) for r in frame.rows]
    share = [_percent(n, r.bucket.sent) for n, r in zip(late, frame.rows, strict=True)]
    series = [
        _series("late/s", frame.rate(late), unit="msg/s", color=_COLORS["late"]),
        _series("late, % of sends", share, unit="%", scale="pct", color="#8c564b", dash=True),
    ]
    title = f"Late sends (first attempt over {report.late_after_ms:g} ms after its intended time)"
    return frame.chart("late", title, series, height=200)


def _codes_chart(frame: _Frame, key: str, title: str, none: str) -> dict[str, Any]:
    """Answers per second by HTTP status or by error code: the TOP_CODES most frequent,
    the rest summed as "other"."""
    counts: list[Counter[str]] = [
        r.bucket.statuses if key == "statuses" else r.bucket.errors for r in frame.rows
    ]
    totals: Counter[str] = Counter()
    for c in counts:
        totals.update(c)
    top = [code for code, _ in totals.most_common(TOP_CODES)]
    series = [
        _series(
            code,
            frame.rate([c.get(code, 0) for c in counts]),
            unit="answers/s",
            color=_PALETTE[i % len(_PALETTE)],
        )
        for i, code in enumerate(top)
    ]
    if len(totals) > TOP_CODES:
        rest = [c.total() - sum(c.get(k, 0) for k in top) for c in counts]
        series.append(_series("other", frame.rate(rest), unit="answers/s"))
    return frame.chart(key, title, series, height=200, empty=None if series else none)


def _histogram_chart(report: RunReport) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "id": "histogram",
        "title": "Latency histogram: ok answers by latency, ms (log scale)",
        "kind": "histogram",
        "x": [],
        "series": [],
        "log": False,
        "height": 240,
        "partial": [],
        "empty": None if report.latency.count else "no ok answers",
    }
    if not report.latency.count:
        return spec
    edges, counts = _display_bins(report.latency, None)
    # A stepped line holds each value up to the next x: the last edge closes the last bar.
    spec["x"] = [round(v, 4) for v in edges]
    label = "corrected" if report.paced else "ok answers"
    series = [_series(label, [*counts, 0], unit="answers", color=_COLORS["p50"], fill=True)]
    if report.paced:
        _, service = _display_bins(report.service, edges)
        series.append(
            _series("service", [*service, 0], unit="answers", color=_COLORS["service p99"])
        )
    spec["series"] = series
    return spec


def _coverage(rows: Sequence[Row], first_ms: int | None, last_ms: int | None) -> list[float]:
    """Seconds of each bucket inside the run's span (its first event to its last): the
    bucket's width but for the first and the last."""
    if first_ms is None or last_ms is None:
        return [float(r.width) for r in rows]
    start, end = first_ms / 1000, last_ms / 1000
    return [max(0.0, min(r.t + r.width, end) - max(r.t, start)) for r in rows]


def _percent(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 3) if whole else None


def _display_bins(bins: LatencyBins, edges: list[float] | None) -> tuple[list[float], list[int]]:
    """Merge the 2% bins into at most HISTOGRAM_BARS bars (``edges`` given: those bars)."""
    floor = 0.001
    if edges is None:
        lo, hi = min(bins.bins), max(bins.bins) + 1
        step = max(1, math.ceil((hi - lo) / HISTOGRAM_BARS))
        edges = [floor * math.pow(GROWTH, i) for i in range(lo, hi + step, step)]
    counts = [0] * (len(edges) - 1)
    log_lo = math.log(edges[0])
    log_step = math.log(edges[1] / edges[0])
    for i, n in bins.bins.items():
        middle = math.log(floor * math.pow(GROWTH, i + 0.5))
        j = min(len(counts) - 1, max(0, int((middle - log_lo) / log_step)))
        counts[j] += n
    return edges, counts
