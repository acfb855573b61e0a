"""``bulksend validate`` as a user runs it: a subprocess, exit codes 0/1/2, problems as
``path:line: message`` (repeated kinds grouped under a count), never a traceback."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import run_measuring_peak_rss

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def validate(
    *args: str, stdin: bytes = b"", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "bulksend", "validate", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_clean_input_exits_0(tmp_path: Path) -> None:
    (tmp_path / "ok.jsonl").write_text('{"topic":"t","body":"a"}\n\n{"body":"b"}\n')
    done = validate("ok.jsonl", "--topic", "t", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "0 problems in 2 records\n", "")


def test_problems_are_listed_as_path_line_message_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(
        b'{"topic":"t","body":"ok"}\n{"topic":"t"}\n\n{"topic":"t","body":"x",\n'
        b'{"topic":"t","body":"\xff"}\n[1]\n'
    )
    (tmp_path / "in.csv").write_text("topic,body\nt,ok\nt,a,b\n")
    done = validate("in.jsonl", "in.csv", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "in.jsonl:2: body is missing",
        "in.jsonl:4: malformed JSON: unexpected end of data at column 25",
        "in.jsonl:5: invalid UTF-8 at byte 22",
        "in.jsonl:6: not a JSON object (got an array)",
        "in.csv:3: CSV row has 3 fields, header has 2",
        "5 problems in 7 records",
    ]
    assert done.stderr == ""


def test_repeated_problems_are_grouped_with_their_first_places(tmp_path: Path) -> None:
    lines = [b'{"body":"no topic %d"}' % i for i in range(4000)]
    lines[10] = b'{"topic":"t","body":"ok"}'
    lines[20] = b'{"topic":"t","body":"a",}'
    lines[30] = b'{"topic":"t","body":"ab",}'
    lines[40] = b'{"topic":"t","body":"abc",}'
    lines[50] = b'{"topic":"t"}'
    lines[60] = b'{"topic":"t","body":"a","properties":{"k1":1}}'
    (tmp_path / "day1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    done = validate("day1.jsonl", cwd=tmp_path)
    assert done.returncode == 1
    missing = "topic is missing and no default topic (--topic) is given"
    assert done.stdout.splitlines() == [
        f"3,994 records: {missing}",
        *(f"  day1.jsonl:{n}: {missing}" for n in (1, 2, 3)),
        "  ... and 3,991 more",
        "3 records: malformed JSON: trailing comma is not allowed at column N",
        "  day1.jsonl:21: malformed JSON: trailing comma is not allowed at column 24",
        "  day1.jsonl:31: malformed JSON: trailing comma is not allowed at column 25",
        "  day1.jsonl:41: malformed JSON: trailing comma is not allowed at column 26",
        "day1.jsonl:51: body is missing",
        'day1.jsonl:61: properties["k1"] is not a string (got a number)',
        "3,999 problems in 4,000 records",
    ]
    every = validate("day1.jsonl", "--all", cwd=tmp_path)
    assert every.returncode == 1
    assert len(every.stdout.splitlines()) == 4000
    assert every.stdout.splitlines()[:2] == [f"day1.jsonl:1: {missing}", f"day1.jsonl:2: {missing}"]


def test_json_array_file_is_validated_element_by_element(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('[{"topic":"t","body":"a"},\n {"topic":"t"}, {"body":"b"}]')
    done = validate("a.json", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "a.json:2:2: body is missing",
        "a.json:2:17: topic is missing and no default topic (--topic) is given",
        "2 problems in 3 records",
    ]


def test_one_problem_one_record() -> None:
    done = validate("-", stdin=b'{"body":"no topic"}\n')
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "-:1: topic is missing and no default topic (--topic) is given",
        "1 problem in 1 record",
    ]


def test_stdin_format_and_topic_flags() -> None:
    done = validate("-", "--format", "csv", "--topic", "t", stdin=b"body\nhello\n")
    assert (done.returncode, done.stdout) == (0, "0 problems in 1 record\n")


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("missing.jsonl", None, "No such file or directory"),
        ("adir", "dir", "Is a directory"),
        ("notes.txt", "{}", "unknown input format"),
        ("fake.jsonl.gz", "plain text", "not a gzip file"),
    ],
)
def test_unopenable_input_exits_2_with_one_line(
    tmp_path: Path, name: str, make: str | None, message: str
) -> None:
    (tmp_path / "ok.jsonl").write_text('{"topic":"t","body":"a"}\n')
    if make == "dir":
        (tmp_path / name).mkdir()
    elif make is not None:
        (tmp_path / name).write_text(make)
    done = validate("ok.jsonl", name, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""  # checked before anything is read
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("bulksend: error: ")
    assert message in done.stderr


def test_usage_error_exits_2() -> None:
    done = validate("-", "--format", "xml")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_corrupt_gzip_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    data = b"".join(
        b'{"topic":"t","body":"%d %s"}\n' % (i, os.urandom(6).hex().encode()) for i in range(5000)
    )
    packed = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) * 2 // 3])
    done = validate("cut.jsonl.gz", cwd=tmp_path)
    assert done.returncode == 1
    problems = done.stdout.splitlines()[:-1]
    assert len(problems) == 1
    assert "gzip data is corrupt" in problems[0]


def test_binary_garbage_is_problems_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "junk.jsonl").write_bytes(os.urandom(20000))
    (tmp_path / "junk.csv").write_bytes(b"topic,body\n" + os.urandom(20000))
    done = validate("junk.jsonl", "junk.csv", "--all", cwd=tmp_path)
    assert done.returncode == 1
    *problems, count = done.stdout.splitlines()
    assert all(line.startswith(("junk.jsonl:", "junk.csv:")) for line in problems)
    assert count.startswith(f"{len(problems)} problems in ")


def test_shipped_examples_are_valid() -> None:
    done = validate(str(EXAMPLES / "messages.jsonl"), str(EXAMPLES / "messages.csv"))
    assert done.returncode == 0, done.stdout
    assert done.stdout.endswith(" records\n")


@pytest.mark.slow
def test_million_lines_stream_in_bounded_memory(tmp_path: Path) -> None:
    """1,000,000 lines (~80 MB) through validate: peak RSS of that process under 100 MB."""
    path = tmp_path / "big.jsonl"
    block = b"".join(
        b'{"topic":"demo","body":"message %06d of a long replay","keys":"k%d"}\n' % (i, i % 97)
        for i in range(10_000)
    )
    bad = b'{"topic":"demo","body":null}\n'
    with path.open("wb") as f:
        for _ in range(100):  # the last line of every block is swapped for a bad one
            f.write(block[: block.rindex(b"\n", 0, -1) + 1] + bad)
    out_path = tmp_path / "out.txt"
    started = time.monotonic()
    code, peak_mb, stderr = run_measuring_peak_rss(
        [sys.executable, "-m", "bulksend", "validate", str(path)], out_path, timeout=120
    )
    elapsed = time.monotonic() - started
    assert "Traceback" not in stderr, stderr
    lines = out_path.read_text().splitlines()
    assert code == 1
    assert lines == [
        "100 records: body is null",
        *(f"  {path}:{n}: body is null" for n in (10000, 20000, 30000)),
        "  ... and 97 more",
        "100 problems in 1,000,000 records",
    ]
    assert peak_mb < 100, f"peak RSS {peak_mb:.0f} MB"
    print(f"1M lines: peak RSS {peak_mb:.1f} MB, validate took {elapsed:.1f} s")
