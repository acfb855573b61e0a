"""``bulksend load`` end to end, over real loopback sockets against ``bulksend serve`` (a
subprocess) or the built-in server (--embedded): the open model's latency correction under
a stall, the achieved rate, ramps, thresholds and their exit codes, the live series."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from bulksend.cli import main
from bulksend.config import RetryPolicy, Target
from bulksend.load import LoadJob, default_options, run_load
from bulksend.report import read_results
from bulksend.result import OK
from bulksend.stages import Stages
from bulksend.timeseries import Timeseries
from tests.cli_helpers import bulksend, no_traceback, read_jsonl, target
from tests.raw_server import Exchange, RawServer
from tests.serve_helpers import INSTANCE_ID, PROJECT_ID, start_server_subprocess

pytestmark = pytest.mark.timeout(120)


@dataclasses.dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    out: Path
    stats: dict[str, object]
    timeseries: Path


@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """200 msg/s for 5 s against the built-in server, every output on."""
    d = tmp_path_factory.mktemp("steady")
    out, stats, series = d / "out.jsonl", d / "stats.json", d / "series.jsonl"
    proc = bulksend(
        "load", "--embedded", "--rate", "200", "--duration", "5s", "--topic", "a", "--topic", "b",
        "--keys", "10", "--out", str(out), "--stats", str(stats), "--timeseries", str(series),
        "--threshold", "p99<2s", "--progress-interval", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return Run(proc, out, orjson.loads(stats.read_bytes()), series)


def test_achieved_rate_is_within_five_percent_of_the_target(steady: Run) -> None:
    stats = steady.stats
    assert (stats["total"], stats["ok"], stats["failed"]) == (1000, 1000, 0)
    assert stats["intended_rate_msg_s"] == pytest.approx(200, rel=0.001)
    assert stats["send_rate_msg_s"] == pytest.approx(200, rel=0.05)
    assert stats["throughput_msg_s"] == pytest.approx(200, rel=0.05)
    lines = read_jsonl(steady.out)
    started = sorted(r["started_at"] for r in lines)
    assert (len(started) - 1) / ((started[-1] - started[0]) / 1000) == pytest.approx(200, rel=0.05)
    # Every line carries its intended time; message n was meant for n / 200 s after the first.
    by_seq = {r["seq"]: r for r in lines}
    t0 = by_seq[0]["intended_at"]
    assert all(abs(by_seq[n]["intended_at"] - (t0 + n * 5)) <= 2 for n in range(1000))
    assert {r["status"] for r in lines} == {OK} and {r["source"] for r in lines} == {"load"}


def test_progress_summary_and_threshold_lines(steady: Run) -> None:
    err = steady.proc.stderr
    assert "target 200/s" in err and "in-flight" in err and "late" in err and "p99" in err
    assert "── bulksend load" in err and "(from the intended send time)" in err
    assert "service ms" in err
    assert "threshold pass  p99<2s" in err
    assert no_traceback(steady.proc)


def test_live_timeseries_equals_the_one_rebuilt_from_the_ledger(steady: Run) -> None:
    live = [orjson.loads(line) for line in steady.timeseries.read_bytes().splitlines()]
    rebuilt = Timeseries()
    for result in read_results([str(steady.out)]):
        rebuilt.add(result)
    assert live == [row.to_json() for row in rebuilt.rows()]
    assert 5 <= len(live) <= 7  # 5 s of sends starting mid-second, and the last answers
    whole = live[1:-1]
    assert all(line["intended"] == 200 for line in whole[:-1])
    assert sum(line["intended"] for line in live) == 1000 == sum(line["ok"] for line in live)
    assert live[-1]["in_flight"] == 0


async def test_corrected_latency_shows_a_stall_that_service_latency_hides(tmp_path: Path) -> None:
    # Every second the server holds all answers for 0.5 s. With one request in flight the
    # sender can only wait: the messages due meanwhile go out late (coordinated omission).
    # From the actual send, nearly every message looks fast; from the intended time, the
    # quarter of them due in the first half of a stall waited at least 0.25 s.
    with start_server_subprocess("--stall", "1s:0.5s") as (_, url):
        job = LoadJob(
            target=Target(url, PROJECT_ID, INSTANCE_ID),
            stages=Stages.constant(200, 6),
            options=dataclasses.replace(default_options(), concurrency=1),
            out=str(tmp_path / "out.jsonl"),
            progress="off",
        )
        outcome = await run_load(job)
    snap = outcome.stats.snapshot()
    assert snap["ok"] == 1200, snap
    stall_ms = 500
    corrected, service = snap["latency_ms"], snap["service_latency_ms"]
    assert corrected["p99"] >= stall_ms / 2, snap
    assert corrected["p90"] >= stall_ms / 2, snap
    assert service["p99"] < stall_ms / 5, snap
    assert service["p90"] < stall_ms / 10, snap
    assert snap["late"] >= 200, snap  # ~100 a stall went out late; none was dropped
    assert outcome.exit_code == 0


async def test_ramps_follow_the_stages(tmp_path: Path) -> None:
    stages = Stages.parse("0s:50,2s:250,4s:250")
    job = LoadJob(target=None, stages=stages, out=str(tmp_path / "out.jsonl"), progress="off")
    outcome = await run_load(job)
    assert outcome.exit_code == 0 and outcome.stats.base.counts[OK] == stages.total == 800
    lines = read_jsonl(tmp_path / "out.jsonl")
    t0 = min(r["intended_at"] for r in lines)
    for start in (0.0, 1.0, 2.0, 3.0):  # 50 -> 250/s: 100, 200, then 250, 250 a second
        expected = stages.expected(start + 1) - stages.expected(start)
        lo, hi = t0 + start * 1000, t0 + (start + 1) * 1000
        intended = sum(1 for r in lines if lo <= r["intended_at"] < hi)
        sent = sum(1 for r in lines if lo <= r["started_at"] < hi)
        assert intended == pytest.approx(expected, abs=3 + 0.03 * expected), (
            start,
            intended,
            expected,
        )
        assert sent == pytest.approx(expected, abs=5 + 0.1 * expected), (start, sent, expected)


PASSING = ["p99<2s", "p90<=1000ms", "p50<1s", "p99.9<2000", "max<5s", "mean<1000ms",
           "error_rate<0.01", "rate>=50"]  # fmt: skip
FAILING = ["p99<0.001ms", "p90<=0.001ms", "p50<0.000001s", "p99.9<0.001", "max<0.001ms",
           "mean<0.001ms", "rate>=950"]  # fmt: skip


def thresholds(*exprs: str) -> list[str]:
    return [arg for e in exprs for arg in ("--threshold", e)]


def test_every_threshold_form_passes_as_written() -> None:
    proc = bulksend(
        "load", "--embedded", "--rate", "100", "--duration", "1s", "--quiet", *thresholds(*PASSING)
    )
    assert proc.returncode == 0, proc.stderr
    for expr in PASSING:
        assert f"threshold pass  {expr}  (actual" in proc.stderr


def test_every_threshold_form_fails_as_written_with_exit_99() -> None:
    proc = bulksend(
        "load", "--embedded", "--rate", "100", "--duration", "1s", "--quiet", *thresholds(*FAILING)
    )
    assert proc.returncode == 99, proc.stderr
    for expr in FAILING:
        assert f"threshold FAIL  {expr}  (actual" in proc.stderr
    assert no_traceback(proc)


def test_error_rate_threshold_fails_on_errors_and_errors_alone_exit_1() -> None:
    with start_server_subprocess("--error-rate", "0.5", "--seed", "5") as (_, url):
        base = ["load", *target(url), "--rate", "100", "--duration", "1s", "--quiet"]
        failing = bulksend(*base, *thresholds("error_rate<0.01", "p99<2s"))
        some_failed = bulksend(*base, *thresholds("error_rate<0.9"))
    assert failing.returncode == 99, failing.stderr
    assert "threshold FAIL  error_rate<0.01" in failing.stderr
    assert "threshold pass  p99<2s" in failing.stderr
    assert some_failed.returncode == 1, some_failed.stderr
    assert "threshold pass  error_rate<0.9" in some_failed.stderr


def test_abort_on_fail_stops_at_the_first_failing_second(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    began = time.monotonic()
    proc = bulksend("load", "--embedded", "--rate", "100", "--duration", "30s", "--quiet", "--out", str(out),
                    "--abort-on-fail", *thresholds("p99<0.001ms"))  # fmt: skip
    took = time.monotonic() - began
    assert proc.returncode == 99, proc.stderr
    assert "stopped early: a threshold failed" in proc.stderr
    lines = read_jsonl(out)
    assert 100 <= len(lines) <= 600 and took < 15  # judged at the first whole second
    assert len({r["seq"] for r in lines}) == len(lines)  # a drain: whole lines, each once


def test_sigint_drains_and_exits_130(tmp_path: Path) -> None:
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "bulksend", "load", "--embedded", "--rate", "100", "--duration", "60s",
           "--quiet", "--out", str(out), "--stats", str(stats)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 20_000):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = read_jsonl(out)
    assert orjson.loads(stats.read_bytes())["total"] == len(lines) < 6000


def test_sigint_in_a_pause_of_the_stages_ends_without_waiting_for_it(tmp_path: Path) -> None:
    # 1 s at 20/s, then a minute at 0/s: the dispatcher sleeps; nothing is left to drain.
    # Message n is due at n / 20 s, so the first second holds 21 (n = 0 .. 20, the last at
    # 1.0 s); waiting for only 20 raced the 21st against the signal.
    stages = "0s:20,1s:20,1.001s:0,60s:0,60.001s:20,61s:20"
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "bulksend", "load", "--embedded", "--stages", stages, "--quiet",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(read_jsonl(out) if out.exists() else []) < 21:
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert took < 5  # not the 30 s drain timeout, nor the minute's pause
    assert len(read_jsonl(out)) == 21  # nothing from after the pause


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "a schedule is needed"),
        (["--rate", "10"], "a schedule is needed"),
        (["--rate", "10", "--duration", "1s", "--stages", "0s:1,1s:1"], "not both"),
        (["--stages", "0s:100"], "at least two points"),
        (["--stages", "0s:100,10s:50,5s:10"], "increasing time order"),
        (["--rate", "10", "--duration", "soon"], "not a duration"),
        (["--rate", "10", "--duration", "1s", "--threshold", "p98<1ms"], "unknown metric"),
        (["--rate", "10", "--duration", "1s", "--max-in-flight", "0"], "--max-in-flight"),
        (
            ["--rate", "10", "--duration", "1s", "--body-size", "5", "--body-template", "x"],
            "not both",
        ),
        (["--rate", "10", "--duration", "1s", "--body-template", "/nonexistent/t"], "cannot read"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", "--embedded", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("mode", "retries"), [("silent", 0), ("reset", 0), ("reset", 3)])
async def test_a_dead_target_is_a_load_result_not_an_outage_to_wait_out(
    tmp_path: Path, mode: str, retries: int
) -> None:
    # A load measures its target: one that stops answering (or resets every connection)
    # after the run began is what the figures must show, each message failed when due.
    # It was an outage to ride out as a backfill does: 300 s of waiting for a 2 s test,
    # and not one line for the 40 messages scheduled.
    async def handle(exchange: Exchange) -> None:
        if exchange.server.requests and len(exchange.server.requests) > 3:
            if mode == "reset":
                exchange.drop()
            else:
                await asyncio.sleep(3600)  # never answers
            return
        body = orjson.dumps({"msg_id": "M" * 32, "queue_id": 0, "queue_offset": 0})
        await exchange.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body)

    async with RawServer(handle) as server:
        job = LoadJob(
            target=Target(server.url, PROJECT_ID, INSTANCE_ID),
            stages=Stages.constant(20, 2),
            options=dataclasses.replace(
                default_options(),
                timeout=0.5,
                concurrency=64,
                retry=RetryPolicy(max_retries=retries, backoff_base=0.01, backoff_max=0.05),
            ),
            out=str(tmp_path / "out.jsonl"),
            progress="off",
        )
        outcome = await asyncio.wait_for(run_load(job), timeout=60)
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["seq"] for r in lines) == list(range(40))  # every message, one line
    failed = [r for r in lines if r["status"] == "failed"]
    assert len(failed) >= 30 and outcome.exit_code == 1
    assert all(r["error_code"] for r in failed)
    if mode == "silent":
        assert {r["error_code"] for r in failed} == {"TIMEOUT"}
