"""--exactly-once with --workers/--cluster, end to end over loopback: the CLI (driver and
Dask workers in their own processes) against ``bulksend serve --store``, whose ListMessages
counts the copies of each body. The server stores a message before it waits out
``--latency``, so every request in flight when a process dies is stored without an answer:
a run that sent it again would leave two copies, which these tests look for."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.cli_helpers import (
    accepted,
    bulksend,
    kill_driver_group_once,
    no_traceback,
    target,
    write_jsonl,
)
from tests.serve_helpers import start_server_subprocess
from tests.test_distributed import (
    _busy_worker,
    _part_lines,
    _scheduler_and_workers,
    _wait_for_workers,
)
from tests.test_exactly_once import (
    FAST,
    assert_each_stored_once,
    assert_ok_lines_name_the_stored_copy,
    ledger,
    records,
)

pytestmark = pytest.mark.slow


def _serve(tmp_path: Path, *faults: str) -> Any:
    return start_server_subprocess("--store", str(tmp_path / "store.db"), *faults)


def _each_ok_once(out: Path, n: int) -> list[dict[str, Any]]:
    results, intents = ledger(out)
    assert Counter(r["seq"] for r in results if r["status"] == "ok") == Counter(range(n))
    assert {r["status"] for r in results} == {"ok"}
    assert {r["shard"] for r in results} == {0, 1}
    # Merged as a single run leaves them: each intent before its record's result.
    assert {i["identity"] for i in intents} >= {r["identity"] for r in results}
    return results


def test_workers_2_with_lost_answers_store_each_record_once(tmp_path: Path) -> None:
    n = 3000
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out, stats = tmp_path / "ledger.jsonl", tmp_path / "stats.json"
    with _serve(tmp_path, "--lose-answer-rate", "0.05", "--seed", "3") as (_, url):
        proc = bulksend(
            "send", str(data), *target(url), "--workers", "2", "--exactly-once",
            "--out", str(out), "--stats", str(stats), "--concurrency", "16",
            "--timeout", "1", *FAST, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert no_traceback(proc)
        by_body = assert_each_stored_once(url, n)
        results = _each_ok_once(out, n)
        reconciled = assert_ok_lines_name_the_stored_copy(results, by_body, n)
        assert 0.02 * n < reconciled < 0.09 * n  # the lost answers were found, not re-sent
        figures = orjson.loads(stats.read_bytes())
        assert figures["reconciled"] == reconciled and figures["duplicates_at_server"] == 0
        assert figures["reconcile_in_doubt"] >= reconciled
        # The merged ledger reads as a single run's: a later single-process resume finds
        # every record done, and report counts each once.
        again = bulksend(
            "send", str(data), *target(url), "--exactly-once", "--resume",
            "--out", str(out), "--stats", str(stats), *FAST,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert accepted(url) == n
    figures = orjson.loads(stats.read_bytes())
    assert (figures["skipped"], figures["ok"], figures["reconcile_resumed_intents"]) == (n, 0, 0)
    shown = bulksend("report", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    assert orjson.loads(shown.stdout)["ok"] == n


def test_resume_after_the_driver_is_killed_sends_nothing_twice(tmp_path: Path) -> None:
    n, concurrency = 2400, 16
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out, parts, stats = tmp_path / "ledger.jsonl", tmp_path / "ledger.jsonl.parts", tmp_path / "s"
    # Answers after 150 ms: ~2 x 16 requests stored and unanswered when the driver dies.
    with _serve(tmp_path, "--latency", "150") as (_, url):
        args = ["send", str(data), *target(url), "--workers", "2", "--exactly-once"]
        args += ["--out", str(out), "--concurrency", str(concurrency), *FAST]
        kill_driver_group_once(args, lambda: _part_lines(parts) >= n // 3)
        in_flight = accepted(url) - sum(
            1 for p in parts.glob("shard-*") for x in p.read_bytes().splitlines()
            if b'"status":"ok"' in x
        )  # fmt: skip
        assert in_flight > 0  # the kill left stored records without a result
        resumed = bulksend(*args, "--resume", "--stats", str(stats), timeout=180)
        assert resumed.returncode == 0, resumed.stderr
        by_body = assert_each_stored_once(url, n)  # nothing sent twice
        results = _each_ok_once(out, n)
        reconciled = assert_ok_lines_name_the_stored_copy(results, by_body, n)
    figures = orjson.loads(stats.read_bytes())
    # Checked before anything new was sent, and found: the records in flight at the kill.
    assert figures["reconcile_resumed_intents"] >= in_flight
    assert figures["reconcile_resumed_found"] >= in_flight
    assert reconciled >= in_flight and figures["duplicates_at_server"] == 0
    assert figures["ok"] + figures["skipped"] == n
    assert not parts.exists()


async def test_cluster_with_a_worker_killed_stores_each_record_once(tmp_path: Path) -> None:
    n = 2000
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out, stats = tmp_path / "ledger.jsonl", tmp_path / "stats.json"
    with (
        _scheduler_and_workers(tmp_path) as (address, workers),
        _serve(tmp_path, "--latency", "150") as (_, url),
    ):
        await _wait_for_workers(address, 2)
        driver = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "bulksend", "send", str(data), *target(url)],
            *["--cluster", address, "--exactly-once", "--out", str(out), "--stats", str(stats)],
            *["--concurrency", "16", *FAST],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while await asyncio.to_thread(accepted, url) < n // 4:
                assert time.monotonic() < deadline and driver.returncode is None
                await asyncio.sleep(0.05)
            # The lost worker's requests in flight are stored, their answers never read.
            os.killpg(workers[await _busy_worker(address)].pid, signal.SIGKILL)
            _, err = await asyncio.wait_for(driver.communicate(), 150)
        finally:
            if driver.returncode is None:
                driver.kill()
                await driver.wait()
        assert driver.returncode == 0, err.decode()
        assert b"Traceback" not in err
        by_body = await asyncio.to_thread(assert_each_stored_once, url, n)
    results = _each_ok_once(out, n)
    reconciled = assert_ok_lines_name_the_stored_copy(results, by_body, n)
    figures = orjson.loads(stats.read_bytes())
    # The re-run shard checked its lost attempt's intents before it sent anything new.
    assert figures["reconcile_resumed_intents"] >= 1 and reconciled >= 1
    assert figures["duplicates_at_server"] == 0


def test_out_in_an_object_store_is_refused(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", records(3))
    with _serve(tmp_path) as (_, url):
        proc = bulksend(
            "send", str(data), *target(url), "--exactly-once", "--workers", "2",
            "--out", "s3://bucket/ledger.jsonl", "--quiet",
        )  # fmt: skip
        sent = accepted(url)
    assert proc.returncode == 2 and no_traceback(proc)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "--exactly-once" in proc.stderr and "s3://" in proc.stderr
    assert sent == 0
