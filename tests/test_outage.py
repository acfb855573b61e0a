"""Unreachable and failing targets over real sockets (issue 12, cases 13 and 14): fail fast
on a target that refuses, does not resolve or is not trusted from the start; ride out an
outage of the built-in server stopped and started again on its port; stop after
--outage-timeout and finish with --resume. The Sender in-process, and the CLI as a user
runs it (exit codes, the one-line message, the ledger).

Unknown hosts: a name under ``.invalid`` (RFC 6761: never resolves) that is also longer
than DNS allows (253 characters), so the C library refuses it before asking any server and
no query leaves the machine (a short ``.invalid`` name is sent to the configured DNS server
like any other: glibc does not special-case it).
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import trustme

from bulksend.config import RetryPolicy, SendOptions, Target, TLSOptions
from bulksend.errors import TargetUnreachable
from bulksend.record import Record
from bulksend.result import Result
from bulksend.sender import Sender
from bulksend.server import RunningServer, ServerOptions, run_server
from tests.cli_helpers import bulksend, no_traceback, read_jsonl, target, write_jsonl
from tests.raw_server import Exchange, RawServer, answer_json, response
from tests.serve_helpers import start_server_inprocess, start_server_subprocess, stop

UNRESOLVABLE = ".".join(["x" * 63] * 4) + ".invalid"
QUICK = RetryPolicy(max_retries=3, backoff_base=0.05, backoff_max=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def records(n: int) -> list[Record]:
    return [Record(seq=i, source=f"in.jsonl:{i + 1}", topic="t", body=f"m{i}") for i in range(n)]


def messages(n: int) -> list[dict[str, str]]:
    return [{"topic": "t", "body": f"m{i}", "id": f"r{i}"} for i in range(n)]


async def send_all(url: str, items: list[Record], got: list[Result], **opts: object) -> Sender:
    options = SendOptions(**{"retry": QUICK, "concurrency": 8, **opts})  # type: ignore[arg-type]
    async with Sender(Target(url, "p", "i"), options=options) as sender:
        await sender.run(items, lambda item, result: got.append(result))
    return sender


# --- fail fast: the Sender -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "cause", "says"),
    [
        ("127.0.0.1:{port}", "refused", "refused"),
        (f"{UNRESOLVABLE}:8080", "unknown-host", "cannot resolve host"),
    ],
)
async def test_a_target_unreachable_from_the_start_stops_and_writes_nothing_off(
    host: str, cause: str, says: str
) -> None:
    url = "http://" + host.format(port=free_port())
    got: list[Result] = []
    with pytest.raises(TargetUnreachable, match=says) as stopped:
        await send_all(url, records(1000), got, concurrency=64)
    assert stopped.value.cause == cause
    assert got == []  # no record written off as failed: all of them are left for --resume


async def test_an_untrusted_certificate_stops_naming_ca_bundle_and_the_bundle_opens_it(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    pem, bundle = tmp_path / "server.pem", tmp_path / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca.cert_pem.write_to_path(str(bundle))
    async with start_server_inprocess(tls_cert=str(pem), tls_key=str(pem)) as server:
        got: list[Result] = []
        with pytest.raises(TargetUnreachable, match=r"not trusted.*--ca-bundle") as stopped:
            await send_all(server.url, records(200), got)
        assert stopped.value.cause == "tls-verify" and got == []
        await send_all(server.url, records(20), got, tls=TLSOptions(ca_bundle=str(bundle)))
        assert [r.status for r in got] == ["ok"] * 20


# --- the target, not one record --------------------------------------------------------------


async def test_a_record_the_target_chokes_on_fails_on_its_own_and_the_run_goes_on() -> None:
    """The server closes the connection on one body and answers the rest: that record
    spends its retries and fails; nobody else waits, the target is never judged down."""

    async def handle(ex: Exchange) -> None:
        if b'"poison"' in ex.body:
            ex.close()
        else:
            await ex.write(response("200 OK", answer_json(ex.body)))

    items = records(60)
    items[30] = Record(seq=30, source="in.jsonl:31", topic="t", body="poison")
    got: list[Result] = []
    async with RawServer(handle) as srv:
        sender = await send_all(srv.url, items, got, concurrency=4)
    by_seq = {r.seq: r for r in got}
    assert len(got) == 60 and sorted(by_seq) == list(range(60))
    poison = by_seq.pop(30)
    assert (poison.status, poison.error_code, poison.attempts) == ("failed", "PROTOCOL_ERROR", 4)
    assert {r.status for r in by_seq.values()} == {"ok"}
    assert sender.health.outages == 0


# --- ride out an outage: the Sender ----------------------------------------------------------


async def stored_bodies(server: RunningServer) -> Counter[str]:
    return Counter(m.body for m in await server.store.messages())


async def wait_until(condition: object, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s} s: {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("concurrency", [8, 1])
async def test_an_outage_mid_run_is_ridden_out_with_every_record_ok(concurrency: int) -> None:
    """The server stops (graceful: its listening socket closes, answers in flight go out)
    and comes back on the same port well after every record's own retries
    (--max-retries 3, at most 0.2 s apart) would have been spent."""
    port, n = free_port(), 600
    options = ServerOptions(host="127.0.0.1", port=port)
    got: list[Result] = []
    opts = SendOptions(retry=QUICK, concurrency=concurrency, rate=300)
    async with Sender(Target(f"http://127.0.0.1:{port}", "p", "i"), options=opts) as sender:
        health = sender.health
        async with run_server(options) as first:
            task = asyncio.create_task(
                sender.run(records(n), lambda item, result: got.append(result))
            )
            await wait_until(lambda: len(got) >= n // 4, 30, "a quarter of the records sent")
        stopped_at = time.monotonic()
        stored = await stored_bodies(first)
        await wait_until(
            lambda: health.down and health.probes >= 3 and time.monotonic() - stopped_at > 1.5,
            30,
            "the target judged down and probed",
        )
        assert not task.done() and health.note() is not None
        async with run_server(options) as second:
            await asyncio.wait_for(task, 60)
            stored += await stored_bodies(second)
    assert sorted(r.seq for r in got) == list(range(n))  # one result per record
    assert {r.status for r in got} == {"ok"}
    assert health.outages == 1 and not health.down and health.error is None
    duplicates = sum(stored.values()) - len(stored)
    print(f"\nconcurrency {concurrency}: {health.probes} probes, {duplicates} duplicates")
    assert set(stored) == {f"m{i}" for i in range(n)}
    assert duplicates <= concurrency  # at least once: only requests in flight at the stop


async def test_a_drain_while_the_target_is_down_withholds_what_waits() -> None:
    port = free_port()
    got: list[Result] = []
    opts = SendOptions(retry=QUICK, concurrency=4, rate=200)
    async with Sender(Target(f"http://127.0.0.1:{port}", "p", "i"), options=opts) as sender:
        async with run_server(ServerOptions(host="127.0.0.1", port=port)):
            task = asyncio.create_task(
                sender.run(records(400), lambda item, result: got.append(result))
            )
            await wait_until(lambda: len(got) >= 20, 30, "20 records sent")
        await wait_until(lambda: sender.health.down, 30, "the target judged down")
        sent = len(got)
        sender.stop()
        await asyncio.wait_for(task, 30)  # no error: a drain is the user's stop
    assert {r.status for r in got} == {"ok"} and len(got) == sent


# --- the CLI ---------------------------------------------------------------------------------


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("bulksend: error:")]


def results_in(ledger: Path) -> list[dict[str, object]]:
    if not ledger.exists():
        return []
    return [r for r in read_jsonl(ledger) if r.get("status") not in ("run", "intent")]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", messages(1000))


def test_cli_refused_from_the_start_exits_2_with_one_line(data: Path, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out.jsonl"
    proc = bulksend(
        "send", str(data), *target(f"http://127.0.0.1:{port}"), "--out", str(out), "--quiet"
    )
    assert proc.returncode == 2 and no_traceback(proc)
    assert proc.stderr.splitlines() == error_lines(proc)  # the one line, nothing else
    [line] = error_lines(proc)
    assert f"connection to 127.0.0.1:{port} refused" in line and "--resume" in line
    assert results_in(out) == []


def test_cli_untrusted_certificate_exits_2_naming_ca_bundle(data: Path, tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    out = tmp_path / "out.jsonl"
    with start_server_subprocess("--tls-cert", str(pem), "--tls-key", str(pem)) as (_, url):
        proc = bulksend("send", str(data), *target(url), "--out", str(out), "--quiet")
    assert proc.returncode == 2 and no_traceback(proc)
    [line] = proc.stderr.splitlines()
    assert "TLS certificate of 127.0.0.1" in line and "not trusted" in line
    assert "--ca-bundle" in line
    assert results_in(out) == []


@pytest.mark.parametrize(
    "host",
    [
        UNRESOLVABLE,
        "a..invalid",  # an empty label: the IDNA codec refuses it (it was a traceback)
    ],
)
def test_cli_unknown_host_exits_2_with_one_line(host: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = bulksend("send", str(data), *target(f"http://{host}"), "--out", str(out), "--quiet")
    assert proc.returncode == 2 and no_traceback(proc)
    [line] = proc.stderr.splitlines()
    assert f"cannot resolve host {host}" in line and "--endpoint" in line
    assert results_in(out) == []


def test_cli_lookups_cut_short_by_the_timeout_leave_no_stray_errors(
    data: Path, tmp_path: Path
) -> None:
    """uvloop's create_connection, cancelled while it resolves, leaves its lookup behind:
    "Future exception was never retrieved ... gaierror", once per attempt. Here every
    lookup is cut short (the run then stops at --outage-timeout: nothing ever answers)."""
    proc = bulksend(
        "send",
        str(data),
        *target(f"http://{UNRESOLVABLE}"),
        "--quiet",
        "--timeout",
        "0.000001",
        "--max-retries",
        "1",
        env={"BULKSEND_OUTAGE_TIMEOUT": "0.3"},  # the environment's way to set the option
    )
    assert "Future exception was never retrieved" not in proc.stderr
    assert "gaierror" not in proc.stderr
    assert proc.returncode == 2 and no_traceback(proc)
    assert len(proc.stderr.splitlines()) == 1


@pytest.fixture
def port_and_store(tmp_path: Path) -> tuple[int, Path]:
    return free_port(), tmp_path / "store.sqlite"


def stored_rows(store: Path) -> tuple[int, int]:
    """Messages stored, and distinct bodies among them."""
    with sqlite3.connect(store) as db:
        rows, distinct = db.execute(
            "SELECT count(*), count(DISTINCT body) FROM messages"
        ).fetchone()
    return int(rows), int(distinct)


def wait_for_results(ledger: Path, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(results_in(ledger)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"fewer than {n} results within 60 s"
        time.sleep(0.05)


def spawn_send(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bulksend", "send", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


PACED = ["--rate", "400", "--concurrency", "16", "--max-retries", "3"]
PACED += ["--backoff-base", "0.05", "--backoff-max", "0.2"]


def test_cli_a_4_s_outage_ends_with_every_record_ok(
    tmp_path: Path, port_and_store: tuple[int, Path]
) -> None:
    """The issue's case: --max-retries 3 --backoff-max 0.2 and the server away for 4 s."""
    port, store = port_and_store
    n = 2000
    data = write_jsonl(tmp_path / "in.jsonl", messages(n))
    out = tmp_path / "out.jsonl"
    server = ("--port", str(port), "--store", str(store))
    with start_server_subprocess(*server) as (first, url):
        sender = spawn_send(str(data), *target(url), "--out", str(out), "--quiet", *PACED)
        try:
            wait_for_results(out, n // 4, sender)
            stop(first)
            time.sleep(4.0)  # the outage
            with start_server_subprocess(*server):
                _, err = sender.communicate(timeout=120)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.communicate()
    assert sender.returncode == 0, err
    results = results_in(out)
    assert Counter(r["status"] for r in results) == {"ok": n}
    assert sorted(int(r["seq"]) for r in results) == list(range(n))  # type: ignore[call-overload]
    rows, distinct = stored_rows(store)
    print(f"\n4 s outage: {rows} stored for {n} records, {rows - distinct} duplicates")
    assert distinct == n and rows - distinct <= 16


def test_cli_an_outage_past_outage_timeout_exits_2_and_resume_finishes(
    tmp_path: Path, port_and_store: tuple[int, Path]
) -> None:
    port, store = port_and_store
    n = 1000
    data = write_jsonl(tmp_path / "in.jsonl", messages(n))
    out = tmp_path / "out.jsonl"
    server = ("--port", str(port), "--store", str(store))
    send = [str(data), *target(f"http://127.0.0.1:{port}"), "--out", str(out), *PACED]
    with start_server_subprocess(*server):
        sender = spawn_send(*send, "--outage-timeout", "1", "--progress-interval", "0.2")
        try:
            wait_for_results(out, n // 4, sender)
        except BaseException:
            sender.kill()
            sender.communicate()
            raise
    _, err = sender.communicate(timeout=60)
    assert sender.returncode == 2, err
    lines = err.splitlines()
    assert lines[-1].startswith("bulksend: error: target unreachable since ")
    assert "for longer than --outage-timeout 1 s" in lines[-1] and "--resume" in lines[-1]
    assert len([line for line in lines if line.startswith("bulksend: error:")]) == 1
    assert any("target unreachable since" in line and "probing" in line for line in lines[:-1])
    assert "Traceback" not in err
    first = results_in(out)
    assert first and {r["status"] for r in first} == {"ok"}  # nothing written off
    assert len(first) < n
    with start_server_subprocess(*server):
        proc = bulksend("send", *send, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    results = results_in(out)
    assert Counter(r["status"] for r in results) == {"ok": n}
    assert len({r["seq"] for r in results}) == n  # exactly one ok line per record
    rows, distinct = stored_rows(store)
    print(f"\noutage past the timeout, then --resume: {rows - distinct} duplicates")
    assert distinct == n and rows - distinct <= 16


@pytest.mark.parametrize("value", ["nan", "-1", "1e9"])
def test_cli_outage_timeout_is_checked(value: str, data: Path) -> None:
    proc = bulksend("send", str(data), "--embedded", "--outage-timeout", value)
    assert proc.returncode == 2 and no_traceback(proc)
    assert "--outage-timeout must be" in proc.stderr
