"""``bulksend send`` end to end: the CLI as a subprocess against ``bulksend serve`` (or
--embedded) over real loopback sockets."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import orjson
import pytest

from tests.cli_helpers import bulksend, no_traceback, read_jsonl, target, write_jsonl
from tests.serve_helpers import AK, SK, start_server_subprocess

RESULT_FIELDS = {
    "seq",
    "source",
    "id",
    "status",
    "http_status",
    "msg_id",
    "queue_id",
    "queue_offset",
    "broker_name",
    "attempts",
    "latency_ms",
    "error_code",
    "error_msg",
    "request_id",
    "started_at",
    "done_at",
}
STATS_FIELDS = {
    "total",
    "ok",
    "failed",
    "invalid",
    "skipped",
    "retries",
    "elapsed_s",
    "throughput_msg_s",
    "latency_ms",
    "http_status",
    "errors",
}
REPO = Path(__file__).resolve().parent.parent


def msgs(n: int, **extra: object) -> list[dict[str, object]]:
    return [{"topic": "orders", "body": f"message {i}", "id": f"r{i}", **extra} for i in range(n)]


def test_readme_main_command_embedded(tmp_path: Path) -> None:
    out, stats = tmp_path / "results.jsonl", tmp_path / "stats.json"
    proc = bulksend(
        "send",
        "examples/messages.jsonl",
        "--embedded",
        "--out",
        str(out),
        "--stats",
        str(stats),
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr
    lines = read_jsonl(out)
    n = sum(
        1 for line in (REPO / "examples/messages.jsonl").read_bytes().splitlines() if line.strip()
    )
    assert len(lines) == n and {r["status"] for r in lines} == {"ok"}
    assert sorted(r["seq"] for r in lines) == list(range(n))
    assert set(lines[0]) >= RESULT_FIELDS
    # Latency has sub-millisecond resolution (uvloop's loop clock would round to whole ms).
    assert any(r["latency_ms"] % 1 for r in lines)
    s = orjson.loads(stats.read_bytes())
    assert set(s) >= STATS_FIELDS and s["total"] == s["ok"] == n and s["http_status"] == {"200": n}
    assert set(s["latency_ms"]) >= {"p50", "p90", "p99", "max", "mean"}
    assert "records" in proc.stderr and "throughput" in proc.stderr  # the summary table


def test_signed_send_to_a_verifying_server(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(200, keys=["a", "b"], tags="t1"))
    auth = {"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK}
    out = tmp_path / "out.jsonl"
    with start_server_subprocess(env=auth) as (_, url):
        proc = bulksend("send", str(data), *target(url), "--out", str(out), "--quiet", env=auth)
        listed = bulksend_list(url, auth)
    assert proc.returncode == 0, proc.stderr
    results = read_jsonl(out)
    assert len(results) == 200 and all(r["status"] == "ok" and r["attempts"] == 1 for r in results)
    assert {r["id"] for r in results} == {f"r{i}" for i in range(200)}
    # What arrived is what was sent: KEYS joined with a space, TAGS, the body.
    props = {p["name"]: p["value"] for p in listed[0]["property_list"]}
    assert (
        props["KEYS"] == "a b"
        and props["TAGS"] == "t1"
        and listed[0]["body"].startswith("message ")
    )


def bulksend_list(url: str, auth: dict[str, str]) -> list[dict[str, object]]:
    """ListMessages through the official SDK (signed): what the server stored."""
    from huaweicloudsdkrocketmq.v2 import ListMessagesRequest

    from tests.serve_helpers import INSTANCE_ID, sdk_client

    resp = sdk_client(url).list_messages(
        ListMessagesRequest(
            engine="rocketmq",
            instance_id=INSTANCE_ID,
            topic="orders",
            limit=5,
            start_time="0",
            end_time=str(2**53),
        )
    )
    return [m.to_dict() for m in resp.messages]


def test_wrong_secret_stops_after_twenty_401s_and_never_prints_secrets(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(300))
    out, stats, failed = tmp_path / "out.jsonl", tmp_path / "stats.json", tmp_path / "failed.jsonl"
    wrong = "wrong-secret-key-that-must-never-show"
    with start_server_subprocess(env={"HUAWEICLOUD_SDK_AK": AK, "HUAWEICLOUD_SDK_SK": SK}) as (
        _,
        url,
    ):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--stats",
            str(stats),
            "--failed",
            str(failed),
            "--concurrency",
            "4",
            env={
                "HUAWEICLOUD_SDK_AK": AK,
                "HUAWEICLOUD_SDK_SK": wrong,
                "HUAWEICLOUD_SDK_SECURITY_TOKEN": "sts-token-secret",
            },
        )
    assert proc.returncode == 2 and no_traceback(proc)
    assert "bulksend: error: authentication failed:" in proc.stderr
    results = read_jsonl(out)
    assert 20 <= len(results) < 300 and all(r["http_status"] == 401 for r in results)
    for text in (proc.stdout, proc.stderr, out.read_text(), stats.read_text(), failed.read_text()):
        assert wrong not in text and "sts-token-secret" not in text


def test_exit_codes_and_invalid_records(tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(
        b'{"topic":"t","body":"ok"}\n{"topic":"t"}\n\n  \nnot json\n{"topic":"t","body":"x","properties":{"a":1}}\n'
    )
    out, failed = tmp_path / "out.jsonl", tmp_path / "failed.jsonl"
    proc = bulksend(
        "send", str(data), "--embedded", "--out", str(out), "--failed", str(failed), "--quiet"
    )
    assert proc.returncode == 1 and no_traceback(proc)
    by_seq = {r["seq"]: r for r in read_jsonl(out)}
    assert [by_seq[i]["status"] for i in range(4)] == ["ok", "invalid", "invalid", "invalid"]
    assert [by_seq[i]["source"] for i in range(4)] == [f"{data}:{n}" for n in (1, 2, 5, 6)]
    assert "body" in by_seq[1]["error_msg"] and "JSON" in by_seq[2]["error_msg"]
    raws = [f["_raw"] for f in read_jsonl(failed)]
    assert sorted(raws) == sorted(
        ['{"topic":"t"}', "not json", '{"topic":"t","body":"x","properties":{"a":1}}']
    )


def test_unopenable_input_exits_2_before_sending(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "in.jsonl", msgs(5))
    with start_server_subprocess() as (_, url):
        proc = bulksend(
            "send",
            str(good),
            str(tmp_path / "missing.jsonl"),
            *target(url),
            "--out",
            str(tmp_path / "o"),
        )
        metrics = bulksend_metrics(url)
    assert proc.returncode == 2 and no_traceback(proc)
    assert len(proc.stderr.strip().splitlines()) == 1 and "missing.jsonl" in proc.stderr
    assert "bulksend_serve_messages_accepted_total 0" in metrics


def bulksend_metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0", "--embedded"], "--concurrency"),
        ([], "a target is needed"),
        (["--endpoint", "ftp://x", "--project-id", "p", "--instance-id", "i"], "endpoint"),
        (["--endpoint", "http://127.0.0.1:1", "--instance-id", "i"], "project id"),
        (["--embedded", "--engine", "kafka"], None),
        (["--embedded", "--format", "xml"], "invalid choice"),
        (["--embedded", "--config", "/nonexistent.toml"], "--config"),
    ],
)
def test_usage_and_config_errors_exit_2_with_one_line(
    tmp_path: Path, args: list[str], message: str | None
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(1))
    proc = bulksend("send", str(data), *args)
    assert proc.returncode == 2 and no_traceback(proc), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # argparse adds its usage line
    if message:
        assert message in proc.stderr


def test_stdin_gzip_and_csv_inputs(tmp_path: Path) -> None:
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(b"".join(orjson.dumps(m) + b"\n" for m in msgs(3)))
    csv = tmp_path / "b.csv"
    csv.write_text('topic,body,keys,prop.color\norders,"multi\nline",k1,red\norders,plain,,\n')
    out = tmp_path / "out.jsonl"
    stdin = b'{"topic":"orders","body":"from stdin"}\n'
    proc = bulksend(
        "send", str(gz), str(csv), "-", "--embedded", "--out", str(out), "--quiet", stdin=stdin
    )
    assert proc.returncode == 0, proc.stderr
    sources = {r["seq"]: r["source"] for r in read_jsonl(out)}
    assert sources == {
        0: f"{gz}:1",
        1: f"{gz}:2",
        2: f"{gz}:3",
        3: f"{csv}:2",
        4: f"{csv}:4",
        5: "-:1",
    }


def test_failed_file_replays(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(30, keys="k"))
    failed, out = tmp_path / "failed.jsonl", tmp_path / "out.jsonl"
    with start_server_subprocess("--error-rate", "1", "--seed", "3") as (_, url):
        first = bulksend(
            "send",
            str(data),
            *target(url),
            "--max-retries",
            "1",
            "--backoff-base",
            "0.001",
            "--failed",
            str(failed),
            "--quiet",
        )
    assert first.returncode == 1
    rows = read_jsonl(failed)
    assert len(rows) == 30 and all(
        r["_error"].startswith("DMS.") or "503" in r["_error"] for r in rows
    )
    with start_server_subprocess() as (_, url):
        again = bulksend("send", str(failed), *target(url), "--out", str(out), "--quiet")
    assert again.returncode == 0, again.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(f"r{i}" for i in range(30))


def test_retries_against_a_misbehaving_server_end_ok(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(300))
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    with start_server_subprocess("--error-rate", "0.2", "--drop-rate", "0.05", "--seed", "7") as (
        _,
        url,
    ):
        proc = bulksend(
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--stats",
            str(stats),
            "--backoff-base",
            "0.01",
            "--max-retries",
            "10",
            "--quiet",
        )
    assert proc.returncode == 0, proc.stderr
    results = read_jsonl(out)
    s = orjson.loads(stats.read_bytes())
    assert len(results) == 300 and s["ok"] == 300
    assert s["retries"] == sum(r["attempts"] - 1 for r in results) > 0


def test_rate_is_kept(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(200))
    out = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    proc = bulksend("send", str(data), "--embedded", "--rate", "100", "--out", str(out), "--quiet")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    starts = sorted(r["started_at"] for r in read_jsonl(out))
    span_s = (starts[-1] - starts[0]) / 1000
    # 200 at 100/s: the last is due 1.99 s after the first. Never faster than asked; the
    # upper bound only catches a stuck pacer, not a slow machine.
    assert span_s >= 1.95 and elapsed < 30
    # No start-up burst: the first 11 sends (10 gaps of 10 ms) take >= 90 ms (ms clock).
    assert starts[10] - starts[0] >= 90


def test_progress_lines_off_a_terminal_and_quiet(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(40))
    loud = bulksend("send", str(data), "--embedded", "--rate", "40", "--progress-interval", "0.2")
    assert loud.returncode == 0
    status = [line for line in loud.stderr.splitlines() if " done " in line and "msg/s" in line]
    assert len(status) >= 3 and "\r" not in loud.stderr
    quiet = bulksend("send", str(data), "--embedded", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_config_file_env_and_flags_precedence(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(3))
    with start_server_subprocess() as (_, url), start_server_subprocess() as (_, other):
        conf = tmp_path / "c.toml"
        conf.write_text(
            f'endpoint = "http://127.0.0.1:1"\nproject-id = "p"\ninstance_id = "i"\n'
            f'out = "{tmp_path / "from-file.jsonl"}"\nquiet = true\n'
        )
        # env beats the file's endpoint; the flag beats env's --out.
        proc = bulksend(
            "send",
            str(data),
            "--config",
            str(conf),
            "--out",
            str(tmp_path / "flag.jsonl"),
            env={"BULKSEND_ENDPOINT": url, "BULKSEND_OUT": str(tmp_path / "env.jsonl")},
        )
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "flag.jsonl").exists() and not (tmp_path / "env.jsonl").exists()
        assert "bulksend_serve_messages_accepted_total 3" in bulksend_metrics(url)
        assert not (tmp_path / "from-file.jsonl").exists()
        del other


def test_secret_flags_do_not_exist() -> None:
    helptext = bulksend("send", "--help").stdout
    for word in ("--ak", "--sk", "--secret", "--token", "--password"):
        assert word not in helptext


def test_send_html_report(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(50))
    html = tmp_path / "report.html"
    proc = bulksend("send", str(data), "--embedded", "--html", str(html), "--quiet")
    assert proc.returncode == 0, proc.stderr
    text = html.read_text()
    assert text.count('<div class="plot"') >= 3 and "bulksend send" in text  # the charts
    assert "<script src" not in text and "<link" not in text  # opens offline: nothing fetched
