"""Never lose a record: kill -9 and --resume, SIGINT drains, faults of every kind, per-key
order, adaptive rate. The CLI as a subprocess against ``bulksend serve`` on loopback."""

from __future__ import annotations

import itertools
import json
import random
import signal
import time
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.cli_helpers import (
    accepted,
    bulksend,
    no_traceback,
    read_jsonl,
    spawn_send,
    target,
    wait_for_lines,
    write_jsonl,
)
from tests.serve_helpers import ALL_TIME, messages_path, start_server_subprocess

FAST = ["--backoff-base", "0.01", "--backoff-max", "0.2", "--max-retries", "10", "--quiet"]


def msgs(n: int, keys: int | None = None) -> list[dict[str, Any]]:
    return [
        {
            "topic": "orders",
            "body": f"m{i}",
            "id": f"r{i}",
            **({"keys": f"k{i % keys}"} if keys else {}),
        }
        for i in range(n)
    ]


def listed(url: str, **query: str) -> list[dict[str, Any]]:
    qs = urllib.parse.urlencode({"limit": "1000", **ALL_TIME, **query})
    with urllib.request.urlopen(f"{url}{messages_path()}?{qs}", timeout=10) as resp:
        return list(json.loads(resp.read())["messages"])


def ledger_lines(path: Path) -> tuple[list[dict[str, Any]], bytes]:
    """Whole result lines (run lines left out), and the torn tail (bytes after the last
    newline)."""
    data = path.read_bytes()
    body, _, tail = data.rpartition(b"\n")
    lines = (orjson.loads(line) for line in body.split(b"\n") if line)
    return [obj for obj in lines if obj.get("status") != "run"], tail


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_then_resume_loses_nothing(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    n, concurrency = 3000, 16
    data = write_jsonl(tmp_path / "in.jsonl", msgs(n))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "2") as (_, url):
        kills = 0
        for _ in range(2):  # two crashes at random moments, then a clean finish
            proc = spawn_send(
                str(data),
                *target(url),
                "--out",
                str(out),
                "--concurrency",
                str(concurrency),
                "--key-from-id",
                "--resume",
                *FAST,
            )
            have = out.read_bytes().count(b"\n") if out.exists() else 0
            wait_for_lines(out, have + rng.randint(50, 900), deadline_s=60)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            kills += 1
            lines, tail = ledger_lines(out)
            assert all(isinstance(r, dict) and "status" in r for r in lines)  # whole lines only
            assert len(tail) < 4096  # at most one torn last line
        final = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--concurrency",
            str(concurrency),
            "--key-from-id",
            "--resume",
            "--stats",
            str(tmp_path / "s.json"),
            *FAST,
        )
        assert final.returncode == 0, final.stderr
        total_accepted = accepted(url)
    lines, tail = ledger_lines(out)
    assert tail == b""
    ok = Counter(r["id"] for r in lines if r["status"] == "ok")
    assert (
        set(ok) == {f"r{i}" for i in range(n)} and max(ok.values()) == 1
    )  # every record ok exactly once
    stats = orjson.loads((tmp_path / "s.json").read_bytes())
    assert stats["skipped"] + stats["ok"] == n and stats["failed"] == stats["invalid"] == 0
    # Duplicates at the server: only requests in flight at a crash (<= concurrency each).
    assert n <= total_accepted <= n + kills * concurrency


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"]
)
def test_a_signal_drains_then_resume_completes(tmp_path: Path, sig: signal.Signals) -> None:
    # SIGHUP too: an ssh session dropping under a backfill (no nohup, no tmux) must cost no
    # more than Ctrl-C does, not the requests in flight sent again by the resume.
    n = 2000
    data = write_jsonl(tmp_path / "in.jsonl", msgs(n))
    out, stats = tmp_path / "ledger.jsonl", tmp_path / "stats.json"
    with start_server_subprocess("--latency", "20") as (_, url):
        proc = spawn_send(
            str(data),
            *target(url),
            "--out",
            str(out),
            "--stats",
            str(stats),
            "--rate",
            "400",
            "--concurrency",
            "32",
            "--progress-interval",
            "60",
        )
        wait_for_lines(out, 100, deadline_s=60)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err
        assert "records" in err  # the summary is still printed
        lines, tail = ledger_lines(out)
        assert tail == b"" and 100 <= len(lines) < n
        assert all(r["status"] == "ok" for r in lines)  # in-flight ones finished, none cut off
        first = orjson.loads(stats.read_bytes())
        assert first["ok"] == len(lines)
        again = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--resume",
            "--stats",
            str(stats),
            *FAST,
        )
        assert again.returncode == 0, again.stderr
        assert accepted(url) == n  # a drain sends nothing twice
    lines, _ = ledger_lines(out)
    assert Counter(r["id"] for r in lines) == Counter({f"r{i}": 1 for i in range(n)})
    second = orjson.loads(stats.read_bytes())
    assert second["skipped"] == first["ok"] and second["ok"] == n - first["ok"]


def test_a_hangup_with_stderr_gone_drains_and_nothing_is_sent_twice(tmp_path: Path) -> None:
    # A terminal that hangs up takes stderr with it: every later progress line and the
    # summary fail to write. That must neither end the run (it did: exit 1 at the next
    # progress line) nor spoil the drain the SIGHUP asks for.
    n = 2000
    data = write_jsonl(tmp_path / "in.jsonl", msgs(n))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "20") as (_, url):
        proc = spawn_send(
            str(data), *target(url), "--out", str(out), "--rate", "400",
            "--progress-interval", "0.1",
        )  # fmt: skip
        wait_for_lines(out, 100, deadline_s=60)
        assert proc.stderr is not None
        proc.stderr.close()  # every write to stderr from here on fails (EPIPE)
        wait_for_lines(out, 400, deadline_s=60)  # progress lines went to the closed pipe
        assert proc.poll() is None, "the run ended when stderr went away"
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 130
        lines, tail = ledger_lines(out)
        assert tail == b"" and 400 <= len(lines) < n
        assert all(r["status"] == "ok" for r in lines)
        again = bulksend("send", str(data), *target(url), "--out", str(out), "--resume", *FAST)
        assert again.returncode == 0, again.stderr
        assert accepted(url) == n  # the drain left nothing in flight to send twice


def test_second_sigint_aborts_at_once_with_whole_lines(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(500))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "3000") as (_, url):
        proc = spawn_send(
            str(data), *target(url), "--out", str(out), "--concurrency", "8", "--quiet"
        )
        # All 8 requests wait on the 3 s answers (a fixed sleep raced a slow start-up on a
        # loaded machine: a signal before the handlers are in is Python's KeyboardInterrupt).
        deadline = time.monotonic() + 20
        while accepted(url) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 130
    # Not a timing: a drain would have waited for the 8 answers (due at 3 s) and written
    # their lines; an abort leaves none, and no torn one.
    lines, tail = ledger_lines(out)
    assert tail == b"" and len(lines) == 0


def test_changed_input_is_refused_on_resume_unless_forced(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(10))
    out = tmp_path / "ledger.jsonl"
    first = bulksend("send", str(data), "--embedded", "--out", str(out), "--quiet")
    assert first.returncode == 0
    write_jsonl(data, msgs(12))
    refused = bulksend("send", str(data), "--embedded", "--out", str(out), "--resume", "--quiet")
    assert refused.returncode == 2 and no_traceback(refused)
    assert "changed" in refused.stderr and "--force" in refused.stderr
    forced = bulksend(
        "send", str(data), "--embedded", "--out", str(out), "--resume", "--force", "--quiet"
    )
    assert forced.returncode == 0
    lines = read_jsonl(out)
    assert len(lines) == 12 and Counter(r["id"] for r in lines) == Counter(
        {f"r{i}": 1 for i in range(12)}
    )


def test_resume_ignores_and_cuts_a_torn_last_line(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(20))
    out = tmp_path / "ledger.jsonl"
    assert bulksend("send", str(data), "--embedded", "--out", str(out), "--quiet").returncode == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:10]) + lines[10][:25])  # a crash mid-write of line 11
    again = bulksend("send", str(data), "--embedded", "--out", str(out), "--resume")
    assert again.returncode == 0 and "torn" in again.stderr
    assert sorted(r["seq"] for r in read_jsonl(out)) == list(range(20))


def test_resume_exit_code_covers_the_whole_ledger(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"topic":"t","body":"a"}\n{"topic":"t"}\n')
    out = tmp_path / "ledger.jsonl"
    assert bulksend("send", str(data), "--embedded", "--out", str(out), "--quiet").returncode == 1
    # The invalid record is still not ok: the resumed run cannot claim success.
    assert (
        bulksend(
            "send", str(data), "--embedded", "--out", str(out), "--resume", "--quiet"
        ).returncode
        == 1
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--rate-limit", "300"],  # 429 storms with Retry-After (seconds)
        ["--rate-limit", "300", "--retry-after-date"],  # ... as an HTTP date
        ["--error-rate", "0.3"],  # 5xx bursts
        ["--drop-rate", "0.3"],  # dropped connections
        ["--hang-rate", "0.1"],  # a server that hangs: timeouts
    ],
    ids=["429", "429-date", "503", "drop", "hang"],
)
def test_faults_are_retried_to_success(tmp_path: Path, flags: list[str]) -> None:
    n = 400
    data = write_jsonl(tmp_path / "in.jsonl", msgs(n))
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    with start_server_subprocess(*flags, "--seed", "11") as (_, url):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--stats",
            str(stats),
            "--timeout",
            "0.5",
            "--concurrency",
            "16",
            *FAST,
        )
    assert proc.returncode == 0, proc.stderr
    s = orjson.loads(stats.read_bytes())
    assert s["ok"] == n and s["retries"] > 0
    assert Counter(r["seq"] for r in read_jsonl(out)) == Counter(range(n))


@pytest.mark.parametrize(
    ("flag", "why"), [("--garbage-rate", "not JSON"), ("--no-msgid-rate", "lacks msg_id")]
)
def test_bad_200_answers_are_failed_results(tmp_path: Path, flag: str, why: str) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(200))
    out = tmp_path / "out.jsonl"
    with start_server_subprocess(flag, "0.3", "--seed", "5") as (_, url):
        proc = bulksend("send", str(data), *target(url), "--out", str(out), *FAST)
    assert proc.returncode == 1 and no_traceback(proc)
    results = read_jsonl(out)
    bad = [r for r in results if r["status"] == "failed"]
    assert len(results) == 200 and 20 <= len(bad) <= 100
    assert all(
        r["error_code"] == "BAD_RESPONSE" and why in r["error_msg"] and r["attempts"] == 1
        for r in bad
    )


def test_ordered_keeps_per_key_order_under_random_503s(tmp_path: Path) -> None:
    n, keys = 600, 12
    data = write_jsonl(tmp_path / "in.jsonl", msgs(n, keys=keys))
    out = tmp_path / "out.jsonl"
    with start_server_subprocess("--error-rate", "0.2", "--seed", "9") as (_, url):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--ordered",
            "--concurrency",
            "8",
            *FAST,
        )
        arrived = {
            k: [m["body"] for m in listed(url, topic="orders", key=f"k{k}")] for k in range(keys)
        }
    assert proc.returncode == 0, proc.stderr
    for k in range(keys):  # the server stored each key's messages in input order
        expected = [f"m{i}" for i in range(n) if i % keys == k]
        assert arrived[k] == expected
    # ... and each record of a key started only after the previous one was done.
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in read_jsonl(out):
        by_key[f"k{int(r['id'][1:]) % keys}"].append(r)
    for rows in by_key.values():
        rows.sort(key=lambda r: r["seq"])
        assert all(a["done_at"] <= b["started_at"] for a, b in itertools.pairwise(rows))
    assert any(r["attempts"] > 1 for r in read_jsonl(out))  # the 503s really happened


def test_on_key_failure_skip_fails_the_rest_of_the_key(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(40, keys=4))
    out = tmp_path / "out.jsonl"
    with start_server_subprocess("--error-rate", "1", "--seed", "2") as (_, url):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--ordered",
            "--on-key-failure",
            "skip",
            "--max-retries",
            "0",
            "--quiet",
        )
        sent = accepted(url)
    assert proc.returncode == 1 and sent == 0
    results = read_jsonl(out)
    skipped = [r for r in results if r["error_code"] == "KEY_FAILED"]
    assert len(results) == 40 and len(skipped) == 36  # one real failure per key, the rest skipped
    assert all(
        r["status"] == "failed" and r["attempts"] == 0 and "same key" in r["error_msg"]
        for r in skipped
    )


def test_adaptive_settles_near_the_servers_limit(tmp_path: Path) -> None:
    n = 6000
    data = write_jsonl(tmp_path / "in.jsonl", msgs(n))
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    with start_server_subprocess("--rate-limit", "500", "--seed", "4") as (_, url):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--stats",
            str(stats),
            "--adaptive",
            "--quiet",
            "--max-retries",
            "10",
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    s = orjson.loads(stats.read_bytes())
    assert s["ok"] == n and s["failed"] == 0 and s["rate_changes"] > 0
    done = sorted(r["done_at"] for r in read_jsonl(out))
    half = done[len(done) // 2 :]  # the settled second half of the run
    rate = len(half) / ((half[-1] - half[0]) / 1000)
    assert 400 <= rate <= 550, rate
