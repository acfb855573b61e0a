"""``bulksend report``: rebuilding a run's stats from its ledger exactly (send and load),
streaming in bounded memory; the HTML report's parts, and the page opened, hovered, clicked
and zoomed in a real headless Chromium (``tests/browser.py``)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulksend.charts import MIN_COVERED, chart_specs
from bulksend.html import MAX_POINTS, PERCENTILES, RunReport, render_html
from bulksend.result import FAILED, OK, Result
from bulksend.synthetic import SOURCE
from tests.browser import Page, browser_page
from tests.cli_helpers import bulksend, no_traceback, target, write_jsonl
from tests.serve_helpers import start_server_subprocess

pytestmark = pytest.mark.timeout(120)


@dataclasses.dataclass
class Ledger:
    out: Path
    stats: Path


@pytest.fixture(scope="module")
def load_ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    d = tmp_path_factory.mktemp("load")
    out, stats = d / "out.jsonl", d / "stats.json"
    proc = bulksend("load", "--embedded", "--rate", "150", "--duration", "2s", "--quiet", "--out", str(out),
                    "--stats", str(stats), "--html", str(d / "run.html"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return Ledger(out, stats)


@pytest.fixture(scope="module")
def send_ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """A send with failures (503 from the server, no retries) and invalid records."""
    d = tmp_path_factory.mktemp("send")
    records = [{"topic": "orders", "body": f"m{i}", "id": f"r{i}"} for i in range(300)]
    records += [{"body": "no topic"}, {"topic": "orders"}]
    inputs = write_jsonl(d / "in.jsonl", records)
    out, stats = d / "out.jsonl", d / "stats.json"
    with start_server_subprocess("--error-rate", "0.2", "--seed", "11") as (_, url):
        proc = bulksend("send", str(inputs), *target(url), "--max-retries", "0", "--quiet", "--out", str(out),
                        "--stats", str(stats))  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    return Ledger(out, stats)


@pytest.mark.parametrize("kind", ["load", "send"])
def test_json_reproduces_the_runs_stats_exactly(kind: str, request: pytest.FixtureRequest) -> None:
    ledger: Ledger = request.getfixturevalue(f"{kind}_ledger")
    proc = bulksend("report", str(ledger.out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ledger.stats.read_text()  # byte for byte: same keys, same values
    stats = orjson.loads(ledger.stats.read_bytes())
    assert ("service_latency_ms" in stats) is (kind == "load")
    if kind == "send":
        assert stats["failed"] > 0 and stats["invalid"] == 2


def test_table_by_default(load_ledger: Ledger) -> None:
    proc = bulksend("report", str(load_ledger.out))
    assert proc.returncode == 0, proc.stderr
    assert "bulksend report (load)" in proc.stdout and "records      300" in proc.stdout
    assert "service ms" in proc.stdout and "(from the intended send time)" in proc.stdout


def test_a_torn_last_line_is_ignored(load_ledger: Ledger, tmp_path: Path) -> None:
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(load_ledger.out.read_bytes() + b'{"seq": 300, "source": "lo')
    proc = bulksend("report", str(torn), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == load_ledger.stats.read_text()
    lineno = (
        load_ledger.out.read_bytes().count(b"\n") + 1
    )  # the run line, 300 results, the torn one
    assert f"ignored a torn last line at {torn}:{lineno}" in proc.stderr


def test_a_broken_line_inside_is_an_error(load_ledger: Ledger, tmp_path: Path) -> None:
    lines = load_ledger.out.read_bytes().splitlines(keepends=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"".join(lines[:5]) + b"not json\n" + b"".join(lines[5:]))
    proc = bulksend("report", str(broken))
    assert proc.returncode == 2 and f"{broken}:6: not a results line" in proc.stderr
    assert no_traceback(proc)
    missing = bulksend("report", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "cannot read the ledger" in missing.stderr


def test_several_ledgers_add_up(load_ledger: Ledger, send_ledger: Ledger) -> None:
    proc = bulksend("report", str(load_ledger.out), str(send_ledger.out), "--json")
    both = orjson.loads(proc.stdout)
    load, send = (orjson.loads(x.stats.read_bytes()) for x in (load_ledger, send_ledger))
    assert both["total"] == load["total"] + send["total"]
    assert both["ok"] == load["ok"] + send["ok"]
    assert "service_latency_ms" not in both  # not every record is a load's: send's keys


def test_records_ok_more_than_once_are_named(send_ledger: Ledger) -> None:
    # Two runs on one ledger at once, or a ledger given twice: every count doubles, and
    # nothing said so. The stats stay the ledgers' sum (as --stats would); a line warns.
    once = bulksend("report", str(send_ledger.out))
    assert once.returncode == 0 and "more than once" not in once.stderr, once.stderr
    twice = bulksend("report", str(send_ledger.out), str(send_ledger.out))
    ok = orjson.loads(send_ledger.stats.read_bytes())["ok"]
    assert twice.returncode == 0, twice.stderr
    assert f"warning: {ok:,} records are ok more than once" in twice.stderr, twice.stderr


def test_report_streams_in_bounded_memory(tmp_path: Path) -> None:
    """Peak RSS of ``report --html`` over 10,000 and 100,000 records: ten times the records
    must not cost memory in proportion (holding the Results would cost ~50 MB more)."""

    def ledger(n: int) -> Path:
        path = tmp_path / f"l{n}.jsonl"
        t0 = 1_700_000_000_000
        with path.open("wb") as fh:
            for i in range(n):
                at = t0 + i * 10
                ok = i % 50 != 0
                fh.write(orjson.dumps(Result(
                    seq=i, source=SOURCE, id=None, status=OK if ok else FAILED, http_status=200 if ok else 503,
                    attempts=1, latency_ms=1.0 + i % 97, error_code=None if ok else f"E{i % 7}",
                    error_msg=None if ok else "boom", started_at=at, done_at=at + 1 + i % 97, intended_at=at,
                    queue_ms=0.0), option=orjson.OPT_APPEND_NEWLINE))  # fmt: skip
        return path

    def peak_mb(path: Path) -> float:
        probe = ("import resource,subprocess,sys;subprocess.run(sys.argv[1:],check=True,stdout=subprocess.DEVNULL);"
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024)")  # fmt: skip
        cmd = [sys.executable, "-c", probe, sys.executable, "-m", "bulksend", "report", str(path), "--json",
               "--html", str(path.with_suffix(".html"))]  # fmt: skip
        return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    small, big = peak_mb(ledger(10_000)), peak_mb(ledger(100_000))
    print(f"peak RSS {small:.1f} MB / {big:.1f} MB")
    assert big - small < 25, (small, big)
    assert (tmp_path / "l100000.html").stat().st_size < 3_000_000


@pytest.fixture
def html_report(send_ledger: Ledger, load_ledger: Ledger, tmp_path: Path) -> Path:
    """``report --html`` of the load and the send ledger together (errors, both kinds)."""
    path = tmp_path / "report.html"
    proc = bulksend("report", str(load_ledger.out), str(send_ledger.out), "--html", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


CHARTS = [
    "throughput",
    "inflight",
    "latency",
    "errorrate",
    "late",
    "statuses",
    "codes",
    "histogram",
]


def test_html_is_self_contained(html_report: Path) -> None:
    text = html_report.read_text()
    # Nothing to fetch: scripts inline only; no external style, image, font or frame.
    assert not re.search(r"<(link|img|iframe|object|embed)\b", text)
    assert not re.search(r"<script[^>]*\bsrc\b", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and not re.search(r"url\(\s*['\"]?(https?:)?//", text)
    assert text.count("<script") == 3  # the data, uPlot, the charts' script
    assert "uPlot 1.6.32" in text and "Permission is hereby granted" in text  # its MIT notice
    for section in (
        "summary",
        "percentiles",
        "settings",
        *(f"chart-{c}" for c in CHARTS),
        "errors",
    ):
        assert f'id="{section}"' in text
    assert "DMS.00503001" in text and "INVALID_RECORD" in text  # the error table, an example each
    assert "matplotlib" not in sys.modules  # gone from the dependencies, and not imported


def test_percentile_table_has_corrected_and_service_rows(
    load_ledger: Ledger, tmp_path: Path
) -> None:
    page = tmp_path / "load.html"
    assert bulksend("report", str(load_ledger.out), "--html", str(page)).returncode == 0
    table = re.search(r'id="percentiles">(.*?)</section>', page.read_text(), re.S)
    assert table is not None
    head = re.findall(r"<th>([^<]*)</th>", table[1].split("</tr>")[0])
    assert head == ["", "p50", "p90", "p99", "p99.9", "p99.99", "max", "mean"]
    stats = orjson.loads(load_ledger.stats.read_bytes())
    for label, key in (("corrected", "latency_ms"), ("service", "service_latency_ms")):
        row = re.search(rf"<th>{label} [^<]*</th>(.*?)</tr>", table[1])
        assert row is not None
        cells = re.findall(r"<td class=num>([^<]*)</td>", row[1])
        assert cells == [
            f"{stats[key][k]:,.3f}" for k in ("p50", "p90", "p99", "p99_9", "p99_99", "max", "mean")
        ]
    assert stats["latency_ms"]["p99_99"] >= stats["latency_ms"]["p99_9"] > 0


def test_no_ok_answer_shows_no_percentiles() -> None:
    page = render_html(
        RunReport(), {"total": 0, "ok": 0, "latency_ms": {"p50": 0.0}}, title="t", settings={}
    )
    table = re.search(r'id="percentiles">(.*?)</section>', page, re.S)
    assert (
        table is not None and table[1].count("n/a") == len(PERCENTILES) and "0.000" not in table[1]
    )


def test_thresholds_head_the_page() -> None:
    stats = {"total": 10, "ok": 10, "thresholds": {
        "p99<100": {"ok": True, "value": 12.5}, "error_rate<0.01": {"ok": False, "value": 0.05}}}  # fmt: skip
    page = render_html(RunReport(), stats, title="bulksend load", settings={})
    assert "<title>FAIL · bulksend load</title>" in page
    assert '<p class="verdict fail">FAIL: 1 of 2 thresholds failed</p>' in page
    rows = re.findall(
        r'<tr class="(pass|fail)"><td>([^<]*)</td><td class=num>([^<]*)</td><td class="mark">([^<]*)<',
        page,
    )
    assert rows == [
        ("pass", "p99&lt;100", "12.5", "pass"),
        ("fail", "error_rate&lt;0.01", "0.05", "FAIL"),
    ]
    # Not repeated in the summary table.
    assert "p99&lt;100" not in page.split('id="summary"')[1]
    passed = {"total": 1, "thresholds": {"p99<100": {"ok": True, "value": 1}}}
    page = render_html(RunReport(), passed, title="x", settings={})
    assert "PASS: all 1 thresholds met" in page and "<title>PASS · x</title>" in page
    assert 'id="thresholds"' not in render_html(RunReport(), {"total": 1}, title="x", settings={})


def test_settings_of_every_run_are_shown() -> None:
    runs = [
        {"status": "run", "at": 1_700_000_000_000, "command": "load", "settings": {"rate": 1000, "topics": ["a", "b"]}},
        {"status": "run", "at": 1_700_000_100_000, "command": "send", "settings": {"inputs": "<in>.jsonl"}},
        {"max_retries": 3},  # bare settings, as today's callers have them
    ]  # fmt: skip
    page = render_html(
        RunReport(), {"total": 0}, title="x", settings={"ledgers": ["l.jsonl"]}, runs=runs
    )
    section = page.split('id="runs"')[1].split("</section>")[0]
    assert re.findall(r"<h3>([^<]*)</h3>", section) == [
        "run 1: load, 2023-11-14 22:13:20 UTC", "run 2: send, 2023-11-14 22:15:00 UTC", "run 3"]  # fmt: skip
    assert "<tr><th>rate</th><td>1000</td></tr><tr><th>topics</th><td>a, b</td></tr>" in section
    assert "<td>&lt;in&gt;.jsonl</td>" in section and "<th>max_retries</th><td>3</td>" in section
    assert "<th>ledgers</th><td>l.jsonl</td>" in page.split('id="settings"')[1]
    assert 'id="runs"' not in render_html(RunReport(), {}, title="x", settings={})


def steady(first_ms: int, last_ms: int, *, every_ms: int = 1) -> RunReport:
    """A paced run sending one message every ``every_ms`` from ``first_ms`` to ``last_ms``,
    each answered 1 ms after it went out (the last one at ``last_ms``)."""
    report = RunReport()
    for i, at in enumerate(range(first_ms, last_ms, every_ms)):
        report.add(Result(seq=i, source=SOURCE, id=None, status=OK, http_status=200, attempts=1, latency_ms=1.0,
                          started_at=at, done_at=at + 1, intended_at=at, queue_ms=0.0))  # fmt: skip
    return report


def chart(report: RunReport, key: str) -> dict[str, Any]:
    return next(c for c in chart_specs(report) if c["id"] == key)


def series(spec: dict[str, Any], label: str) -> list[float | None]:
    return next(s["values"] for s in spec["series"] if s["label"] == label)


def test_partial_first_and_last_seconds_are_not_a_collapse() -> None:
    """1,000/s from .300 of a second to 10.52 s later: the first bucket holds 0.7 s of the
    run, the last 0.52 s; per second they are still ~1,000, not 700 and 520."""
    t0 = 1_700_000_000_000
    spec = chart(steady(t0 + 300, t0 + 10_520), "throughput")
    assert spec["partial"] == [[0, 0.7], [10, 0.52]]
    for name in ("intended/s", "sent/s", "ok/s"):
        values = series(spec, name)
        assert len(values) == 11 and all(v is not None and 990 <= v <= 1010 for v in values), (
            name,
            values,
        )
    assert set(series(spec, "failed/s")) == {0}
    # A run ending 2 ms into a second: 2 sends there, over at least MIN_COVERED of a
    # second, so a few milliseconds do not draw a spike.
    spec = chart(steady(t0, t0 + 2_002), "throughput")
    assert spec["partial"] == [[2, 0.002]]
    assert series(spec, "sent/s") == [1000.0, 1000.0, 2 / MIN_COVERED]


def test_error_rate_and_late_sends_per_second() -> None:
    """Three whole seconds, 100 messages each: the second has 25 failures, the third 40
    sends that went out 50 ms late (over LATE_MS)."""
    t0 = 1_700_000_000_000
    report = RunReport()
    for i in range(300):
        at = t0 + i * 10
        second = i // 100
        failed = second == 1 and i % 4 == 0
        late = second == 2 and i % 5 < 2
        report.add(Result(seq=i, source=SOURCE, id=None, status=FAILED if failed else OK, http_status=503 if failed else 200,
                          attempts=1, latency_ms=1.0, error_code="DMS.00503001" if failed else None,
                          started_at=at, done_at=at + 1, intended_at=at - (50 if late else 0),
                          queue_ms=50.0 if late else 0.0))  # fmt: skip
    assert series(chart(report, "errorrate"), "error rate") == [0.0, 25.0, 0.0]
    late = chart(report, "late")
    assert series(late, "late, % of sends") == [0.0, 0.0, 40.0]
    # The last second is partial: the run's last answer came 991 ms into it.
    assert late["partial"] == [[2, 0.991]] and series(late, "late/s")[1:] == [
        0.0,
        round(40 / 0.991, 2),
    ]
    assert all(s["color"] for c in chart_specs(report) for s in c["series"])
    codes = chart(report, "codes")
    assert [s["label"] for s in codes["series"]] == ["DMS.00503001"]
    assert series(chart(report, "statuses"), "503")[1] == 25.0


def test_html_stays_small_for_a_very_long_run() -> None:
    """10,000,000 records at 2,000/s span 5,000 s: the charts keep at most MAX_POINTS
    buckets, so the size depends on the span and the codes, not the record count."""
    report = RunReport()
    t0 = 1_700_000_000_000
    for i in range(100_000):  # one record every 50 ms of a 5,000 s run, with 20 error codes
        at = t0 + i * 50
        ok = i % 10 != 0
        report.add(Result(seq=i, source=SOURCE, id=None, status=OK if ok else FAILED,
                          http_status=200 if ok else 500 + i % 4, attempts=1, latency_ms=1.0 + (i % 300),
                          error_code=None if ok else f"CODE{i // 10 % 20}", error_msg="it failed", started_at=at,
                          done_at=at + 2, intended_at=at, queue_ms=20.0 if i % 7 == 0 else 0.0))  # fmt: skip
    document = render_html(report, {"total": 100_000}, title="long", settings={"rate": 2000})
    assert report.timeseries.width == 8  # 5,000 s in at most 720 points
    assert len(document.encode()) < 1_000_000
    assert document.count("<tr><td>CODE") == 20
    # Late sends coarsen with the buckets: every seventh message, none lost.
    late = chart(report, "late")
    assert sum(report.late.values()) == len(range(0, 100_000, 7))
    assert len(series(late, "late/s")) == len(late["x"]) <= MAX_POINTS


def test_whole_run_latency_and_span_hold_every_ok_answer() -> None:
    """The whole-run histograms come from the buckets (coarsened ones too) plus the ok
    answers that have no time to be bucketed by: each ok latency counted exactly once."""
    from bulksend.timeseries import LatencyBins

    report, corrected, service = RunReport(max_points=4), LatencyBins(), LatencyBins()
    assert report.first_ms is None and report.last_ms is None and report.latency.count == 0
    t0 = 1_700_000_000_000
    for i in range(400):  # 20 s: past max_points, so the buckets merge along the way
        at = t0 + i * 50
        untimed = i % 50 == 0
        queue = float(i % 9)
        latency = 1.0 + i % 37
        report.add(Result(seq=i, source=SOURCE, id=None, status=OK if i % 11 else FAILED, http_status=200,
                          attempts=1, latency_ms=latency, started_at=None if untimed else at + 3,
                          done_at=None if untimed else at + 40, intended_at=None if untimed else at,
                          queue_ms=queue))  # fmt: skip
        if i % 11:
            service.add(latency)
            corrected.add(latency + queue)
    assert report.timeseries.width > 1
    for whole, direct in ((report.latency, corrected), (report.service, service)):
        assert (whole.bins, whole.count, whole.max_ms) == (direct.bins, direct.count, direct.max_ms)
        assert whole.sum_ms == pytest.approx(direct.sum_ms)
    assert report.first_ms == t0 + 50 and report.last_ms == t0 + 399 * 50 + 40


def test_text_from_the_server_cannot_end_a_script() -> None:
    report = RunReport()
    evil = "</script><script>window.pwned=1</script>"
    report.add(Result(seq=0, source=SOURCE, id=None, status=FAILED, http_status=500, attempts=1, latency_ms=None,
                      error_code=evil, error_msg=evil, started_at=1_700_000_000_000,
                      done_at=1_700_000_000_001))  # fmt: skip
    page = render_html(report, {"total": 1}, title="x", settings={})
    assert page.count("<script") == page.count("</script>") == 3
    assert "&lt;/script&gt;" in page  # the error table, escaped


async def test_report_in_headless_chromium(html_report: Path) -> None:
    """The page in a real browser, driven as a person would: it loads with no script error
    and no request but its own; every chart draws; hovering a chart shows each line's value
    there (in every time chart at once); a legend click hides a line; a drag zooms all the
    time charts. A report of nothing opens cleanly too."""
    url = html_report.as_uri()
    async with browser_page() as page:
        await page.open(url)
        assert page.errors == []
        assert page.requests == [url]  # nothing fetched: no script, style, font or image
        assert await page.evaluate("Object.keys(bulksendCharts)") == CHARTS
        # Every chart's canvas has pixels drawn on it (lines, axes, text).
        inked = await page.evaluate(
            "Object.entries(bulksendCharts).map(([id, u]) => { const c = u.ctx.canvas;"
            "const d = u.ctx.getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return [id, n]; })"
        )
        assert all(n > 2000 for _, n in inked), inked

        # Hover over the busiest second: the legend shows the time and each line's value there.
        busiest, at_px, sent = await page.evaluate(
            "(() => { const u = bulksendCharts.throughput;"
            "const s = u.data[u.series.findIndex(s => s.label === 'sent/s')];"
            "const i = s.indexOf(Math.max(...s)); return [i, u.valToPos(u.data[0][i], 'x'), s[i]]; })()"
        )
        x, y, width = await page.center_of("#chart-throughput .u-over")
        # (A point at either end is at the plot's very edge: hover just inside it.)
        await page.mouse("mouseMoved", x - width / 2 + min(max(at_px, 2), width - 2), y)
        legend = await legend_values(page, "throughput")
        assert re.fullmatch(
            r"\+(\d+(\.\d+)? s|\d+:\d\d(:\d\d)?) \(\d\d:\d\d:\d\d UTC\)(, partial: .*)?",
            legend["time"],
        ), legend
        for name in ("intended/s", "sent/s", "ok/s", "failed/s"):
            assert re.fullmatch(r"[\d,]+(\.\d+)?", legend[name]), legend
        # Intl.NumberFormat rounds half away from zero; Python's round() to even (a partial
        # second scaled up can land on .5: 1562.5 shows as 1,563).
        shown = math.floor(sent + 0.5)
        assert sent > 100 and float(legend["sent/s"].replace(",", "")) == shown, (
            busiest,
            legend,
        )
        latency = await legend_values(page, "latency")  # the cursor is synced across time charts
        assert latency["time"] == legend["time"] and re.fullmatch(
            r"[\d.]+ (ms|s)", latency["p99"]
        ), latency

        # Toggle: a click on "ok/s" in the legend hides that line; a second shows it again.
        shown = "bulksendCharts.throughput.series.find(s => s.label === 'ok/s').show"
        toggle = "#chart-throughput .u-legend .u-series:nth-child(4) th"
        await page.mouse("mouseMoved", 1, 1)  # off the chart: its legend shows no value now
        for expected in (False, True):
            lx, ly, _ = await page.center_of(toggle)
            await click(page, lx, ly)
            assert await page.evaluate(shown) is expected

        # Zoom: a drag over the middle of the throughput chart narrows every time chart's x.
        full = await page.evaluate(
            "[bulksendCharts.latency.scales.x.min, bulksendCharts.latency.scales.x.max]"
        )
        x, y, width = await page.center_of("#chart-throughput .u-over")
        await page.mouse("mousePressed", x - width * 0.2, y, button="left", buttons=1, clickCount=1)
        await page.mouse("mouseMoved", x, y, button="left", buttons=1)
        await page.mouse("mouseMoved", x + width * 0.2, y, button="left", buttons=1)
        await page.mouse(
            "mouseReleased", x + width * 0.2, y, button="left", buttons=0, clickCount=1
        )
        zoomed = await page.evaluate("Object.values(bulksendCharts).filter(u => u.root.closest('#chart-histogram')"
                                     " === null).map(u => [u.scales.x.min, u.scales.x.max])")  # fmt: skip
        assert len(zoomed) == len(CHARTS) - 1 and all(z == zoomed[0] for z in zoomed), zoomed
        assert full[0] < zoomed[0][0] < zoomed[0][1] < full[1], (full, zoomed)

        png = await page.screenshot()
        assert png.startswith(b"\x89PNG") and len(png) > 50_000
        assert page.errors == [] and page.requests == [url]

        empty = html_report.with_name("empty.html")
        empty.write_text(render_html(RunReport(), {}, title="nothing", settings={}))
        await page.open(empty.as_uri())
        assert page.errors == []
        assert await page.evaluate("Object.keys(bulksendCharts).length") == 0
        assert (
            await page.evaluate("document.querySelectorAll('.chart .empty').length")
            == len(CHARTS) - 1
        )


async def legend_values(page: Page, chart: str) -> dict[str, str]:
    """Label -> value of each entry of a chart's legend, once the cursor's values show."""
    script = (f"Object.fromEntries([...document.querySelectorAll('#chart-{chart} .u-legend .u-series')]"
              ".map(r => [r.querySelector('.u-label').textContent, r.querySelector('.u-value').textContent]))")  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        values: dict[str, str] = await page.evaluate(script)
        if values.get("time", "–") != "–" or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.05)


async def click(page: Page, x: float, y: float) -> None:
    await page.mouse("mouseMoved", x, y)
    await page.mouse("mousePressed", x, y, button="left", buttons=1, clickCount=1)
    await page.mouse("mouseReleased", x, y, button="left", buttons=0, clickCount=1)
