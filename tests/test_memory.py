"""Streaming: a 1,000,000-line input is sent whole with peak RSS under 100 MB."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest

from tests.cli_helpers import run_measuring_peak_rss, target
from tests.serve_helpers import start_server_subprocess

N = 1_000_000


@pytest.mark.slow
def test_a_million_records_sent_in_bounded_memory(tmp_path: Path) -> None:
    data = tmp_path / "big.jsonl"
    with data.open("wb") as fh:
        for start in range(0, N, 10_000):
            fh.write(
                b"".join(
                    b'{"topic":"bulk","body":"record %07d of a long backfill","id":"r%d"}\n'
                    % (i, i)
                    for i in range(start, start + 10_000)
                )
            )
    out, stats = tmp_path / "ledger.jsonl", tmp_path / "stats.json"
    # --keep: the server remembers only the newest messages, so it is not the one growing.
    with start_server_subprocess("--keep", "1000") as (_, url):
        cmd = [
            sys.executable,
            "-m",
            "bulksend",
            "send",
            str(data),
            *target(url),
            "--out",
            str(out),
            "--stats",
            str(stats),
            "--quiet",
        ]
        code, peak_mb, stderr = run_measuring_peak_rss(cmd, tmp_path / "stdout.txt", timeout=600)
    assert code == 0, stderr
    s = orjson.loads(stats.read_bytes())
    assert s["ok"] == N and out.read_bytes().count(b"\n") == N + 1  # the run line, N results
    assert peak_mb < 100, f"peak RSS {peak_mb:.0f} MB"
    print(f"1M records sent: peak RSS {peak_mb:.1f} MB, {s['throughput_msg_s']:.0f} msg/s")
