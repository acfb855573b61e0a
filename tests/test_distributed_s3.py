"""Inputs as s3:// URLs, read through fsspec and s3fs, against moto's S3 server on
127.0.0.1: one process, a --resume over them (their fingerprints are the store's ETags),
and --workers 2 whose workers read the object themselves."""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.cli_helpers import bulksend, read_jsonl
from tests.s3_helpers import BUCKET, moto_s3
from tests.s3_helpers import jsonl as _jsonl
from tests.s3_helpers import put as _put

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is in the test extra")
pytest.importorskip("moto.server", reason="moto[server] is in the test extra")


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[dict[str, str], object]]:
    with moto_s3() as found:
        yield found


def test_send_reads_s3_inputs_and_resumes_over_them(
    tmp_path: Path, s3: tuple[dict[str, str], object]
) -> None:
    env, fs = s3
    plain = _put(fs, "day1.jsonl", _jsonl(0, 700))
    packed = _put(fs, "day2.jsonl.gz", gzip.compress(_jsonl(700, 300)))
    out = tmp_path / "out.jsonl"
    args = ["send", plain, packed, "--embedded", "--out", str(out), "--quiet"]
    first = bulksend(*args, env=env)
    assert first.returncode == 0, first.stderr
    lines = read_jsonl(out)
    assert [x["source"] for x in lines[:1]] == [f"{plain}:1"]
    assert Counter(x["status"] for x in lines) == {"ok": 1000}
    assert len({x["identity"] for x in lines}) == 1000

    stats = tmp_path / "stats.json"
    again = bulksend(*args, "--resume", "--stats", str(stats), env=env)
    assert again.returncode == 0, again.stderr
    figures = orjson.loads(stats.read_bytes())
    assert (figures["skipped"], figures["ok"]) == (1000, 0)  # nothing sent twice

    _put(fs, "day1.jsonl", _jsonl(0, 701))  # the object replaced: a new ETag
    changed = bulksend(*args, "--resume", env=env)
    assert changed.returncode == 2 and f"input {plain} changed since" in changed.stderr


def test_a_missing_object_is_one_line_and_exit_2(
    tmp_path: Path, s3: tuple[dict[str, str], object]
) -> None:
    env, _ = s3
    proc = bulksend("send", f"s3://{BUCKET}/nothing.jsonl", "--embedded", env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert f"cannot open input s3://{BUCKET}/nothing.jsonl" in proc.stderr


@pytest.mark.slow
def test_workers_read_an_s3_input(tmp_path: Path, s3: tuple[dict[str, str], object]) -> None:
    env, fs = s3
    url = _put(fs, "big.jsonl", _jsonl(0, 2000))
    out = tmp_path / "out.jsonl"
    proc = bulksend(
        "send", url, "--embedded", "--workers", "2", "--out", str(out), "--quiet",
        env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = read_jsonl(out)
    assert Counter(x["seq"] for x in lines) == Counter(range(2000))  # each record once
    assert {x["status"] for x in lines} == {"ok"} and {x["shard"] for x in lines} == {0, 1}
