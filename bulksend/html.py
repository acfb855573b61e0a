"""The HTML report (``--html FILE`` on ``send``, ``load`` and ``report``): one self-contained
file that opens offline and fetches nothing.

``RunReport`` observes the run (``add(result)``, as ``Stats`` does): a ``Timeseries`` capped at
``MAX_POINTS`` buckets (past it the bucket width doubles, so the file stays a few hundred KB
however long the run), whole-run latency bins and one example per error code.
``write_html_report`` formats: throughput per second, latency percentiles over time, a
latency histogram, HTTP status and error codes over time, the run's settings, its summary
and the error table. Charts are drawn by matplotlib as inline SVG (text kept as text, so
the browser's fonts draw it): no JavaScript and no fetch, and a few hundred KB where
plotly's inlined bundle alone is over 3 MB. matplotlib is imported only when a report is
written.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bulksend.errors import SinkError
from bulksend.result import FAILED, INVALID, OK, Result
from bulksend.timeseries import GROWTH, LatencyBins, Row, Timeseries

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Chart points at most; 720 keeps every line's SVG path near 15 KB.
MAX_POINTS = 720
#: Error codes kept with an example; the rest are counted under "(other codes)".
MAX_ERROR_CODES = 100
#: Status and error codes drawn as their own line; the rest are summed as "other".
TOP_CODES = 6
#: Bars in the latency histogram at most.
HISTOGRAM_BARS = 60
_COLORS = {
    "intended": "#9e9e9e",
    "sent": "#1f77b4",
    "ok": "#2ca02c",
    "failed": "#d62728",
    "p50": "#1f77b4",
    "p90": "#ff7f0e",
    "p99": "#d62728",
    "max": "#7f7f7f",
    "service_p99": "#9467bd",
}


@dataclass(slots=True)
class ErrorExample:
    """How often an error code came, and the first record that got it."""

    count: int
    seq: int
    http_status: int | None
    message: str
    request_id: str | None


class RunReport:
    """What the HTML report needs of a run, gathered one Result at a time."""

    def __init__(self, *, max_points: int = MAX_POINTS) -> None:
        self.timeseries = Timeseries(max_points=max_points)
        #: Corrected (from the intended time) and service (from the actual send) latency.
        self.latency = LatencyBins()
        self.service = LatencyBins()
        #: Whether any record carried an intended send time (a paced run).
        self.paced = False
        self.records = 0
        self.errors: dict[str, ErrorExample] = {}
        self.other_errors = 0

    def add(self, result: Result) -> None:
        self.records += 1
        self.timeseries.add(result)
        status = result.status
        if result.intended_at is not None:
            self.paced = True
        if status == OK and result.latency_ms is not None:
            self.service.add(result.latency_ms)
            self.latency.add(result.latency_ms + (result.queue_ms or 0.0))
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


def write_html_report(
    path: str,
    report: RunReport,
    stats: Mapping[str, Any],
    *,
    title: str = "bulksend",
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Write ``report`` (and the run's ``stats`` snapshot and ``settings``) as one HTML file
    at ``path``, whole (a temporary file, then a rename). SinkError when it cannot."""
    text = render_html(report, stats, title=title, settings=settings or {})
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise SinkError(f"cannot write {path}: {exc.strerror or exc}") from None


def render_html(
    report: RunReport, stats: Mapping[str, Any], *, title: str, settings: Mapping[str, Any]
) -> str:
    """The report as one HTML document (see ``write_html_report``)."""
    rows = list(report.timeseries.rows())
    start = (
        dt.datetime.fromtimestamp(rows[0].t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if rows
        else "-"
    )
    width = report.timeseries.width
    charts = [
        ("throughput", "Throughput", _throughput_chart(rows, report.paced)),
        ("latency", "Latency over time", _latency_chart(rows, report.paced)),
        ("histogram", "Latency histogram", _histogram_chart(report)),
        ("codes", "Status and error codes over time", _codes_chart(rows)),
    ]
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{report.records:,} records; first second {e(start)}; '
        f"one chart point per {width} s{' (downsampled)' if width > 1 else ''}. "
        + (
            "Latency is corrected: measured from each message's intended send time (the service "
            "latency, from the actual send, is drawn beside it)."
            if report.paced
            else "Latency is measured from each message's first send attempt."
        )
        + "</p>",
        '<div class="columns"><section id="summary"><h2>Summary</h2>',
        _table(_summary_rows(stats)),
        '</section><section id="settings"><h2>Settings</h2>',
        _table([(k, _plain(v)) for k, v in settings.items()]) if settings else "<p>-</p>",
        "</section></div>",
    ]
    for key, heading, svg in charts:
        parts += [
            f'<section class="chart" id="chart-{key}"><h2>{e(heading)}</h2>',
            svg,
            "</section>",
        ]
    parts += [
        '<section id="errors"><h2>Errors</h2>',
        _errors_table(report),
        "</section>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1280px;
color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555}.chart svg{width:100%;height:auto;display:block}
.columns{display:flex;flex-wrap:wrap;gap:0 40px}
"""


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return "  ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def _summary_rows(stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, value in stats.items():
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


# --- charts ------------------------------------------------------------------------------


def _figure(height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(12, height), layout="constrained")


def _svg(fig: Figure, salt: str) -> str:
    """The figure as an SVG element for inlining: no XML prolog or DOCTYPE, and ids salted
    per chart so that several SVGs in one page never share a clip-path id."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _seconds(rows: Sequence[Row]) -> list[float]:
    """Each bucket's middle, in seconds since the first bucket's start."""
    t0 = rows[0].t
    return [r.t - t0 + r.width / 2 for r in rows]


def _time_axis(ax: Axes, rows: Sequence[Row]) -> None:
    start = dt.datetime.fromtimestamp(rows[0].t, dt.UTC).strftime("%H:%M:%S") if rows else "-"
    ax.set_xlabel(f"seconds since {start} UTC")


def _no_data(ax: Axes, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="#888")


def _plain_log_ticks(axis: Any) -> None:
    """Log-scale ticks as plain numbers (0.5, 1, 10, 100) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _throughput_chart(rows: Sequence[Row], paced: bool) -> str:
    fig = _figure(4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    if rows:
        x = _seconds(rows)
        # The schedule is drawn last, dashed, so that it shows where the others follow it.
        for name in ("failed", "ok", "sent", "intended"):
            if name == "intended" and not paced:
                continue
            top.plot(
                x,
                [getattr(r.bucket, name) / r.width for r in rows],
                label=f"{name}/s",
                color=_COLORS[name],
                linewidth=1.2,
                linestyle=(0, (4, 3)) if name == "intended" else "-",
            )
        bottom.plot(x, [r.in_flight for r in rows], color="#555", linewidth=1)
        handles, labels = top.get_legend_handles_labels()
        top.legend(handles[::-1], labels[::-1], loc="lower center", ncols=4, fontsize="small")
    else:
        _no_data(top)
    top.set_ylabel("messages / s")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    bottom.set_ylabel("in flight")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    _time_axis(bottom, rows)
    return _svg(fig, "throughput")


def _latency_chart(rows: Sequence[Row], paced: bool) -> str:
    fig = _figure(3.6)
    ax = fig.subplots()
    positive = False
    if rows:
        x = _seconds(rows)
        for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)):
            y = [
                r.bucket.latency.percentile(p) if r.bucket.latency.count else math.nan for r in rows
            ]
            positive = positive or any(v > 0 for v in y)
            ax.plot(x, y, label=name, color=_COLORS[name], linewidth=1.2)
        if paced:
            y = [
                r.bucket.service.percentile(99) if r.bucket.service.count else math.nan
                for r in rows
            ]
            ax.plot(
                x,
                y,
                label="service p99 (from the actual send)",
                color=_COLORS["service_p99"],
                linewidth=1,
                linestyle=":",
            )
    if positive:
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.legend(loc="upper left", ncols=5, fontsize="small")
    else:
        _no_data(ax)
    ax.set_ylabel("ms from intended send" if paced else "ms")
    ax.grid(alpha=0.3, which="both")
    _time_axis(ax, rows)
    return _svg(fig, "latency")


def _histogram_chart(report: RunReport) -> str:
    fig = _figure(3.2)
    ax = fig.subplots()
    if report.latency.count:
        edges, counts = _display_bins(report.latency, None)
        label = "corrected (from the intended send)" if report.paced else "latency"
        ax.stairs(counts, edges, fill=True, alpha=0.6, color=_COLORS["p50"], label=label)
        if report.paced:
            _, service = _display_bins(report.service, edges)
            ax.stairs(
                service,
                edges,
                color=_COLORS["service_p99"],
                linewidth=1.2,
                label="service (from the actual send)",
            )
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.legend(loc="upper right", fontsize="small")
    else:
        _no_data(ax)
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("ok answers")
    ax.grid(alpha=0.3, which="both")
    return _svg(fig, "histogram")


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


def _codes_chart(rows: Sequence[Row]) -> str:
    fig = _figure(4.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, attr, label in ((top, "statuses", "HTTP status"), (bottom, "errors", "error code")):
        counts: list[Counter[str]] = [getattr(r.bucket, attr) for r in rows]
        totals: Counter[str] = Counter()
        for c in counts:
            totals.update(c)
        x = _seconds(rows) if rows else []
        top_codes = [code for code, _ in totals.most_common(TOP_CODES)]
        for code in top_codes:
            y = [c.get(code, 0) / r.width for c, r in zip(counts, rows, strict=True)]
            ax.plot(x, y, label=code, linewidth=1.2)
        if len(totals) > TOP_CODES:
            y = [
                (c.total() - sum(c.get(k, 0) for k in top_codes)) / r.width
                for c, r in zip(counts, rows, strict=True)
            ]
            ax.plot(x, y, label="other", linewidth=1, color="#888")
        if totals:
            ax.legend(
                loc="upper left",
                ncols=TOP_CODES + 1,
                fontsize="small",
                title=label,
                title_fontsize="small",
            )
        else:
            _no_data(ax, f"no {label}s")
        ax.set_ylabel("answers / s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _time_axis(bottom, rows)
    return _svg(fig, "codes")
