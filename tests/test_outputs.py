"""Outputs a run can trust: one run per ledger (a lock), no silent overwrite, every output
opened before the first send and written in place when it is not a regular file, a failed
ledger write stops the workers, ``--out -`` and ``report -`` in a pipe, the run line. The CLI
as a subprocess against ``bulksend serve`` (or --embedded) on loopback, real files."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.cli_helpers import (
    accepted,
    bulksend,
    no_traceback,
    read_jsonl,
    target,
    wait_for_lines,
    write_jsonl,
)
from tests.serve_helpers import AK, ALL_TIME, SK, messages_path, start_server_subprocess

pytestmark = pytest.mark.timeout(120)
QUIET = ["--quiet"]


def msgs(n: int, topic: str = "orders") -> list[dict[str, Any]]:
    return [{"topic": topic, "body": f"m{i}", "id": f"r{i}"} for i in range(n)]


def stored(url: str, topic: str) -> int:
    qs = urllib.parse.urlencode({"topic": topic, "limit": "10000", **ALL_TIME})
    with urllib.request.urlopen(f"{url}{messages_path()}?{qs}", timeout=10) as resp:
        return int(json.loads(resp.read())["total"])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with start_server_subprocess() as (_, url):
        yield url


_spawned: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_sender_left_behind() -> Iterator[None]:
    yield
    while _spawned:
        proc = _spawned.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def spawn(*args: str, **popen: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULKSEND_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulksend", *args],
        stdout=popen.pop("stdout", subprocess.PIPE),
        stderr=subprocess.PIPE,
        env=env,
        **popen,
    )
    _spawned.append(proc)
    return proc


# --- one run per ledger ------------------------------------------------------------------


def test_a_second_run_on_a_ledger_in_use_exits_2_at_once_and_sends_nothing(tmp_path: Path) -> None:
    first_in = write_jsonl(tmp_path / "first.jsonl", msgs(3000))
    second_in = write_jsonl(tmp_path / "second.jsonl", msgs(50, topic="second"))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "20") as (_, url):
        first = spawn(
            "send", str(first_in), *target(url), "--out", str(out), "--concurrency", "4", *QUIET
        )
        wait_for_lines(out, 20)
        for resume in ([], ["--resume"]):
            second = bulksend(
                "send", str(second_in), *target(url), "--out", str(out), *resume, *QUIET
            )
            assert first.poll() is None  # refused while the first still runs
            assert second.returncode == 2 and no_traceback(second), second.stderr
            assert second.stderr == f"bulksend: error: {out} is in use by pid {first.pid}\n"
        # The same file by another name (a hard link: a `cp -al` snapshot, say) is the same
        # ledger: a resume through it ran beside the first, records ok twice.
        (tmp_path / "snap").mkdir()
        linked = tmp_path / "snap" / "ledger.jsonl"
        os.link(out, linked)
        second = bulksend(
            "send", str(second_in), *target(url), "--out", str(linked), "--resume", *QUIET
        )
        assert first.poll() is None
        assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr
        assert stored(url, "second") == 0
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
        assert first.returncode == 130
        # The lock went with the run: a resume may go on now.
        assert not (tmp_path / "ledger.jsonl.lock").exists()
        again = bulksend("send", str(first_in), *target(url), "--out", str(out), "--resume", *QUIET)
        assert again.returncode == 0, again.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(f"r{i}" for i in range(3000))


# --- no silent overwrite ------------------------------------------------------------------


def test_a_non_empty_ledger_is_kept_unless_resume_or_overwrite(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(10))
    out = tmp_path / "ledger.jsonl"
    out.write_bytes(b"")  # an empty file is no run to protect
    assert bulksend("send", str(data), "--embedded", "--out", str(out), *QUIET).returncode == 0
    before = out.read_bytes()
    refused = bulksend("send", str(data), "--embedded", "--out", str(out), *QUIET)
    assert refused.returncode == 2 and no_traceback(refused)
    assert len(refused.stderr.splitlines()) == 1
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert out.read_bytes() == before
    again = bulksend("send", str(data), "--embedded", "--out", str(out), "--overwrite", *QUIET)
    assert again.returncode == 0, again.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(f"r{i}" for i in range(10))
    # load has no --resume: its refusal names --overwrite only.
    load = bulksend(
        "load", "--embedded", "--rate", "10", "--duration", "1s", "--out", str(out), *QUIET
    )
    assert load.returncode == 2 and "--overwrite" in load.stderr and no_traceback(load)


def test_send_does_not_resume_a_load_ledger(tmp_path: Path) -> None:
    # A synthetic load's lines and a backfill's in one ledger: `report` counted both as one
    # run's records, and lost the load's latency split.
    out = tmp_path / "ledger.jsonl"
    load = bulksend(
        "load", "--embedded", "--rate", "50", "--duration", "1s", "--out", str(out), *QUIET
    )
    assert load.returncode == 0, load.stderr
    before = out.read_bytes()
    data = write_jsonl(tmp_path / "in.jsonl", msgs(5))
    resumed = bulksend("send", str(data), "--embedded", "--out", str(out), "--resume", *QUIET)
    assert resumed.returncode == 2 and no_traceback(resumed)
    assert "written by bulksend load" in resumed.stderr and len(resumed.stderr.splitlines()) == 1
    assert out.read_bytes() == before


# --- outputs checked up front -------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--out", "--stats", "--html", "--failed"])
@pytest.mark.parametrize("where", ["missing-dir", "under-a-file", "a-directory"])
def test_an_unwritable_send_output_exits_2_before_the_first_send(
    tmp_path: Path, server: str, flag: str, where: str
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(20, topic=f"upfront-{flag[2:]}-{where}"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    path = {
        "missing-dir": tmp_path / "nowhere" / "o.json",
        "under-a-file": tmp_path / "file" / "o.json",
        "a-directory": tmp_path / "dir",
    }[where]
    proc = bulksend("send", str(data), *target(server), flag, str(path), *QUIET)
    assert proc.returncode == 2 and no_traceback(proc), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and str(path) in proc.stderr
    assert stored(server, f"upfront-{flag[2:]}-{where}") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "in.jsonl"]
    assert list((tmp_path / "dir").iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--stats", "--html", "--timeseries"])
def test_an_unwritable_load_output_exits_2_before_the_first_send(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "nowhere" / "o.json"
    began = time.monotonic()
    proc = bulksend(
        "load", "--embedded", "--rate", "10", "--duration", "30s", flag, str(path), *QUIET
    )
    assert proc.returncode == 2 and no_traceback(proc), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and str(path) in proc.stderr
    assert time.monotonic() - began < 25  # refused up front, not after the 30 s schedule


def test_outputs_write_through_symlinks_and_in_place_to_a_fifo(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(30))
    real = tmp_path / "real"
    real.mkdir()
    links = {}
    for name in ("out.jsonl", "stats.json", "report.html", "failed.jsonl"):
        links[name] = tmp_path / name
        links[name].symlink_to(real / name)  # dangling until the run writes the target
    fifo = tmp_path / "stats.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = bulksend(
        "send", str(data), "--embedded", "--out", str(links["out.jsonl"]),
        "--stats", str(links["stats.json"]), "--html", str(links["report.html"]),
        "--failed", str(links["failed.jsonl"]), *QUIET,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name, link in links.items():
        assert link.is_symlink() and (real / name).is_file(), name
    assert len(read_jsonl(real / "out.jsonl")) == 30
    assert orjson.loads((real / "stats.json").read_bytes())["ok"] == 30
    # --resume through the symlink finds the ledger and its sidecar where the run left them.
    assert (real / "out.jsonl.inputs.json").exists()
    again = bulksend(
        "send", str(data), "--embedded", "--out", str(links["out.jsonl"]), "--resume", *QUIET
    )
    assert again.returncode == 0 and len(read_jsonl(real / "out.jsonl")) == 30
    # A FIFO is written in place, not replaced by a regular file.
    proc = bulksend("send", str(data), "--embedded", "--stats", str(fifo), *QUIET)
    assert proc.returncode == 0, proc.stderr
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and orjson.loads(got[0])["ok"] == 30
    assert not list(tmp_path.glob("*.tmp")) and not list(real.glob("*.tmp"))


def test_a_fifo_ledger_gets_no_lock_and_no_sidecar(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(25))
    fifo = tmp_path / "ledger.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = bulksend("send", str(data), "--embedded", "--out", str(fifo), *QUIET)
    reader.join(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "ledger.fifo"]
    lines = [orjson.loads(line) for line in got[0].splitlines()]
    assert lines[0]["status"] == "run" and len(lines) == 26
    resumed = bulksend("send", str(data), "--embedded", "--out", str(fifo), "--resume", *QUIET)
    assert resumed.returncode == 2 and "--resume" in resumed.stderr and no_traceback(resumed)


# --- a failed ledger write stops the workers ----------------------------------------------


def _limit_file_size(limit: int) -> None:
    # A full disk without root tricks: past RLIMIT_FSIZE a write fails with EFBIG once
    # SIGXFSZ (which would kill the process) is ignored.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_stops_the_run_with_at_most_the_in_flight_unaccounted(tmp_path: Path) -> None:
    concurrency = 128
    data = write_jsonl(tmp_path / "in.jsonl", msgs(20_000))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess() as (_, url):
        proc = spawn(
            "send", str(data), *target(url), "--out", str(out), "--concurrency", str(concurrency),
            "--max-retries", "0", *QUIET, preexec_fn=lambda: _limit_file_size(200_000),
        )  # fmt: skip
        _, err = proc.communicate(timeout=90)
        sent = accepted(url)
    assert proc.returncode == 2 and "Traceback" not in err.decode(), err
    assert f"cannot write {out}" in err.decode()
    body = out.read_bytes().rpartition(b"\n")[0]
    ok = sum(1 for line in body.splitlines() if orjson.loads(line)["status"] == "ok")
    assert 0 < ok < 20_000
    # Every message the server took is in the ledger but for those in flight when the
    # write failed (before: each worker sent one more past the failed write).
    assert sent - ok <= concurrency


def test_a_ledger_on_a_device_that_fails_every_write_sends_nothing(
    tmp_path: Path, server: str
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(50, topic="devfull"))
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")
    proc = bulksend("send", str(data), *target(server), "--out", str(full), *QUIET)
    assert proc.returncode == 2 and no_traceback(proc), proc.stderr
    assert "No space left on device" in proc.stderr
    assert stored(server, "devfull") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.jsonl", "in.jsonl"]


# --- pipes --------------------------------------------------------------------------------


def test_send_out_dash_pipes_into_report_dash(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [*msgs(40), {"body": "no topic"}])
    stats = tmp_path / "stats.json"
    sender = spawn(
        "send", str(data), "--embedded", "--out", "-", "--stats", str(stats), cwd=tmp_path
    )
    report = spawn("report", "-", "--json", stdin=sender.stdout, cwd=tmp_path)
    assert sender.stdout is not None
    sender.stdout.close()  # the report holds the pipe's read end now
    out, report_err = report.communicate(timeout=60)
    _, send_err = sender.communicate(timeout=60)
    assert sender.returncode == 1 and report.returncode == 0, (send_err, report_err)
    assert out == stats.read_bytes()  # the run's own --stats, byte for byte
    assert orjson.loads(out)["ok"] == 40
    assert b"records" in send_err  # the summary stays on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "stats.json"]


def test_out_dash_refuses_resume_and_a_second_stdout(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(3))
    resumed = bulksend("send", str(data), "--embedded", "--out", "-", "--resume", *QUIET)
    assert resumed.returncode == 2 and "--resume" in resumed.stderr and no_traceback(resumed)
    twice = bulksend("send", str(data), "--embedded", "--out", "-", "--stats", "-", *QUIET)
    assert twice.returncode == 2 and "stdout" in twice.stderr and no_traceback(twice)
    assert resumed.stdout == twice.stdout == ""


# --- closed standard streams (cron, daemons: `>&-`, `2>&-`, `<&-`) ---------------------------


def _closing(*fds: int) -> Any:
    """For Popen's preexec_fn: the child starts with these fds closed."""
    return lambda: [os.close(fd) for fd in fds]


@pytest.mark.parametrize(("closed", "extra"), [((1,), QUIET), ((2,), ()), ((0, 1, 2), QUIET)])
def test_a_run_with_closed_std_streams_exits_with_its_real_code(
    tmp_path: Path, server: str, closed: tuple[int, ...], extra: tuple[str, ...]
) -> None:
    # With fd 0-2 closed, the first sockets and files take those numbers; the event loop
    # then aborted the process (exit 134) on closing them, after or before the sends.
    data = write_jsonl(tmp_path / "in.jsonl", msgs(300, topic="closed"))
    out = tmp_path / "out.jsonl"
    args = ["send", str(data), *target(server), "--out", str(out), *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "bulksend", *args],
        stdin=None if 0 in closed else subprocess.DEVNULL,
        stdout=None if 1 in closed else subprocess.PIPE,
        stderr=None if 2 in closed else subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("BULKSEND_")}
        | {"BULKSEND_METADATA_URL": "off", "HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK},
        preexec_fn=_closing(*closed),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["seq"] for r in read_jsonl(out) if r["status"] == "ok") == list(range(300))


def test_a_closed_stdout_is_an_output_error_for_what_writes_there(tmp_path: Path) -> None:
    # The ledger or the report must not vanish into a stdout nobody reads: one line, exit 2.
    data = write_jsonl(tmp_path / "in.jsonl", msgs(3))
    ledger = tmp_path / "l.jsonl"
    assert bulksend("send", str(data), "--embedded", "--out", str(ledger), *QUIET).returncode == 0
    for args in (
        ["send", str(data), "--embedded", "--out", "-", *QUIET],
        ["report", str(ledger)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bulksend", *args],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_closing(1),
            timeout=60,
        )
        assert proc.returncode == 2 and "stdout is closed" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


# --- the run line --------------------------------------------------------------------------


def test_every_run_writes_its_settings_first_without_secrets(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(5))
    out = tmp_path / "ledger.jsonl"
    auth = {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK}
    with start_server_subprocess(env=auth) as (_, url):
        for extra in ([], ["--resume"]):
            proc = bulksend("send", str(data), *target(url), "--out", str(out), "--rate", "100",
                            *extra, *QUIET, env=auth)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
    raw = out.read_bytes()
    assert AK.encode() not in raw and SK.encode() not in raw
    lines = [orjson.loads(line) for line in raw.splitlines()]
    runs = [i for i, r in enumerate(lines) if r["status"] == "run"]
    assert runs == [0, 6]  # one per run, first, each before its results
    first, resumed = lines[0], lines[6]
    assert set(first) == {"status", "at", "command", "settings"} and first["command"] == "send"
    assert abs(first["at"] - time.time() * 1000) < 600_000
    s = first["settings"]
    assert s["inputs"] == [str(data)] and s["rate"] == 100 and s["auth"] == "aksk"
    assert s["target"] == target_url(url) and s["resume"] is False
    assert resumed["settings"]["resume"] is True
    load = tmp_path / "load.jsonl"
    proc = bulksend("load", "--embedded", "--rate", "20", "--duration", "1s", "--out", str(load),
                    "--threshold", "p99<2s", *QUIET)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    head = orjson.loads(load.read_bytes().splitlines()[0])
    assert head["command"] == "load" and head["settings"]["thresholds"] == ["p99<2s"]


def target_url(url: str) -> str:
    return f"{url}{messages_path()}"
