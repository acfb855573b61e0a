"""Live metrics (``--metrics-addr``): scraped during real runs of ``send`` and ``load``
against the built-in server, read with prometheus_client's own parser; the figures move,
and end equal to ``--stats``. A port in use stops the run before its first send. The
histogram's buckets are checked against the values themselves."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import orjson
import pytest
from hdrh.histogram import HdrHistogram
from prometheus_client.parser import text_string_to_metric_families

from bulksend.errors import ConfigError
from bulksend.metrics import BUCKETS_S, histogram_buckets, parse_addr
from bulksend.stats import Latencies
from tests.cli_helpers import SECRET_ENV, bulksend, read_jsonl, target, write_jsonl
from tests.serve_helpers import start_server_subprocess

pytestmark = pytest.mark.timeout(120)


# --- pure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_addr(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:port", "h:65536", "::1:80", "h:-1"])
def test_parse_addr_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--metrics-addr"):
        parse_addr(text)


def test_histogram_buckets_count_the_values_below_each_bound() -> None:
    rng = random.Random(7)
    values_ms = [rng.lognormvariate(2.0, 1.5) for _ in range(20_000)] + [0.0004, 70_000.0]
    latencies = Latencies()
    for v in values_ms:
        latencies.add_ms(v)
    buckets, sum_s = histogram_buckets(latencies.histogram())
    assert [le for le, _ in buckets] == [f"{b:g}" for b in BUCKETS_S] + ["+Inf"]
    assert buckets[-1][1] == len(values_ms)
    for (_, count), bound in zip(buckets, BUCKETS_S, strict=False):
        # Exact but for values within the HdrHistogram's 3 significant digits of a bound.
        below = sum(v <= bound * 1000 for v in values_ms)
        near = sum(bound * 1000 < v <= bound * 1000 * 1.001 for v in values_ms)
        assert below <= count <= below + near, bound
    assert sum_s == pytest.approx(sum(values_ms) / 1000, rel=1e-3)
    empty, nothing = histogram_buckets(Latencies().histogram())
    assert all(count == 0 for _, count in empty) and nothing == 0


def test_a_scrape_reads_the_counts_not_every_recorded_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hdrh's iterators (its mean walks every recorded value) cost ~150 ms on a day's
    latencies, all of it holding the run's loop: the buckets and the sum come from the
    counts array in one pass, and the sum is the one hdrh's mean gives."""
    rng = random.Random(11)
    latencies = Latencies()
    for _ in range(50_000):
        latencies.add_ms(rng.lognormvariate(1.0, 1.2))
    hist = latencies.histogram()
    expected_s = hist.get_mean_value() * hist.get_total_count() / 1_000_000

    def walked(*args: object) -> None:
        raise AssertionError("a scrape walked the recorded values")

    monkeypatch.setattr(HdrHistogram, "get_recorded_iterator", walked)
    buckets, sum_s = histogram_buckets(hist)
    assert buckets[-1] == ("+Inf", 50_000)
    assert sum_s == pytest.approx(expected_s, rel=1e-12)


# --- scraped during real runs ---------------------------------------------------------------


def _env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in SECRET_ENV and (not k.startswith("BULKSEND_") or k == "BULKSEND_METADATA_URL")
    }


def spawn_with_metrics(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """``bulksend ARGS`` (with ``--metrics-addr``) in the background, and the metrics URL
    it says it serves at."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulksend", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stderr is not None
    return proc, _metrics_url(proc.stderr)


def _metrics_url(stderr: IO[str]) -> str:
    """The address the run says it serves at (its first stderr line, before any send)."""
    line = stderr.readline()
    match = re.fullmatch(r"bulksend: metrics at (http://\S+/metrics)\n", line)
    assert match, line
    return match.group(1)


def scrape(url: str) -> dict[str, float]:
    """Every sample as ``name{label="v"}`` -> value, parsed by prometheus_client."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def _wait(url: str, until: str, at_least: float, deadline_s: float = 60) -> dict[str, float]:
    """Scrapes until ``until`` (a sample, or ``done``: records ok + failed + invalid)
    reaches ``at_least``."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = scrape(url)
        if _value(got, until) >= at_least:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{until} never reached {at_least}: {got}")


def _value(samples: dict[str, float], name: str) -> float:
    if name == "done":
        return sum(samples[f'bulksend_records_total{{status="{s}"}}'] for s in _DONE)
    return samples.get(name, 0)


_DONE = ("ok", "failed", "invalid")


@contextmanager
def _send_from_stdin(url: str, *flags: str) -> Iterator[subprocess.Popen[str]]:
    args = ["send", "-", *target(url), "--metrics-addr", "127.0.0.1:0"]
    args += ["--progress-interval", "60", *flags]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulksend", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _lines(first: int, n: int) -> str:
    return "".join(
        orjson.dumps({"topic": "t", "body": f"m{i}"}).decode() + "\n" for i in range(first, n)
    )


def test_send_metrics_move_during_the_run_and_end_as_stats(tmp_path: Path) -> None:
    """The input is a pipe the test holds open: the run cannot end before the test has
    scraped the figures of every record, then it closes the pipe and compares them with
    what --stats and the ledger say."""
    stats_path, ledger = tmp_path / "stats.json", tmp_path / "out.jsonl"
    first_n, last_n = 150, 230  # the last one invalid
    faults = ("--error-rate", "0.2", "--latency", "40", "--seed", "3")
    outputs = ("--stats", str(stats_path), "--out", str(ledger), "--concurrency", "8")
    retry = ("--backoff-base", "0.01", "--backoff-max", "0.05", "--max-retries", "8")
    with (
        start_server_subprocess(*faults) as (_, url),
        _send_from_stdin(url, *outputs, *retry) as proc,
    ):
        assert proc.stdin is not None and proc.stderr is not None
        metrics = _metrics_url(proc.stderr)
        before = scrape(metrics)
        assert before['bulksend_records_total{status="ok"}'] == 0
        assert before["bulksend_request_duration_seconds_count"] == 0
        proc.stdin.write(_lines(0, first_n))
        proc.stdin.flush()
        # In flight while the server holds each answer 40 ms.
        busy = _wait(metrics, "bulksend_in_flight", 1)
        assert 1 <= busy["bulksend_in_flight"] <= 8
        first = _wait(metrics, "done", first_n)
        proc.stdin.write(_lines(first_n, last_n - 1) + "{not json}\n")
        proc.stdin.flush()
        last = _wait(metrics, "done", last_n)
        proc.stdin.close()
        proc.wait(timeout=60)
        assert proc.returncode == 1, proc.stderr.read()  # the invalid record
    stats = orjson.loads(stats_path.read_bytes())
    results = read_jsonl(ledger)
    # It moved ...
    for name in ("bulksend_request_duration_seconds_count", 'bulksend_requests_total{code="200"}'):
        assert 0 < first[name] < last[name]
    # ... and ended where the ledger and --stats end.
    records = {s: last[f'bulksend_records_total{{status="{s}"}}'] for s in _DONE}
    assert records == {s: sum(r["status"] == s for r in results) for s in _DONE}
    assert records == {s: stats[s] for s in _DONE}
    assert records["invalid"] == 1 and len(results) == last_n
    assert last['bulksend_records_total{status="skipped"}'] == stats["skipped"] == 0
    retries = sum(r["attempts"] - 1 for r in results if r["status"] != "invalid")
    assert last["bulksend_retries_total"] == stats["retries"] == retries > 0
    requests = {k: v for k, v in last.items() if k.startswith("bulksend_requests_total")}
    assert requests['bulksend_requests_total{code="200"}'] == stats["http_status"]["200"]
    assert requests['bulksend_requests_total{code="503"}'] > 0
    assert sum(requests.values()) == stats["ok"] + stats["failed"] + stats["retries"]
    ok_ms = [r["latency_ms"] for r in results if r["status"] == "ok"]
    assert last["bulksend_request_duration_seconds_count"] == len(ok_ms) == stats["ok"]
    assert last["bulksend_request_duration_seconds_sum"] == pytest.approx(
        sum(ok_ms) / 1000, rel=1e-2
    )
    assert last['bulksend_request_duration_seconds_bucket{le="0.025"}'] == 0  # all >= 40 ms
    below_1s = sum(ms <= 1000 for ms in ok_ms)
    assert last['bulksend_request_duration_seconds_bucket{le="1"}'] == pytest.approx(
        below_1s, abs=sum(1000 < ms <= 1001 for ms in ok_ms)
    )
    assert last["bulksend_in_flight"] == 0 and last["bulksend_target_rate"] == 0
    assert "bulksend_late_total" not in last


@pytest.mark.parametrize(
    ("fmt", "first"),
    [
        ("jsonl", '{"topic": "t", "body": "one"}\n'),
        ("jsonl", '{"topic": "t", "body": "one"}\n\n  \n'),  # blank lines after it
        ("csv", "topic,body\nt,one\n"),
    ],
)
def test_a_record_from_a_pipe_goes_out_while_the_pipe_stays_open(fmt: str, first: str) -> None:
    """``tail -f app.log | bulksend send -``: a record is sent once the pipe has handed it
    over, not when enough others have come to fill a batch of the reader's."""
    with start_server_subprocess() as (_, url), _send_from_stdin(url, "--format", fmt) as proc:
        assert proc.stdin is not None and proc.stderr is not None
        metrics = _metrics_url(proc.stderr)
        proc.stdin.write(first)
        proc.stdin.flush()
        sent = _wait(metrics, 'bulksend_records_total{status="ok"}', 1, deadline_s=30)
        assert scrape_accepted(url) == 1 and proc.poll() is None
        proc.stdin.write('{"topic": "t", "body": "two"}\n' if fmt == "jsonl" else "t,two\n")
        proc.stdin.close()
        proc.wait(timeout=60)
        assert proc.returncode == 0
        assert scrape_accepted(url) == 2
    assert sent['bulksend_records_total{status="ok"}'] == 1


def test_load_metrics_have_the_schedule_and_late_sends(tmp_path: Path) -> None:
    with start_server_subprocess("--latency", "30") as (_, url):
        args = ["load", *target(url), "--rate", "200", "--duration", "3s"]
        args += ["--max-in-flight", "2", "--metrics-addr", "127.0.0.1:0"]
        args += ["--progress-interval", "60", "--stats", str(tmp_path / "s.json")]
        proc, metrics = spawn_with_metrics(args)
        try:
            # 2 in flight, 30 ms each: at most ~67/s of 200/s go out, the rest late.
            seen = _wait(metrics, "bulksend_late_total", 20)
            assert seen["bulksend_target_rate"] == 200
            assert seen["bulksend_corrected_duration_seconds_count"] > 0
            assert seen["bulksend_in_flight"] <= 2
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    stats = orjson.loads((tmp_path / "s.json").read_bytes())
    assert stats["late"] >= seen["bulksend_late_total"]


@pytest.mark.parametrize("command", ["send", "load"])
def test_a_metrics_port_in_use_exits_2_before_the_first_send(tmp_path: Path, command: str) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    data = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "m"}])
    out = tmp_path / "out.jsonl"
    args = [str(data)] if command == "send" else ["--rate", "10", "--duration", "1s"]
    try:
        with start_server_subprocess() as (_, url):
            addr = ("--metrics-addr", f"127.0.0.1:{port}")
            proc = bulksend(command, *args, *target(url), "--out", str(out), *addr)
            accepted = scrape_accepted(url)
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"--metrics-addr 127.0.0.1:{port}" in proc.stderr
    assert "in use" in proc.stderr
    assert accepted == 0 and not out.exists()


def scrape_accepted(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return float(re.search(r"^bulksend_serve_messages_accepted_total (\S+)$", text, re.M)[1])  # type: ignore[index]


def test_a_bad_metrics_addr_is_one_line(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "m"}])
    proc = bulksend("send", str(data), "--embedded", "--metrics-addr", "9464")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "want HOST:PORT" in proc.stderr


def test_a_run_without_metrics_addr_serves_nothing(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "m"}])
    proc = bulksend("send", str(data), "--embedded", "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 0 and "metrics at" not in proc.stderr
    assert [r["status"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["ok"]
