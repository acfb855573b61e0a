"""Summaries that tell the truth: an interrupted run says so, with what is left and the
command that continues it; no figure is made up when nothing succeeded; a load cut short
says its thresholds were judged on part of a run; the verdicts are kept in --stats; a
server's text never reaches the terminal raw."""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from bulksend.summary import printable, summary_table
from tests.cli_helpers import bulksend, interrupt, read_jsonl, target, write_jsonl
from tests.serve_helpers import start_server_subprocess

pytestmark = pytest.mark.timeout(120)


def msgs(n: int) -> list[dict[str, object]]:
    return [{"topic": "orders", "body": f"m{i}", "id": f"r{i}"} for i in range(n)]


def test_an_interrupted_send_says_what_is_left_and_how_to_resume(tmp_path: Path) -> None:
    n = 1500
    data = write_jsonl(tmp_path / "in data.jsonl", msgs(n))  # a space: the command is quoted
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "20") as (_, url):
        args = ["send", str(data), *target(url), "--out", str(out), "--concurrency", "8",
                "--progress-interval", "60"]  # fmt: skip
        code, err = interrupt([sys.executable, "-m", "bulksend", *args], out, 50)
        assert code == 130 and "Traceback" not in err, err
        done = len(read_jsonl(out))
        assert "interrupted" in err
        assert f"{n - done:,} records not sent" in err
        resume = next(line for line in err.splitlines() if "--resume" in line)
        command = shlex.split(resume[resume.index("bulksend send") :])
        # The flags as given (in the parser's order), and --resume.
        assert command[:3] == ["bulksend", "send", str(data)] and command[-1] == "--resume"
        assert sorted(command[1:-1]) == sorted(w.removesuffix(".0") for w in args)
        again = bulksend(*command[1:])
        assert again.returncode == 0, again.stderr
        assert "interrupted" not in again.stderr
    assert Counter(r["id"] for r in read_jsonl(out)) == Counter({f"r{i}": 1 for i in range(n)})


def test_an_interrupted_send_from_stdin_cannot_be_resumed_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess("--latency", "20") as (_, url):
        cmd = [sys.executable, "-m", "bulksend", "send", "-", *target(url), "--out", str(out),
               "--concurrency", "4", "--progress-interval", "60"]  # fmt: skip
        data = write_jsonl(tmp_path / "in.jsonl", msgs(2000))
        with data.open("rb") as stdin:
            code, err = interrupt(cmd, out, 20, stdin=stdin)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert "the rest of stdin was not sent" in err
    assert "to continue" not in err  # no resume command to offer


def test_no_ok_record_shows_na_not_zero_latency_or_a_made_up_throughput(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(30))
    with start_server_subprocess("--error-rate", "1") as (_, url):
        proc = bulksend("send", str(data), *target(url), "--max-retries", "0")
    assert proc.returncode == 1, proc.stderr
    rows = (re.fullmatch(r"  (\S.*?)\s{2,}(.*)", line) for line in proc.stderr.splitlines())
    table = {m[1]: m[2] for m in rows if m}
    assert table["failed"] == "30"
    assert table["throughput"] == "n/a" and table["latency ms"].startswith("n/a")
    assert "p50" not in proc.stderr


def test_summary_table_with_nothing_answered() -> None:
    snapshot = {
        "total": 0, "ok": 0, "failed": 0, "invalid": 0, "skipped": 0, "retries": 0,
        "elapsed_s": 0.5, "throughput_msg_s": 0.0,
        "latency_ms": {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99_9": 0.0, "max": 0.0, "mean": 0.0},
        "http_status": {}, "errors": {}, "rate_changes": 0,
    }  # fmt: skip
    text = summary_table(snapshot)
    assert "n/a" in text and "p50" not in text and "msg/s" not in text


def test_a_load_cut_short_says_its_thresholds_judged_part_of_a_run(tmp_path: Path) -> None:
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "bulksend", "load", "--embedded", "--rate", "100", "--duration", "60s",
           "--out", str(out), "--stats", str(stats), "--threshold", "p99<10s", "--threshold",
           "error_rate<0.5", "--progress-interval", "60"]  # fmt: skip
    code, err = interrupt(cmd, out, 200)
    assert code == 130, err
    sent = len(read_jsonl(out))
    assert "interrupted" in err and f"{6000 - sent:,} of 6,000 scheduled messages not sent" in err
    verdicts = [line for line in err.splitlines() if line.startswith("threshold")]
    assert len(verdicts) == 2 and all("cut short" in line for line in verdicts)
    kept = orjson.loads(stats.read_bytes())["thresholds"]
    assert set(kept) == {"p99<10s", "error_rate<0.5"} and kept["error_rate<0.5"]["value"] == 0


def test_threshold_verdicts_are_kept_in_stats_and_rebuilt_by_report(tmp_path: Path) -> None:
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    proc = bulksend("load", "--embedded", "--rate", "50", "--duration", "1s", "--quiet",
                    "--out", str(out), "--stats", str(stats), "--threshold", "p99 < 10s",
                    "--threshold", "rate>=1000000", "--threshold", "error_rate<0.01")  # fmt: skip
    assert proc.returncode == 99, proc.stderr
    kept = orjson.loads(stats.read_bytes())["thresholds"]
    assert list(kept) == ["p99 < 10s", "rate>=1000000", "error_rate<0.01"]  # as given
    assert kept["p99 < 10s"]["ok"] is True and 0 < kept["p99 < 10s"]["value"] < 10_000
    assert kept["rate>=1000000"] == {"ok": False, "value": pytest.approx(50, rel=0.2)}
    assert kept["error_rate<0.01"] == {"ok": True, "value": 0}
    report = bulksend("report", str(out), "--json")
    assert report.returncode == 0 and report.stdout == stats.read_text()


def test_no_ok_answer_fails_a_latency_threshold(tmp_path: Path) -> None:
    with start_server_subprocess("--error-rate", "1") as (_, url):
        proc = bulksend("load", *target(url), "--rate", "20", "--duration", "1s", "--quiet",
                        "--threshold", "p99<1s", "--stats", str(tmp_path / "s.json"))  # fmt: skip
    assert proc.returncode == 99, proc.stderr
    assert "threshold FAIL  p99<1s" in proc.stderr
    assert orjson.loads((tmp_path / "s.json").read_bytes())["thresholds"] == {
        "p99<1s": {"ok": False, "value": None}
    }


# --- a server's text is escaped ------------------------------------------------------------

NASTY_CODE = "EVIL\x1b]0;pwned\x07\x1b[2J\u202e"
NASTY_MSG = "bad\rthing\x1b[31m"


@pytest.fixture
async def nasty_server() -> AsyncIterator[str]:
    """Answers every request 400 with an error_code and error_msg full of escapes."""
    body = orjson.dumps({"error_code": NASTY_CODE, "error_msg": NASTY_MSG})
    answer = (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_a_servers_control_characters_are_printed_escaped(
    nasty_server: str, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(3))
    cmd = [sys.executable, "-m", "bulksend", "send", str(data), *target(nasty_server),
           "--progress-interval", "0.1", "--concurrency", "1"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text and "\u202e" not in text
    assert r"EVIL\x1b]0;pwned\x07\x1b[2J\u202e: 3" in text


def test_printable() -> None:
    assert printable("plain text, ünïcode 名前") == "plain text, ünïcode 名前"
    assert printable("a\x1b[2Jb\x00\x7f\x9b\n\t") == r"a\x1b[2Jb\x00\x7f\x9b\n\t"
    assert printable("\u202eevil\u2066") == r"\u202eevil\u2066"
