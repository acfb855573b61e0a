"""--exactly-once end to end: the CLI as a subprocess against ``bulksend serve`` on loopback,
with answers lost after the store (dropped, or held past --timeout), kill -9 mid-run and
--resume, per-key order under 503s, and an endpoint without ListMessages."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import sys
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
    spawn_send,
    target,
    wait_for_lines,
    write_jsonl,
)
from tests.reconcile_proxy import Misbehaviour, misbehaving_proxy
from tests.serve_helpers import ALL_TIME, messages_path, start_server_subprocess

TOPIC = "orders"
#: Fast retries; the built-in server lists a message as soon as it is stored, so the
#: checks need not wait 3 s for an index.
FAST = [
    "--backoff-base",
    "0.01",
    "--backoff-max",
    "0.2",
    "--max-retries",
    "10",
    "--reconcile-after",
    "0.2",
    "--quiet",
]


def records(n: int, keys: int | None = None) -> list[dict[str, Any]]:
    return [
        {
            "topic": TOPIC,
            "body": f"m{i}",
            "id": f"r{i}",
            **({"keys": f"k{i % keys}"} if keys else {}),
        }
        for i in range(n)
    ]


def stored(url: str, **query: str) -> list[dict[str, Any]]:
    """Every message the server lists for ``query`` in TOPIC (all pages, oldest first)."""
    out: list[dict[str, Any]] = []
    for _ in range(1000):  # bounded: 10 million messages
        params = {"topic": TOPIC, **ALL_TIME, "limit": "10000", "offset": str(len(out)), **query}
        qs = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{url}{messages_path()}?{qs}", timeout=30) as resp:
            page = json.loads(resp.read())
        out.extend(page["messages"])
        if not page["messages"] or len(out) >= page["total"]:
            return out
    raise AssertionError("ListMessages never ended")


def ledger(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ledger's result lines and its intent lines (run lines left out); whole lines only."""
    data = path.read_bytes()
    body, _, _ = data.rpartition(b"\n")
    lines = [orjson.loads(line) for line in body.split(b"\n") if line]
    results = [obj for obj in lines if obj["status"] not in ("run", "intent")]
    return results, [obj for obj in lines if obj["status"] == "intent"]


def assert_each_stored_once(url: str, n: int) -> dict[str, dict[str, Any]]:
    """Each record m0..m{n-1} stored exactly once: body -> the stored message."""
    messages = stored(url)
    bodies = Counter(m["body"] for m in messages)
    assert set(bodies) == {f"m{i}" for i in range(n)}
    duplicates = {b: c for b, c in bodies.items() if c > 1}
    assert not duplicates, f"{len(duplicates)} records stored more than once"
    assert accepted(url) == n
    return {m["body"]: m for m in messages}


def assert_ok_lines_name_the_stored_copy(
    results: list[dict[str, Any]], by_body: dict[str, dict[str, Any]], n: int
) -> int:
    """Each record ok exactly once, with the stored message's msg_id; the reconciled count."""
    ok = [r for r in results if r["status"] == "ok"]
    assert Counter(Counter(r["id"] for r in ok).values()) == Counter({1: n})
    for r in ok:
        assert r["msg_id"] == by_body["m" + r["id"][1:]]["msg_id"], r
    return sum(r.get("reconciled") is True for r in ok)


@pytest.mark.parametrize(
    "lost", [["--seed", "6"], ["--lose-answer-hang", "2", "--seed", "7"]], ids=["dropped", "held"]
)
def test_lost_answers_end_with_each_record_stored_once(tmp_path: Path, lost: list[str]) -> None:
    n = 6000
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out, stats = tmp_path / "ledger.jsonl", tmp_path / "stats.json"
    with start_server_subprocess("--lose-answer-rate", "0.06", *lost) as (_, url):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--stats",
            str(stats),
            "--exactly-once",
            "--concurrency",
            "32",
            "--timeout",
            "1",
            *FAST,
        )
        assert proc.returncode == 0, proc.stderr
        by_body = assert_each_stored_once(url, n)
    results, intents = ledger(out)
    reconciled = assert_ok_lines_name_the_stored_copy(results, by_body, n)
    # Roughly 6 % of the answers were lost, and each such record was found, not re-sent.
    assert 0.03 * n < reconciled < 0.09 * n
    assert Counter(i["identity"] for i in intents) == Counter(r["identity"] for r in results)
    figures = orjson.loads(stats.read_bytes())
    assert figures["reconciled"] == reconciled and figures["duplicates_at_server"] == 0
    # The key bulksend adds is in KEYS of the stored message, and the intent names it.
    key_of = {i["identity"]: i["key"] for i in intents}
    for r in results[:50]:
        props = by_body["m" + r["id"][1:]]["property_list"]
        assert {"name": "KEYS", "value": key_of[r["identity"]]} in props


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_twice_with_lost_answers_then_resume(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    n = 3000
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out, stats = tmp_path / "ledger.jsonl", tmp_path / "stats.json"
    flags = [str(data), "--out", str(out), "--exactly-once", "--resume", "--timeout", "1"]
    server = ("--latency", "2", "--lose-answer-rate", "0.06", "--seed", str(seed))
    with start_server_subprocess(*server) as (_, url):
        for _ in range(2):  # two crashes at random moments
            proc = spawn_send(*flags, *target(url), "--concurrency", "16", *FAST)
            have = out.read_bytes().count(b"\n") if out.exists() else 0
            wait_for_lines(out, have + rng.randint(100, 1800), deadline_s=60)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        results, intents = ledger(out)
        done = {r["identity"] for r in results}
        in_doubt = {i["identity"] for i in intents} - done
        assert in_doubt  # the crashes left records in flight
        final = bulksend(
            *["send", *flags, *target(url), "--concurrency", "16", "--stats", str(stats), *FAST]
        )
        assert final.returncode == 0, final.stderr
        by_body = assert_each_stored_once(url, n)
    results, _ = ledger(out)
    assert_ok_lines_name_the_stored_copy(results, by_body, n)
    figures = orjson.loads(stats.read_bytes())
    # The last run checked what the second crash left in flight before sending anything.
    assert figures["reconcile_resumed_intents"] >= 1
    assert figures["duplicates_at_server"] == 0
    assert figures["ok"] + figures["skipped"] == n


def test_ordered_under_503s_and_lost_answers_keeps_each_key_once_and_in_order(
    tmp_path: Path,
) -> None:
    n, keys = 600, 12
    data = write_jsonl(tmp_path / "in.jsonl", records(n, keys=keys))
    out = tmp_path / "ledger.jsonl"
    faults = ("--error-rate", "0.1", "--lose-answer-rate", "0.06", "--seed", "9")
    with start_server_subprocess(*faults) as (_, url):
        proc = bulksend(
            *["send", str(data), *target(url), "--out", str(out), "--exactly-once"],
            *["--ordered", "--concurrency", "8", "--timeout", "1", *FAST],
        )
        assert proc.returncode == 0, proc.stderr
        by_body = assert_each_stored_once(url, n)
        arrived = {k: [m["body"] for m in stored(url, key=f"k{k}")] for k in range(keys)}
    for k in range(keys):  # the server stored each key's messages once, in input order
        assert arrived[k] == [f"m{i}" for i in range(n) if i % keys == k]
    results, _ = ledger(out)
    reconciled = assert_ok_lines_name_the_stored_copy(results, by_body, n)
    assert reconciled > 0 and any(r["attempts"] > 1 for r in results)  # both faults happened
    # Each record of a key started only once its predecessor was known stored.
    by_key: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_key[int(r["id"][1:]) % keys].append(r)
    for rows in by_key.values():
        rows.sort(key=lambda r: r["seq"])
        assert all(a["done_at"] <= b["started_at"] for a, b in itertools.pairwise(rows))


@pytest.mark.parametrize("flags", [["--rate", "2000"], ["--adaptive", "--rate", "3000"]])
def test_with_rate_and_adaptive(tmp_path: Path, flags: list[str]) -> None:
    n = 1500
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--lose-answer-rate", "0.06", "--seed", "4") as (_, url):
        proc = bulksend(
            *["send", str(data), *target(url), "--out", str(out), "--exactly-once"],
            *["--concurrency", "16", "--timeout", "1", *flags, *FAST],
        )
        assert proc.returncode == 0, proc.stderr
        by_body = assert_each_stored_once(url, n)
    results, _ = ledger(out)
    assert assert_ok_lines_name_the_stored_copy(results, by_body, n) > 0


async def test_an_endpoint_without_listmessages_exits_2_with_one_line(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", records(20))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess() as (_, url):
        async with misbehaving_proxy(url, Misbehaviour(list_status=404)) as proxy:
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "bulksend", "send", str(data), *target(proxy.url)],
                *["--out", str(out), "--exactly-once", "--quiet"],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
        sent = accepted(url)
    err = err_bytes.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "ListMessages" in err and "HTTP 404" in err
    assert sent == 0  # never a silent fall-back to at-least-once: nothing was sent


@pytest.mark.parametrize(
    ("out", "says"), [(None, "--exactly-once needs --out FILE"), ("-", "regular file")]
)
def test_exactly_once_needs_a_ledger_file(tmp_path: Path, out: str | None, says: str) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", records(3))
    with start_server_subprocess() as (_, url):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--exactly-once",
            *(["--out", out] if out else []),
            "--quiet",
        )
        sent = accepted(url)
    assert proc.returncode == 2 and no_traceback(proc)
    assert proc.stderr.count("\n") == 1 and says in proc.stderr
    assert sent == 0


def crash_with_all_in_flight(url: str, data: Path, out: Path, n: int) -> None:
    """An --exactly-once run killed (-9) once the server (answers held 60 s) stored all n."""
    proc = spawn_send(str(data), *target(url), "--out", str(out), "--exactly-once", "--quiet")
    deadline = time.monotonic() + 60
    while accepted(url) < n:
        assert time.monotonic() < deadline and proc.poll() is None, "never had n in flight"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def test_resume_reconciles_crashed_intents_before_sending(tmp_path: Path) -> None:
    n = 40
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "60000") as (_, url):
        crash_with_all_in_flight(url, data, out, n)
        results, intents = ledger(out)
        assert (len(results), len(intents)) == (0, n)  # every record in doubt
        # Against the same (slow) server: every record found stored, nothing sent again.
        resumed = bulksend(
            *["send", str(data), *target(url), "--out", str(out), "--resume"],
            *["--exactly-once", "--reconcile-after", "0.2", "--quiet"],
        )
        assert resumed.returncode == 0, resumed.stderr
        assert accepted(url) == n
        by_body = assert_each_stored_once(url, n)
    results, _ = ledger(out)
    assert assert_ok_lines_name_the_stored_copy(results, by_body, n) == n


def test_resume_without_exactly_once_warns_of_the_records_in_doubt(tmp_path: Path) -> None:
    n = 10
    data = write_jsonl(tmp_path / "in.jsonl", records(n))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "60000") as (_, slow):
        crash_with_all_in_flight(slow, data, out, n)
    with start_server_subprocess() as (_, url):
        resumed = bulksend("send", str(data), *target(url), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"holds {n} records in doubt from an --exactly-once run" in resumed.stderr
