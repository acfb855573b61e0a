"""``bulksend report``: rebuilding a run's stats from its ledger exactly (send and load),
streaming in bounded memory, and the HTML report opened in a real headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from PIL import Image

from bulksend.html import RunReport, render_html
from bulksend.result import FAILED, OK, Result
from bulksend.synthetic import SOURCE
from tests.cli_helpers import bulksend, no_traceback, target, write_jsonl
from tests.serve_helpers import start_server_subprocess

pytestmark = pytest.mark.timeout(120)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Any fetch over the network would go to a proxy that is not there, and fail loudly.
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
]  # fmt: skip


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
                          done_at=at + 2, intended_at=at, queue_ms=0.0))  # fmt: skip
    document = render_html(report, {"total": 100_000}, title="long", settings={"rate": 2000})
    assert report.timeseries.width == 8  # 5,000 s in at most 720 points
    assert len(document.encode()) < 3_000_000
    assert document.count("<tr><td>CODE") == 20


def chromium() -> str:
    # CI installs it (apt-get install -y chromium); a missing browser is a failure, not a skip.
    assert Path(CHROMIUM).exists() or shutil.which("chromium"), (
        "no chromium: apt-get install -y chromium"
    )
    return CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium"))


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)}
    )


@pytest.fixture
def html_report(send_ledger: Ledger, load_ledger: Ledger, tmp_path: Path) -> Path:
    """``report --html`` of the load and the send ledger together (errors, both kinds)."""
    path = tmp_path / "report.html"
    proc = bulksend("report", str(load_ledger.out), str(send_ledger.out), "--html", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


def test_html_is_self_contained(html_report: Path) -> None:
    text = html_report.read_text()
    # Nothing to fetch: no external script, style, image, font or frame.
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and not re.search(r"url\(\s*['\"]?(https?:)?//", text)
    assert text.count("<svg") == 4
    for section in ("summary", "settings", "chart-throughput", "chart-latency", "chart-histogram", "chart-codes",
                    "errors"):  # fmt: skip
        assert f'id="{section}"' in text
    assert "DMS.00503001" in text and "INVALID_RECORD" in text  # the error table, an example each


def test_html_renders_in_headless_chromium(html_report: Path, tmp_path: Path) -> None:
    # A copy with a collector of script errors and failed loads, written into the page.
    probe = tmp_path / "probe.html"
    collector = (
        "<script>window.__errors=[];"
        "window.addEventListener('error',function(e){window.__errors.push(String(e.message||e.target.src))},true);"
        "window.addEventListener('load',function(){var p=document.createElement('pre');p.id='js-errors';"
        "p.textContent='ERRORS:'+window.__errors.length+':'+window.__errors.join('|');"
        "document.body.appendChild(p)});</script>"
    )  # fmt: skip
    probe.write_text(html_report.read_text().replace("<head>", "<head>" + collector, 1))
    dom = run_chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                       probe.as_uri())  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "ERRORS:0:" in dom.stdout, dom.stdout[-500:]
    charts = re.findall(
        r'<section class="chart" id="(chart-[a-z]+)"><h2>[^<]*</h2>\s*<svg', dom.stdout
    )
    assert charts == ["chart-throughput", "chart-latency", "chart-histogram", "chart-codes"]
    assert dom.stdout.count("<path") > 50  # lines and bars, drawn
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    # The page as a person sees it: a screenshot, kept, that is not blank.
    shot = tmp_path / "report.png"
    proc = run_chromium(
        tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", html_report.as_uri()
    )
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1400, 2400)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, lines and bars, not an empty page
