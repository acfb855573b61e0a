"""``--metrics-addr`` with ``--workers``/``--cluster``: the driver serves the whole run's
figures, the sum of what its shards post through Dask. Scraped during real runs on a
LocalCluster and on a scheduler with two workers (one killed with SIGKILL mid-run), read
with prometheus_client's own parser; the figures grow, no counter ever goes back, and at
the end they equal the merged ledger.

The last scrape is taken in the driver's epilogue (the summary's last lines, written once
the parts are merged and every output is written): the driver answers /metrics until
then, and the test scrapes it from there, in-process, over the socket."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgpack
import orjson
import pytest
from hdrh.histogram import HdrHistogram

from bulksend import scaleout
from bulksend.config import RetryPolicy
from bulksend.metrics import Buckets, Figures, ShardedFigures, post_of
from bulksend.run import End
from bulksend.scaleout import ClusterSpec, run_distributed
from bulksend.stats import new_histogram
from tests.cli_helpers import bulksend, read_jsonl, target, write_jsonl
from tests.serve_helpers import start_server_inprocess, start_server_subprocess
from tests.test_distributed import (
    LOCAL2,
    _busy_worker,
    _job,
    _records,
    _scheduler_and_workers,
    _wait_for_workers,
)
from tests.test_metrics import _wait, scrape, spawn_with_metrics

pytestmark = pytest.mark.timeout(180)

_DONE = ("ok", "failed", "invalid")


# --- the driver's sum, pure -----------------------------------------------------------------


def _hist(values_us: list[int]) -> HdrHistogram:
    hist = new_histogram()
    for v in values_us:
        hist.record_value(v)
    return hist


def _post(
    attempt: str,
    ok: int,
    failed: int,
    requests: dict[str, int],
    retries: int,
    latencies_us: list[int],
    in_flight: int = 0,
) -> dict[str, Any]:
    figures = Figures(
        records={"ok": ok, "failed": failed, "invalid": 0, "skipped": 0},
        requests=requests,
        retries=retries,
        in_flight=in_flight,
        target_rate=50.0,
        latency=_hist(latencies_us),
    )
    # Through msgpack, as Dask's event log carries it.
    return dict(msgpack.unpackb(msgpack.packb(post_of(figures, attempt))))


def test_the_shards_figures_add_up_and_a_rerun_takes_no_counter_back() -> None:
    sums = ShardedFigures()
    start = sums.figures()
    assert start.records == {} and start.latency == Buckets.empty() and start.late is None
    # Shard 0's first attempt, then shard 1.
    sums.add(0, _post("a", 10, 1, {"200": 10, "503": 4}, 3, [40_000] * 10, in_flight=5))
    sums.add(1, _post("x", 7, 0, {"200": 7}, 0, [2_000] * 7, in_flight=3))
    first = sums.figures()
    assert first.records == {"ok": 17, "failed": 1, "invalid": 0, "skipped": 0}
    assert first.requests == {"200": 17, "503": 4} and first.retries == 3
    assert first.in_flight == 8 and first.target_rate == 100.0
    # Shard 0 is run again: its new attempt read 9 of its 10 ok results from its part
    # (one was counted but not written when the worker died) and has made 2 requests.
    sums.add(0, _post("b", 9, 1, {"200": 2}, 3, [40_000] * 9, in_flight=1))
    second = sums.figures()
    assert second.records["ok"] == 17  # not 16: the most shard 0 ever said
    assert second.requests == {"200": 19, "503": 4}  # both attempts' own requests
    assert second.in_flight == 4  # gauges: each shard's latest
    assert isinstance(second.latency, Buckets) and second.latency.cumulative[-1] == 17
    # The new attempt goes past the old one: the shard's figures are its own again.
    sums.add(0, _post("b", 14, 1, {"200": 7, "429": 1}, 4, [40_000] * 14))
    last = sums.figures()
    assert last.records == {"ok": 21, "failed": 1, "invalid": 0, "skipped": 0}
    assert last.requests == {"200": 24, "503": 4, "429": 1} and last.retries == 4
    # The histogram is the one of every value of both shards: buckets add up exactly.
    assert isinstance(last.latency, Buckets)
    _same(last.latency, Buckets.of(_hist([40_000] * 14 + [2_000] * 7)))
    for before, after in ((first, second), (second, last)):
        for status in _DONE:
            assert after.records[status] >= before.records[status]


def test_buckets_of_two_histograms_add_up_to_the_buckets_of_both() -> None:
    one = [1_500, 3_000, 49_999, 50_000, 50_020, 700_000]
    two = [800, 24_000, 61_000_000]
    both = _hist(one)
    both.add(_hist(two))
    _same(Buckets.of(_hist(one)) + Buckets.of(_hist(two)), Buckets.of(both))


def _same(a: Buckets, b: Buckets) -> None:
    assert a.cumulative == b.cumulative and a.sum_s == pytest.approx(b.sum_s, rel=1e-12)


def test_a_load_driver_shows_the_schedules_rate_and_the_late_sends() -> None:
    sums = ShardedFigures(load=True)
    assert sums.figures().late == 0 and sums.figures().corrected == Buckets.empty()
    sums.target_rate = lambda: 400.0
    figures = dataclasses.replace(
        Figures({"ok": 3}, {"200": 3}, 0, 0, 200.0, late=2, latency=_hist([9_000] * 3)),
        corrected=_hist([9_000, 30_000, 31_000]),
    )
    sums.add(0, post_of(figures, "a"))
    sums.add(1, post_of(dataclasses.replace(figures, late=5), "b"))
    seen = sums.figures()
    assert seen.target_rate == 400.0 and seen.late == 7
    assert isinstance(seen.corrected, Buckets) and seen.corrected.cumulative[-1] == 6


# --- scraped during real runs ----------------------------------------------------------------


class _Scraper:
    """Scrapes ``url`` every 50 ms in a thread until stopped, keeping every answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.seen.append(scrape(self.url))
            except OSError:
                return  # the driver has closed /metrics

    def stop(self) -> list[dict[str, float]]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.seen


async def _metrics_url(err: io.StringIO, run: asyncio.Task[Any]) -> str:
    """The address the driver says it serves at (before the cluster starts)."""
    deadline = time.monotonic() + 60
    while not (found := re.search(r"bulksend: metrics at (http://\S+/metrics)\n", err.getvalue())):
        assert time.monotonic() < deadline and not run.done(), err.getvalue()
        await asyncio.sleep(0.02)
    return found.group(1)


class _LastScrape:
    """Scrapes the driver's /metrics (``url``, once known) from its epilogue: after the
    parts are merged and every output is written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.url = ""
        self.taken: list[dict[str, float]] = []
        epilogue = scaleout._SendHooks.epilogue

        async def scraping(
            hooks: scaleout._SendHooks, snapshot: dict[str, Any], end: End
        ) -> list[str]:
            if self.url:  # else the test fails on its own: the driver gave no address
                self.taken.append(await anyio.to_thread.run_sync(scrape, self.url))
            return await epilogue(hooks, snapshot, end)

        monkeypatch.setattr(scaleout._SendHooks, "epilogue", scraping)


def _counters(samples: dict[str, float]) -> dict[str, float]:
    """The samples that may only grow: every counter and histogram series."""
    histograms = ("bulksend_request_duration_seconds", "bulksend_corrected_duration_seconds")
    return {
        k: v
        for k, v in samples.items()
        if k.split("{")[0].endswith("_total") or k.startswith(histograms)
    }


def _never_back(scrapes: list[dict[str, float]]) -> None:
    for before, after in itertools.pairwise(scrapes):
        a, b = _counters(before), _counters(after)
        went_back = {k: (v, b.get(k, 0)) for k, v in a.items() if b.get(k, 0) < v}
        assert not went_back, went_back


def _check_end(last: dict[str, float], lines: list[dict[str, Any]]) -> None:
    """The last scrape against the merged ledger."""
    records = {s: last[f'bulksend_records_total{{status="{s}"}}'] for s in _DONE}
    assert records == {s: sum(x["status"] == s for x in lines) for s in _DONE}
    retries = sum(x["attempts"] - 1 for x in lines if x["status"] != "invalid")
    assert last["bulksend_retries_total"] == retries
    ok_ms = [x["latency_ms"] for x in lines if x["status"] == "ok"]
    assert last["bulksend_request_duration_seconds_count"] == len(ok_ms)
    assert last["bulksend_request_duration_seconds_sum"] == pytest.approx(
        sum(ok_ms) / 1000, rel=1e-2
    )
    assert last["bulksend_in_flight"] == 0


@pytest.mark.slow
async def test_send_workers_2_metrics_grow_and_end_as_the_merged_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 1200
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n))
    out, err = tmp_path / "out.jsonl", io.StringIO()
    retry = RetryPolicy(max_retries=8, backoff_base=0.01, backoff_max=0.05)
    faults = ("--error-rate", "0.2", "--latency", "40", "--seed", "3")
    last = _LastScrape(monkeypatch)
    with start_server_subprocess(*faults) as (_, url):
        job = _job(url, inputs, out, concurrency=8, retry=retry)
        job = dataclasses.replace(
            job, metrics_addr="127.0.0.1:0", progress="lines", progress_interval_s=600.0
        )
        run = asyncio.create_task(run_distributed(job, LOCAL2, stderr=err))
        last.url = await _metrics_url(err, run)
        scraper = _Scraper(last.url)
        outcome = await asyncio.wait_for(run, 150)
        scrapes = scraper.stop()
    assert outcome.exit_code == 0, err.getvalue()
    assert "Traceback" not in err.getvalue()
    lines = read_jsonl(out)
    assert len(lines) == n and Counter(x["shard"] for x in lines).keys() == {0, 1}
    # They grew during the run ...
    ok = [s['bulksend_records_total{status="ok"}'] for s in scrapes]
    assert ok[0] == 0 and any(0 < v < n for v in ok), ok
    assert max(s["bulksend_in_flight"] for s in scrapes) >= 1
    assert max(s["bulksend_in_flight"] for s in scrapes) <= 16  # 8 a shard
    _never_back([*scrapes, *last.taken])
    # ... and ended as the merged ledger and --stats say.
    assert len(last.taken) == 1
    end = last.taken[0]
    _check_end(end, lines)
    stats = orjson.loads(out.with_suffix(".stats.json").read_bytes())
    requests = {k: v for k, v in end.items() if k.startswith("bulksend_requests_total")}
    assert requests['bulksend_requests_total{code="200"}'] == stats["ok"] == n
    assert requests['bulksend_requests_total{code="503"}'] > 0
    assert sum(requests.values()) == stats["ok"] + stats["failed"] + stats["retries"]
    assert end["bulksend_retries_total"] == stats["retries"] > 0
    assert end['bulksend_records_total{status="skipped"}'] == 0


@pytest.mark.slow
def test_load_workers_2_serves_the_total_rate_and_late_sends(tmp_path: Path) -> None:
    stats_path = tmp_path / "s.json"
    with start_server_subprocess("--latency", "30") as (_, url):
        # 4 in flight a shard, 30 ms each: at most ~270/s of 400/s go out, the rest late.
        args = ["load", *target(url), "--workers", "2", "--rate", "400", "--duration", "3s"]
        args += ["--max-in-flight", "4", "--metrics-addr", "127.0.0.1:0"]
        args += ["--progress-interval", "60", "--stats", str(stats_path)]
        proc, metrics = spawn_with_metrics(args)
        try:
            seen = _wait(metrics, "bulksend_late_total", 20)
            # The whole schedule's rate, not a shard's 200/s.
            assert seen["bulksend_target_rate"] == 400
            assert seen["bulksend_corrected_duration_seconds_count"] > 0
            assert seen["bulksend_in_flight"] <= 8
            _, rest = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, rest
    stats = orjson.loads(stats_path.read_bytes())
    assert stats["late"] >= seen["bulksend_late_total"] > 0
    assert stats["total"] >= seen['bulksend_records_total{status="ok"}']


@pytest.mark.slow
async def test_a_shard_run_again_after_its_worker_is_killed_takes_no_counter_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, concurrency = 2000, 16
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n))
    out, err = tmp_path / "out.jsonl", io.StringIO()
    retry = RetryPolicy(max_retries=20, backoff_base=0.005, backoff_max=0.05)
    last = _LastScrape(monkeypatch)
    with _scheduler_and_workers(tmp_path) as (address, workers):
        await _wait_for_workers(address, 2)
        async with start_server_inprocess(error_rate=0.1, seed=5) as server:
            job = _job(server.url, inputs, out, concurrency=concurrency, rate=500.0, retry=retry)
            job = dataclasses.replace(
                job, metrics_addr="127.0.0.1:0", progress="lines", progress_interval_s=600.0
            )
            run = asyncio.create_task(
                run_distributed(job, ClusterSpec(address=address), stderr=err)
            )
            last.url = await _metrics_url(err, run)
            scraper = _Scraper(last.url)
            # Killed once the driver has shown a quarter of the records: the lost shard
            # had posted figures the new attempt starts below (its requests from 0).
            deadline = time.monotonic() + 60
            while not scraper.seen or scraper.seen[-1]['bulksend_records_total{status="ok"}'] < (
                n // 4
            ):
                assert time.monotonic() < deadline and not run.done(), err.getvalue()
                await asyncio.sleep(0.05)
            killed_at = len(scraper.seen)
            victim = await _busy_worker(address)
            os.killpg(workers[victim].pid, signal.SIGKILL)
            outcome = await asyncio.wait_for(run, 120)
            scrapes = scraper.stop()
    assert outcome.exit_code == 0, err.getvalue()
    assert "results came from shards' attempts on a lost worker" in err.getvalue()
    lines = read_jsonl(out)
    assert Counter(x["seq"] for x in lines) == Counter(range(n))
    assert len(scrapes) - killed_at > 10  # scraped all along the re-run
    _never_back([*scrapes, *last.taken])
    _check_end(last.taken[0], lines)
    requests = sum(v for k, v in last.taken[0].items() if k.startswith("bulksend_requests_total"))
    # Both attempts' requests: at least every record's attempts in the merged ledger, less
    # those the lost worker made after its last post (at most a second's, at 250/s).
    assert requests >= sum(x["attempts"] for x in lines) - 500


@pytest.mark.parametrize("command", ["send", "load"])
def test_a_metrics_port_in_use_stops_a_workers_run_before_its_cluster(
    tmp_path: Path, command: str
) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    data = write_jsonl(tmp_path / "in.jsonl", _records(3))
    out = tmp_path / "out.jsonl"
    args = [str(data)] if command == "send" else ["--rate", "10", "--duration", "1s"]
    try:
        proc = bulksend(
            command, *args, "--embedded", "--workers", "2", "--out", str(out),
            "--metrics-addr", f"127.0.0.1:{port}",
        )  # fmt: skip
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"--metrics-addr 127.0.0.1:{port}" in proc.stderr
    assert "in use" in proc.stderr and not out.exists()
