"""The HTML report (``--html FILE`` on ``send``, ``load`` and ``report``): one self-contained
file that opens offline and fetches nothing.

``RunReport`` observes the run (``add(result)``, as ``Stats`` does): a ``Timeseries`` capped at
``MAX_POINTS`` buckets (past it the bucket width doubles, so the file stays a few hundred KB
however long the run), late sends per bucket, whole-run latency bins and one example per
error code. ``write_html_report`` formats: threshold verdicts, the summary, a percentile
table, the settings of the run (and of every run a ledger holds), interactive charts
(throughput, in flight, latency over time, error rate, late sends, status and error codes,
a latency histogram) and the error table.

The charts (their data made by ``bulksend.charts``) are drawn in the browser by uPlot
(``bulksend/assets``, MIT), inlined with the data as JSON: zoom (drag; a double click
resets), values under the cursor in each chart's legend, series toggled by clicking their
legend entry, the time charts zoomed and hovered together. uPlot was measured against the
alternatives, minified: dygraphs 2.2 (vegeta's plot) is 130 KB and Chart.js 4.6 is 210 KB
before its zoom plugin, where uPlot is 51 KB with zoom, live legend, toggling, log scales
and cursor sync built in. It replaced matplotlib, which with numpy and Pillow made a fresh
``pip install .`` 232 MB rather than 58 MB.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

from bulksend.charts import chart_specs
from bulksend.result import FAILED, INVALID, OK, Result
from bulksend.sinks import DocumentWriter
from bulksend.stats import LATE_MS
from bulksend.timeseries import LatencyBins, Timeseries

#: Chart points at most (720 points of each chart's lines: a page of ~190 KB).
MAX_POINTS = 720
#: Error codes kept with an example; the rest are counted under "(other codes)".
MAX_ERROR_CODES = 100
#: The percentile table's columns: (heading, key of the stats snapshot's latency summary).
PERCENTILES = (
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99.9", "p99_9"),
    ("p99.99", "p99_99"),
    ("max", "max"),
    ("mean", "mean"),
)


@dataclass(slots=True)
class ErrorExample:
    """How often an error code came, and the first record that got it."""

    count: int
    seq: int
    http_status: int | None
    message: str
    request_id: str | None


class RunReport:
    """What the HTML report needs of a run, gathered one Result at a time.

    ``late_after_ms``: a send whose first attempt started more than this after its intended
    time counts as late (the stats' ``late``)."""

    def __init__(self, *, max_points: int = MAX_POINTS, late_after_ms: float = LATE_MS) -> None:
        self.timeseries = Timeseries(max_points=max_points)
        #: Latencies of ok results the timeseries has no time for (no done_at): the
        #: buckets hold every other one (see ``latency``).
        self._latency_untimed = LatencyBins()
        self._service_untimed = LatencyBins()
        #: Whether any record carried an intended send time (a paced run).
        self.paced = False
        self.records = 0
        self.errors: dict[str, ErrorExample] = {}
        self.other_errors = 0
        self.late_after_ms = late_after_ms
        #: Late sends by bucket of their first attempt, keyed as the timeseries keys its
        #: buckets (epoch ms // (1000 * width)), so they coarsen in step with it.
        self.late: dict[int, int] = {}
        self._late_width = 1
        #: The first and last time (epoch ms) of any bucketed event: the run's span.
        #: Sentinels until the first: one comparison per time, not two.
        self._first: float = math.inf
        self._last: float = -math.inf

    @property
    def first_ms(self) -> int | None:
        """The first time (epoch ms) of any bucketed event; None before any."""
        return int(self._first) if self._first != math.inf else None

    @property
    def last_ms(self) -> int | None:
        """The last time (epoch ms) of any bucketed event; None before any."""
        return int(self._last) if self._last != -math.inf else None

    @property
    def latency(self) -> LatencyBins:
        """Corrected latency (from the intended time) of the whole run."""
        return self._whole("latency", self._latency_untimed)

    @property
    def service(self) -> LatencyBins:
        """Service latency (from the actual send) of the whole run."""
        return self._whole("service", self._service_untimed)

    def _whole(self, which: str, untimed: LatencyBins) -> LatencyBins:
        # The buckets' bins, merged when asked: each ok latency is in exactly one bucket
        # (its done_at's), so a second set of bins fed per result would only cost time.
        whole = LatencyBins()
        whole.merge(untimed)
        for row in self.timeseries.rows():
            whole.merge(getattr(row.bucket, which))
        return whole

    def add(self, result: Result) -> None:
        self.records += 1
        self.timeseries.add(result)
        status = result.status
        intended, started, done = result.intended_at, result.started_at, result.done_at
        if intended is not None:
            self.paced = True
        if status == OK:
            if done is None and result.latency_ms is not None:
                self._service_untimed.add(result.latency_ms)
                self._latency_untimed.add(result.latency_ms + (result.queue_ms or 0.0))
        elif status in (FAILED, INVALID):
            code = result.error_code or "UNKNOWN"
            example = self.errors.get(code)
            if example is not None:
                example.count += 1
            elif len(self.errors) < MAX_ERROR_CODES:
                self.errors[code] = ErrorExample(
                    1, result.seq, result.http_status, result.error_msg or "", result.request_id
                )
            else:
                self.other_errors += 1
        if status != OK and status != FAILED:
            return  # no times: the timeseries leaves it out too
        for at in (intended, started, done):
            if at is not None:
                if at < self._first:
                    self._first = at
                if at > self._last:
                    self._last = at
        width = self.timeseries.width
        if width != self._late_width:
            merged: dict[int, int] = {}
            for key, n in self.late.items():
                merged[key * self._late_width // width] = (
                    merged.get(key * self._late_width // width, 0) + n
                )
            self.late, self._late_width = merged, width
        if started is not None and (result.queue_ms or 0.0) > self.late_after_ms:
            key = started // (1000 * width)
            self.late[key] = self.late.get(key, 0) + 1


def write_html_report(
    path: str,
    report: RunReport,
    stats: Mapping[str, Any],
    *,
    title: str = "bulksend",
    settings: Mapping[str, Any] | None = None,
    runs: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Write ``report`` as one HTML file at ``path``, whole, as every document output is
    written (``sinks.DocumentWriter``: through a symlink, in place for a device). SinkError
    when it cannot.

    ``stats``: the run's stats snapshot (its ``thresholds`` verdicts, when present, head the
    page). ``settings``: this run's settings (``send``/``load``), or what ``report`` read.
    ``runs``: the run lines of the ledgers read (``{"at": ms, "command": ..., "settings":
    {...}}``, or bare settings mappings), each shown as its own table."""
    text = render_html(report, stats, title=title, settings=settings or {}, runs=runs)
    DocumentWriter(path).write(text.encode())


def render_html(
    report: RunReport,
    stats: Mapping[str, Any],
    *,
    title: str,
    settings: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The report as one HTML document (see ``write_html_report``)."""
    rows = list(report.timeseries.rows())
    start = _utc(rows[0].t) if rows else "-"
    width = report.timeseries.width
    verdicts = _verdicts(stats)
    failed = [expr for expr, ok, _ in verdicts if not ok]
    page_title = f"{'FAIL' if failed else 'PASS'} · {title}" if verdicts else title
    charts = chart_specs(report)
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(page_title)}</title>",
        f"<style>{_asset('uPlot.min.css')}\n{_asset('report.css')}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        _thresholds_section(verdicts),
        f'<p class="meta">{report.records:,} records; first second {e(start)}; '
        f"one chart point per {width} s{' (downsampled)' if width > 1 else ''}. "
        + (
            "Latency is corrected: measured from each message's intended send time (the service "
            "latency, from the actual send, is shown beside it)."
            if report.paced
            else "Latency is measured from each message's first send attempt."
        )
        + " Charts: drag to zoom (double click to reset), hover for values, click a legend "
        "entry to hide or show its line; shaded seconds are partial.</p>",
        '<div class="columns"><section id="summary"><h2>Summary</h2>',
        _table(_summary_rows(stats)),
        '</section><section id="percentiles"><h2>Latency percentiles (ms)</h2>',
        _percentile_table(stats),
        '</section><section id="settings"><h2>Settings</h2>',
        _table([(k, _plain(v)) for k, v in settings.items()]) if settings else "<p>-</p>",
        "</section></div>",
        _runs_section(runs),
        "<noscript><p>The charts need JavaScript (inlined in this file; nothing is fetched)."
        "</p></noscript>",
    ]
    for chart in charts:
        parts.append(
            f'<section class="chart" id="chart-{chart["id"]}"><h2>{e(chart["title"])}</h2>'
            f'<div class="plot" data-chart="{chart["id"]}"></div></section>'
        )
    data = {"width": width, "t0": rows[0].t if rows else 0, "charts": charts}
    parts += [
        '<section id="errors"><h2>Errors</h2>',
        _errors_table(report),
        "</section>",
        f'<script type="application/json" id="bulksend-data">{_json(data)}</script>',
        f"<script>/*! {_asset('NOTICE').strip()}\n\n{_asset('uPlot.LICENSE').strip()} */\n"
        f"{_asset('uPlot.iife.min.js')}</script>",
        f"<script>{_asset('report.js')}</script>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def _asset(name: str) -> str:
    return resources.files("bulksend").joinpath("assets", name).read_text(encoding="utf-8")


def _json(value: Any) -> str:
    # "<" only occurs inside JSON strings, where \u003c means the same: so no "</script>"
    # in an error message or a code can end the data block early.
    return orjson.dumps(value).decode().replace("<", "\\u003c")


def _utc(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return "  ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


#: Snapshot keys shown elsewhere on the page than the summary table.
_NOT_SUMMARY = ("latency_ms", "service_latency_ms", "thresholds")


def _summary_rows(stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, value in stats.items():
        if key in _NOT_SUMMARY:
            continue
        if isinstance(value, Mapping):
            value = (
                "  ".join(
                    f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in value.items()
                )
                or "-"
            )
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        out.append((key, str(value)))
    return out


def _table(rows: Sequence[tuple[str, str]]) -> str:
    e = html.escape
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _percentile_table(stats: Mapping[str, Any]) -> str:
    """Corrected and service latency of a load (only one, ``latency``, for a send)."""
    kinds: list[tuple[str, Any]] = []
    if "service_latency_ms" in stats:
        kinds.append(("corrected (from the intended send)", stats.get("latency_ms")))
        kinds.append(("service (from the actual send)", stats["service_latency_ms"]))
    else:
        kinds.append(("latency", stats.get("latency_ms")))
    head = "<tr><th></th>" + "".join(f"<th>{h}</th>" for h, _ in PERCENTILES) + "</tr>"
    empty = not stats.get("ok")  # no ok answer: no latency, rather than "0.000"
    body = []
    for label, summary in kinds:
        cells = []
        for _, key in PERCENTILES:
            value = summary.get(key) if isinstance(summary, Mapping) else None
            text = "n/a" if empty or not isinstance(value, (int, float)) else f"{value:,.3f}"
            cells.append(f"<td class=num>{text}</td>")
        body.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _verdicts(stats: Mapping[str, Any]) -> list[tuple[str, bool, Any]]:
    """``(expression, ok, value)`` of each ``thresholds`` entry of the snapshot."""
    found = stats.get("thresholds")
    if not isinstance(found, Mapping):
        return []
    out = []
    for expr, verdict in found.items():
        if isinstance(verdict, Mapping):
            out.append((str(expr), verdict.get("ok") is True, verdict.get("value")))
    return out


def _thresholds_section(verdicts: Sequence[tuple[str, bool, Any]]) -> str:
    if not verdicts:
        return ""
    e = html.escape
    failed = sum(1 for _, ok, _ in verdicts if not ok)
    banner = (
        f'<p class="verdict fail">FAIL: {failed} of {len(verdicts)} thresholds failed</p>'
        if failed
        else f'<p class="verdict pass">PASS: all {len(verdicts)} thresholds met</p>'
    )
    rows = "".join(
        f'<tr class="{"pass" if ok else "fail"}"><td>{e(expr)}</td>'
        f"<td class=num>{e(_number(value))}</td>"
        f'<td class="mark">{"pass" if ok else "FAIL"}</td></tr>'
        for expr, ok, value in verdicts
    )
    return (
        f'<section id="thresholds">{banner}<table><tr><th>threshold</th><th>value</th>'
        f"<th>verdict</th></tr>{rows}</table></section>"
    )


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:,.6g}" if isinstance(value, float) else f"{value:,}"


def _runs_section(runs: Sequence[Mapping[str, Any]]) -> str:
    """One table per run line a ledger holds: when, which command, its settings."""
    if not runs:
        return ""
    e = html.escape
    parts = [f'<section id="runs"><h2>Runs in the ledger{"s" if len(runs) > 1 else ""}</h2>']
    for i, run in enumerate(runs, 1):
        settings = run.get("settings")
        if not isinstance(settings, Mapping):
            settings, heading = run, f"run {i}"
        else:
            at = run.get("at")
            when = _utc(at / 1000) if isinstance(at, (int, float)) else "time unknown"
            heading = f"run {i}: {run.get('command', '?')}, {when}"
        parts.append(f'<div class="run"><h3>{e(heading)}</h3>')
        parts.append(_table([(str(k), _plain(v)) for k, v in settings.items()]))
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def _errors_table(report: RunReport) -> str:
    if not report.errors:
        return "<p>No errors.</p>"
    e = html.escape
    head = "<tr><th>error code</th><th>count</th><th>HTTP</th><th>example</th><th>seq</th><th>request id</th></tr>"
    body = []
    for code, ex in sorted(report.errors.items(), key=lambda kv: -kv[1].count):
        body.append(
            f"<tr><td>{e(code)}</td><td class=num>{ex.count:,}</td><td>{ex.http_status or '-'}</td>"
            f"<td>{e(ex.message[:300])}</td><td class=num>{ex.seq}</td><td>{e(ex.request_id or '-')}</td></tr>"
        )
    if report.other_errors:
        body.append(
            f"<tr><td>(other codes)</td><td class=num>{report.other_errors:,}</td><td></td><td></td>"
            "<td></td><td></td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"
