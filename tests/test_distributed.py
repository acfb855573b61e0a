"""Scale-out on a real Dask cluster on 127.0.0.1: a LocalCluster started by the driver
(``--workers``), and a ``dask scheduler`` with two ``dask worker`` processes
(``--cluster``), one of them killed with SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulksend.config import RetryPolicy, SendOptions, Target
from bulksend.job import SendJob
from bulksend.scaleout import ClusterSpec, run_distributed
from bulksend.server import StoredMessage
from tests.cli_helpers import bulksend, kill_driver_group_once, read_jsonl, target, write_jsonl
from tests.serve_helpers import (
    INSTANCE_ID,
    PROJECT_ID,
    messages_path,
    start_server_inprocess,
    start_server_subprocess,
)

pytestmark = pytest.mark.slow

#: Dashboards on a free port each: tests may run side by side.
LOCAL2 = ClusterSpec(workers=2, dashboard_address="127.0.0.1:0")


def _records(n: int, keys: int = 0) -> list[dict[str, object]]:
    return [
        {"topic": "t", "body": f"m{i}", **({"keys": f"k{i % keys}"} if keys else {})}
        for i in range(n)
    ]


def _job(url: str, inputs: Path, out: Path, **options: object) -> SendJob:
    return SendJob(
        inputs=(str(inputs),),
        target=Target(url, PROJECT_ID, INSTANCE_ID),
        out=str(out),
        stats=str(out.with_suffix(".stats.json")),
        options=SendOptions(**options),  # type: ignore[arg-type]
        progress="off",
    )


def _seq(message: StoredMessage) -> int:
    return int(message.body[1:])


def _ledger(out: Path) -> list[dict[str, object]]:
    return read_jsonl(out)


def test_workers_2_sends_each_record_once(tmp_path: Path) -> None:
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(6000))
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    with start_server_subprocess() as (_, url):
        proc = bulksend(
            "send", str(inputs), *target(url), "--workers", "2", "--concurrency", "16",
            "--out", str(out), "--stats", str(stats), "--progress-interval", "1",
            timeout=180,
        )  # fmt: skip
        query = f"{url}{messages_path()}?topic=t&limit=10000&start_time=0&end_time={2**53}"
        with urllib.request.urlopen(query, timeout=30) as answer:
            stored = orjson.loads(answer.read())
    assert proc.returncode == 0, proc.stderr
    assert "2 shard(s) on a LocalCluster of 2 worker process(es); dashboard http://127.0.0.1:" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    run_lines = [orjson.loads(x) for x in out.read_bytes().splitlines() if b'"run"' in x[:20]]
    assert [x["settings"]["workers"] for x in run_lines] == [2]  # the driver's one run line
    lines = _ledger(out)
    assert len(lines) == 6000
    assert Counter(x["seq"] for x in lines) == Counter(range(6000))  # each record once
    assert {x["status"] for x in lines} == {"ok"}
    # Plain JSONL: each shard read its own byte span, the first half or the second.
    shard_of = {x["seq"]: x["shard"] for x in lines}
    assert set(shard_of.values()) == {0, 1}
    assert max(s for s, i in shard_of.items() if i == 0) < min(  # type: ignore[type-var]
        s for s, i in shard_of.items() if i == 1
    )
    bodies = [m["body"] for m in stored["messages"]]
    assert stored["total"] == 6000 and len(set(bodies)) == 6000  # no duplicate at the server
    figures = orjson.loads(stats.read_bytes())
    assert (figures["total"], figures["ok"], figures["failed"]) == (6000, 6000, 0)
    assert figures["http_status"] == {"200": 6000}
    assert figures["latency_ms"]["p50"] > 0 and figures["elapsed_s"] > 0
    assert not (tmp_path / "out.jsonl.parts").exists()


async def test_workers_2_share_the_rate(tmp_path: Path) -> None:
    rate, n = 400.0, 2400
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n))
    async with start_server_inprocess() as server:
        job = _job(server.url, inputs, tmp_path / "out.jsonl", concurrency=16, rate=rate)
        outcome = await run_distributed(job, LOCAL2, stderr=io.StringIO())
        stored = await server.store.messages()
    assert outcome.exit_code == 0 and len(stored) == n
    shard_of = {x["seq"]: x["shard"] for x in _ledger(tmp_path / "out.jsonl")}
    # The total over the seconds when both shards were sending (one may start a little
    # after the other, and then ends a little after it too).
    times = {s: sorted(m.store_timestamp for m in stored if shard_of[_seq(m)] == s) for s in (0, 1)}
    start = max(t[0] for t in times.values())
    end = min(t[-1] for t in times.values())
    assert end - start > 4000
    inside = sum(1 for m in stored if start <= m.store_timestamp <= end)
    seen = (inside - 1) / ((end - start) / 1000)
    assert rate * 0.9 <= seen <= rate * 1.1, seen


async def test_workers_2_ordered_keeps_per_key_order_through_503s(tmp_path: Path) -> None:
    n, keys = 1500, 25  # odd: by position, a key's records would alternate between shards
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n, keys))
    out = tmp_path / "out.jsonl"
    retry = RetryPolicy(max_retries=20, backoff_base=0.005, backoff_max=0.05)
    async with start_server_inprocess(error_rate=0.15, seed=11) as server:
        job = _job(server.url, inputs, out, concurrency=8, ordered=True, retry=retry)
        outcome = await run_distributed(job, LOCAL2, stderr=io.StringIO())
        stored = await server.store.messages()
    assert outcome.exit_code == 0
    figures = orjson.loads(out.with_suffix(".stats.json").read_bytes())
    assert figures["ok"] == n and figures["retries"] > 100  # the 503s happened
    per_key: dict[str, list[int]] = {}
    for m in stored:  # in arrival order
        per_key.setdefault(dict(m.properties)["KEYS"], []).append(_seq(m))
    assert len(per_key) == keys
    assert all(seqs == sorted(seqs) and len(seqs) == n // keys for seqs in per_key.values())
    shard_of_key: dict[object, set[object]] = {}
    for x in _ledger(out):
        shard_of_key.setdefault(x["seq"] % keys, set()).add(x["shard"])  # type: ignore[operator]
    assert all(len(s) == 1 for s in shard_of_key.values())
    assert {next(iter(s)) for s in shard_of_key.values()} == {0, 1}  # both shards had keys


# --- a scheduler and two workers, one of them lost -----------------------------------------


def _dask(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``dask ARGS`` in a process group of its own (a worker's nanny and its process)."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "dask"), *args],
            stdout=fh,
            stderr=fh,
            start_new_session=True,
        )


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@contextlib.contextmanager
def _scheduler_and_workers(
    tmp_path: Path,
) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    log, info = tmp_path / "dask.log", tmp_path / "scheduler.json"
    procs = [
        _dask(
            "scheduler", "--host", "127.0.0.1", "--port", "0",
            "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info), log=log,
        )
    ]  # fmt: skip
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_bytes().strip():
            assert time.monotonic() < deadline, log.read_text()
            assert procs[0].poll() is None, log.read_text()
            time.sleep(0.1)
        address = orjson.loads(info.read_bytes())["address"]
        for name in ("w0", "w1"):
            workers[name] = _dask(
                "worker", address, "--name", name, "--nthreads", "1", "--nworkers", "1",
                "--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60", log=log,
            )  # fmt: skip
            procs.append(workers[name])
        yield address, workers
    finally:
        for proc in reversed(procs):
            _end(proc)


async def _wait_for_workers(address: str, n: int) -> None:
    from distributed import Client

    async with Client(address, asynchronous=True, timeout=30) as client:
        await client.wait_for_workers(n, timeout=60)


async def _busy_worker(address: str) -> str:
    """The name of a worker that is running a shard."""
    from distributed import Client

    def _worker_name(dask_worker: object) -> str:  # nested: travels by value to the worker
        return str(dask_worker.name)  # type: ignore[attr-defined]

    async with Client(address, asynchronous=True, timeout=30) as client:
        processing = await client.processing()
        names = await client.run(_worker_name)
    busy = [
        names[a] for a, keys in processing.items() if any("bulksend-shard" in str(k) for k in keys)
    ]
    assert busy, processing
    return str(busy[0])


async def _kill_a_busy_worker_once_stored(
    server: Any,
    run: asyncio.Task[Any],
    address: str,
    workers: dict[str, subprocess.Popen[bytes]],
    stored: int,
) -> None:
    """SIGKILL to the process group of a worker running a shard, once the server holds
    ``stored`` messages."""
    deadline = time.monotonic() + 60
    while server.store.accepted < stored:
        assert time.monotonic() < deadline and not run.done()
        await asyncio.sleep(0.05)
    os.killpg(workers[await _busy_worker(address)].pid, signal.SIGKILL)


async def test_cluster_survives_a_worker_killed_mid_run(tmp_path: Path) -> None:
    n, concurrency = 2000, 16
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n))
    out, err = tmp_path / "out.jsonl", io.StringIO()
    with _scheduler_and_workers(tmp_path) as (address, workers):
        await _wait_for_workers(address, 2)
        async with start_server_inprocess() as server:
            job = _job(server.url, inputs, out, concurrency=concurrency, rate=500.0)
            job = dataclasses.replace(job, progress="lines", progress_interval_s=600.0)
            run = asyncio.create_task(
                run_distributed(job, ClusterSpec(address=address), stderr=err)
            )
            await _kill_a_busy_worker_once_stored(server, run, address, workers, n // 4)
            outcome = await asyncio.wait_for(run, 120)
            stored = await server.store.messages()
    assert outcome.exit_code == 0, err.getvalue()
    lines = _ledger(out)
    assert Counter(x["seq"] for x in lines) == Counter(range(n))  # each record ok once
    assert {x["status"] for x in lines} == {"ok"}
    assert "results came from shards' attempts on a lost worker" in err.getvalue()
    # Sent twice: at most what the lost worker had in flight.
    assert n <= len(stored) <= n + concurrency
    assert len({_seq(m) for m in stored}) == n


async def test_a_shard_lost_for_good_leaves_a_summary_of_what_the_parts_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler that runs no task twice: the shard of a worker killed mid-run is lost,
    the run stops (exit 2) with the parts left for --resume, and its figures are what the
    parts hold, not zero."""
    from bulksend.errors import ClusterError

    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "0")
    n = 2000
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n))
    out, err = tmp_path / "out.jsonl", io.StringIO()
    with _scheduler_and_workers(tmp_path) as (address, workers):
        await _wait_for_workers(address, 2)
        async with start_server_inprocess() as server:
            job = _job(server.url, inputs, out, concurrency=8, rate=500.0)
            run = asyncio.create_task(
                run_distributed(job, ClusterSpec(address=address), stderr=err)
            )
            await _kill_a_busy_worker_once_stored(server, run, address, workers, n // 4)
            with pytest.raises(ClusterError, match="lost its worker"):
                await asyncio.wait_for(run, 120)
    parts = tmp_path / "out.jsonl.parts"
    in_parts = _part_lines(parts)
    figures = orjson.loads(out.with_suffix(".stats.json").read_bytes())
    assert in_parts > 0 and figures["ok"] + figures["failed"] == in_parts


async def test_cluster_workers_read_a_relative_input_where_the_driver_means_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dask worker`` processes started in another directory, holding a file of the same
    name: a relative input still names the driver's file."""
    where_workers_run, where_driver_runs = tmp_path / "workers", tmp_path / "driver"
    where_workers_run.mkdir()
    where_driver_runs.mkdir()
    write_jsonl(
        where_workers_run / "in.jsonl", [{"topic": "t", "body": f"decoy{i}"} for i in range(50)]
    )
    write_jsonl(where_driver_runs / "in.jsonl", _records(200))
    monkeypatch.chdir(where_workers_run)
    with _scheduler_and_workers(tmp_path) as (address, _):
        await _wait_for_workers(address, 2)
        monkeypatch.chdir(where_driver_runs)
        async with start_server_inprocess() as server:
            job = _job(server.url, Path("in.jsonl"), tmp_path / "out.jsonl", concurrency=8)
            outcome = await run_distributed(job, ClusterSpec(address=address), stderr=io.StringIO())
            stored = await server.store.messages()
    assert outcome.exit_code == 0
    assert sorted(_seq(m) for m in stored) == list(range(200))  # m0..m199, no decoy


def _part_lines(parts: Path) -> int:
    """Result lines in the parts (each attempt of a shard begins its part with a run line)."""
    return sum(
        sum(1 for x in p.read_bytes().splitlines(keepends=True) if x.endswith(b"\n"))
        - p.read_bytes().count(b'{"status":"run",')
        for p in parts.glob("shard-*.jsonl")
    )


def test_resume_after_the_driver_is_killed(tmp_path: Path) -> None:
    n, concurrency = 2000, 8
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n))
    out, parts = tmp_path / "out.jsonl", tmp_path / "out.jsonl.parts"
    with start_server_subprocess() as (_, url):
        args = ["send", str(inputs), *target(url), "--workers", "2", "--out", str(out)]
        args += ["--concurrency", str(concurrency), "--quiet"]
        kill_driver_group_once([*args, "--rate", "500"], lambda: _part_lines(parts) >= n // 4)
        left = _part_lines(parts)
        resumed = bulksend(*args, "--resume", "--stats", str(tmp_path / "stats.json"), timeout=180)
        query = f"{url}{messages_path()}?topic=t&limit=10000&start_time=0&end_time={2**53}"
        with urllib.request.urlopen(query, timeout=30) as answer:
            stored = orjson.loads(answer.read())
    assert resumed.returncode == 0, resumed.stderr
    lines = _ledger(out)
    assert Counter(x["seq"] for x in lines) == Counter(range(n))  # each record ok once
    assert {x["status"] for x in lines} == {"ok"}
    figures = orjson.loads((tmp_path / "stats.json").read_bytes())
    assert figures["skipped"] >= left and figures["skipped"] + figures["ok"] == n
    # Sent twice: at most what every worker had in flight when the driver died.
    assert n <= stored["total"] <= n + 2 * concurrency
    assert not parts.exists()


def test_ctrl_c_drains_every_shard_then_merges(tmp_path: Path) -> None:
    n = 3000
    inputs = write_jsonl(tmp_path / "in.jsonl", _records(n))
    out, parts = tmp_path / "out.jsonl", tmp_path / "out.jsonl.parts"
    # 200 ms answers at 300/s: ~60 requests in flight when Ctrl-C comes. The server
    # stores a message before it waits, so a worker that died of the signal would leave
    # stored messages with no ledger line.
    with start_server_subprocess("--latency", "200") as (_, url):
        cmd = [sys.executable, "-m", "bulksend", "send", str(inputs), *target(url)]
        cmd += ["--workers", "2", "--rate", "300", "--out", str(out), "--progress-interval", "1"]
        driver = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a process group, as a terminal's foreground job is
        )
        try:
            deadline = time.monotonic() + 90
            while _part_lines(parts) < 300:
                assert time.monotonic() < deadline and driver.poll() is None
                time.sleep(0.05)
            os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the driver and every worker get it
            _, err = driver.communicate(timeout=90)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(timeout=30)
        query = f"{url}{messages_path()}?topic=t&limit=10000&start_time=0&end_time={2**53}"
        with urllib.request.urlopen(query, timeout=30) as answer:
            stored = orjson.loads(answer.read())["total"]
    stderr = err.decode()
    assert driver.returncode == 130, stderr
    assert "Traceback" not in stderr and "records" in stderr  # the summary
    lines = _ledger(out)
    seqs = Counter(x["seq"] for x in lines)
    assert 300 <= len(seqs) < n and max(seqs.values()) == 1
    assert {x["status"] for x in lines} == {"ok"}
    assert stored == len(lines)  # every request in flight was answered and written
    assert not parts.exists()  # merged


async def test_a_shard_stopped_by_an_auth_failure_stops_the_run(tmp_path: Path) -> None:
    from bulksend.config import Credentials
    from bulksend.errors import AuthenticationFailed

    inputs = write_jsonl(tmp_path / "in.jsonl", _records(400))
    out, failed = tmp_path / "out.jsonl", tmp_path / "failed.jsonl"
    async with start_server_inprocess(ak="AKRIGHT", sk="right-secret") as server:
        job = dataclasses.replace(
            _job(server.url, inputs, out, concurrency=4),
            credentials=Credentials(ak="AKRIGHT", sk="wrong-secret"),
            failed=str(failed),
        )
        with pytest.raises(AuthenticationFailed, match="401"):
            await run_distributed(job, LOCAL2, stderr=io.StringIO())
    lines = _ledger(out)
    assert 20 <= len(lines) < 400 and {x["error_code"] for x in lines} == {"APIGW.0301"}
    assert len(read_jsonl(failed)) == len(lines)  # the failed parts are merged too
    figures = orjson.loads(out.with_suffix(".stats.json").read_bytes())
    assert figures["failed"] == len(lines)
    assert "wrong-secret" not in out.read_text() + failed.read_text()


async def test_embedded_invalid_records_failed_file_and_html_report(tmp_path: Path) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(
        b"".join(
            b"{not json\n" if i % 50 == 7 else orjson.dumps({"topic": "t", "body": f"m{i}"}) + b"\n"
            for i in range(300)
        )
    )
    out, failed, html = tmp_path / "out.jsonl", tmp_path / "failed.jsonl", tmp_path / "r.html"
    # --embedded: the built-in server runs in the driver, the workers send to it.
    job = dataclasses.replace(
        _job("http://unused", inputs, out, concurrency=4),
        target=None,
        failed=str(failed),
        html=str(html),
    )
    outcome = await run_distributed(job, LOCAL2, stderr=io.StringIO())
    assert outcome.exit_code == 1
    lines = _ledger(out)
    assert Counter(x["status"] for x in lines) == {"ok": 294, "invalid": 6}
    assert sorted(x["_source"] for x in read_jsonl(failed)) == sorted(
        f"{inputs}:{i + 1}" for i in range(7, 300, 50)
    )
    page = html.read_text()
    assert "bulksend send</title>" in page and "294" in page


def test_load_workers_2_keeps_the_schedule_and_merges_the_figures(tmp_path: Path) -> None:
    out, stats, series = tmp_path / "l.jsonl", tmp_path / "l.stats.json", tmp_path / "l.ts.jsonl"
    with start_server_subprocess() as (_, url):
        proc = bulksend(
            "load", *target(url), "--workers", "2", "--rate", "500", "--duration", "6s",
            "--out", str(out), "--stats", str(stats), "--timeseries", str(series),
            "--threshold", "p99<5000", "--progress-interval", "1",
            timeout=180,
        )  # fmt: skip
        query = (
            f"{url}{messages_path()}?topic=bulksend-load&limit=10000&start_time=0&end_time={2**53}"
        )
        with urllib.request.urlopen(query, timeout=30) as answer:
            stored = orjson.loads(answer.read())
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "threshold pass  p99<5000" in proc.stderr
    lines = _ledger(out)
    # The schedule's 3,000 messages, each once, message i from shard i % 2.
    assert Counter(x["seq"] for x in lines) == Counter(range(3000))
    assert all(x["shard"] == x["seq"] % 2 for x in lines)  # type: ignore[operator]
    assert stored["total"] == 3000
    figures = orjson.loads(stats.read_bytes())
    assert (figures["total"], figures["ok"]) == (3000, 3000)
    # Percentiles of one histogram of both shards' latencies, corrected and service.
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]
    assert 0 < figures["service_latency_ms"]["p50"] <= figures["service_latency_ms"]["p99"]
    assert 450 <= figures["intended_rate_msg_s"] <= 550  # one schedule, not two
    assert figures["thresholds"]["p99<5000"]["ok"] is True
    rows = read_jsonl(series)
    assert sum(int(r["sent"]) for r in rows) == 3000  # type: ignore[call-overload]


def test_a_distributed_load_behind_schedule_names_the_shards_cause(tmp_path: Path) -> None:
    # 40 ms answers, 2 in flight a shard: at most 100 msg/s of the 200 scheduled. The cause
    # comes from the shards' paces (the driver sends nothing: its own pace said "held up").
    with start_server_subprocess("--latency", "40") as (_, url):
        proc = bulksend(
            "load", *target(url), "--workers", "2", "--rate", "200", "--duration", "2s",
            "--max-in-flight", "2", "--progress-interval", "1",
            timeout=180,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("behind schedule")]
    assert "the target answered too slowly" in line and "--max-in-flight 2" in line, line


def test_load_workers_2_abort_on_fail_drains_every_shard(tmp_path: Path) -> None:
    # No answer is that fast: the first whole second fails the threshold, and the driver,
    # judging the seconds from the shards' parts as they grow, drains both shards.
    stats, series = tmp_path / "l.stats.json", tmp_path / "l.ts.jsonl"
    proc = bulksend(
        "load", "--embedded", "--workers", "2", "--rate", "300", "--duration", "30s",
        "--threshold", "p99<0.001", "--abort-on-fail", "--stats", str(stats),
        "--timeseries", str(series), "--progress-interval", "1",
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 99, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stopped early: a threshold failed in the second starting" in proc.stderr
    figures = orjson.loads(stats.read_bytes())
    assert 0 < figures["total"] < 9000 / 2  # stopped long before the schedule's end
    verdict = figures["thresholds"]["p99<0.001"]
    assert verdict["ok"] is False and verdict["failed_at"] > 0
    rows = read_jsonl(series)
    assert rows and sum(int(r["sent"]) for r in rows) == figures["total"]  # type: ignore[call-overload]
