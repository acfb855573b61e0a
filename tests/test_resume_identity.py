"""Inputs that are read once, and record identity across runs: the CLI as a subprocess
against ``bulksend serve`` on loopback.

Pipes, FIFOs and ``/dev/stdin`` give every record (nothing reads them before the reader),
and a resume over one is refused. A record is known across runs by its input's canonical
path and its first line, so repeated ids never merge two records and another spelling of
a path never re-sends a file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulksend.ledger import fingerprint
from tests.cli_helpers import bulksend, no_traceback, read_jsonl, target, write_jsonl
from tests.serve_helpers import start_server_subprocess
from tests.test_reliability import FAST, accepted, listed, wait_for_lines


def msgs(n: int, ids: int | None = None) -> list[dict[str, Any]]:
    """n records; with ``ids``, their ids repeat every ``ids`` records."""
    return [
        {"topic": "orders", "body": f"m{i}", **({"id": f"order-{i % ids}"} if ids else {})}
        for i in range(n)
    ]


_children: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_child_left_behind() -> Iterator[None]:
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def feed_fifo(fifo: Path, data: bytes) -> subprocess.Popen[bytes]:
    """A writer process that opens the FIFO (blocking until bulksend opens it) and writes
    ``data``; a reader that leaves early is not its error."""
    code = (
        "import sys\n"
        "try:\n"
        "    with open(sys.argv[1], 'wb') as f:\n"
        "        f.write(sys.stdin.buffer.read())\n"
        "except BrokenPipeError:\n"
        "    pass\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(fifo)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    _children.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    return proc


def ok_seqs(out: Path) -> Counter[int]:
    return Counter(r["seq"] for r in read_jsonl(out) if r["status"] == "ok")


def jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


# --- inputs read once -------------------------------------------------------------------------


def test_fifo_input_is_read_once_and_every_record_sent(tmp_path: Path) -> None:
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "ledger.jsonl"
    writer = feed_fifo(fifo, jsonl_bytes(msgs(1000)))
    done = bulksend("send", str(fifo), "--embedded", "--out", str(out), "--quiet", timeout=60)
    assert done.returncode == 0, done.stderr
    assert writer.wait(timeout=30) == 0
    assert ok_seqs(out) == Counter(range(1000))
    sidecar = orjson.loads(Path(f"{out}.inputs.json").read_bytes())
    assert sidecar["inputs"] == {}  # a FIFO has no fingerprint: never opened a second time


def test_process_substitution_is_read_once(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", msgs(1000))
    out = tmp_path / "ledger.jsonl"
    cmd = (
        f"{sys.executable} -m bulksend send <(head -700 {data}) --format jsonl --embedded "
        f"--out {out} --quiet"
    )
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ok_seqs(out) == Counter(range(700))


@pytest.mark.parametrize("path", ["-", "/dev/stdin"])
def test_stdin_is_read_once_and_every_record_sent(tmp_path: Path, path: str) -> None:
    out = tmp_path / "ledger.jsonl"
    done = bulksend(
        "send", path, "--format", "jsonl", "--embedded", "--out", str(out), "--quiet",
        stdin=jsonl_bytes(msgs(500)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ok_seqs(out) == Counter(range(500))


@pytest.mark.parametrize("path", ["-", "/dev/stdin"])
def test_resume_over_stdin_is_refused(tmp_path: Path, path: str) -> None:
    out = tmp_path / "ledger.jsonl"
    first = bulksend(
        "send", path, "--format", "jsonl", "--embedded", "--out", str(out), "--quiet",
        stdin=jsonl_bytes(msgs(20)),
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    # Different content on stdin: a resume would skip records it never saw.
    again = bulksend(
        "send", path, "--format", "jsonl", "--embedded", "--out", str(out), "--resume",
        stdin=jsonl_bytes(msgs(20, ids=3)[::-1]),
    )  # fmt: skip
    assert again.returncode == 2 and no_traceback(again)
    assert len(again.stderr.strip().splitlines()) == 1
    assert "cannot --resume over" in again.stderr and "read only once" in again.stderr
    assert out.read_bytes() == before


def test_resume_over_a_fifo_is_refused(tmp_path: Path) -> None:
    data = jsonl_bytes(msgs(50))
    (tmp_path / "in.jsonl").write_bytes(data)
    out = tmp_path / "ledger.jsonl"
    first = bulksend("send", str(tmp_path / "in.jsonl"), "--embedded", "--out", str(out))
    assert first.returncode == 0, first.stderr
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    feed_fifo(fifo, data)
    again = bulksend("send", str(fifo), "--embedded", "--out", str(out), "--resume", timeout=60)
    assert again.returncode == 2 and no_traceback(again)
    assert f"cannot --resume over {fifo}: it is a pipe or FIFO" in again.stderr


# --- identity -----------------------------------------------------------------------------------


def test_repeated_ids_are_distinct_records_across_kill_9_and_resume(tmp_path: Path) -> None:
    n, concurrency = 4000, 16
    data = write_jsonl(tmp_path / "in.jsonl", msgs(n, ids=n // 2))
    out = tmp_path / "ledger.jsonl"
    args = [str(data), "--out", str(out), "--concurrency", str(concurrency), "--resume", *FAST]
    with start_server_subprocess("--latency", "2") as (_, url):
        proc = subprocess.Popen(
            [sys.executable, "-m", "bulksend", "send", *args, *target(url)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _children.append(proc)
        wait_for_lines(out, 2500, deadline_s=60)  # past the first of each repeated id
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        final = bulksend("send", *args, *target(url))
        assert final.returncode == 0, final.stderr
        total = accepted(url)
    assert ok_seqs(out) == Counter(range(n))  # every record ok exactly once
    assert n <= total <= n + concurrency


def test_another_spelling_of_the_path_resends_nothing(tmp_path: Path) -> None:
    n = 300
    write_jsonl(tmp_path / "day1.jsonl", msgs(n))
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "day1.jsonl")
    out = "ledger.jsonl"
    with start_server_subprocess() as (_, url):
        first = bulksend(
            "send", "day1.jsonl", *target(url), "--out", out, "--quiet", cwd=str(tmp_path)
        )
        assert first.returncode == 0, first.stderr
        for spelling in ["./day1.jsonl", str(tmp_path / "day1.jsonl"), "link.jsonl",
                         "../" + tmp_path.name + "/day1.jsonl"]:  # fmt: skip
            again = bulksend(
                "send", spelling, *target(url), "--out", out, "--resume", "--quiet",
                "--stats", "s.json", cwd=str(tmp_path),
            )  # fmt: skip
            assert again.returncode == 0, (spelling, again.stderr)
            stats = orjson.loads((tmp_path / "s.json").read_bytes())
            assert (stats["skipped"], stats["ok"]) == (n, 0), spelling
        assert accepted(url) == n
    assert ok_seqs(tmp_path / out) == Counter(range(n))


def test_the_same_file_twice_in_one_run_is_two_sets_of_records(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "a.jsonl", msgs(100, ids=100))
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess() as (_, url):
        first = bulksend(
            "send", str(data), f"{tmp_path}/./a.jsonl", *target(url), "--out", str(out)
        )
        assert first.returncode == 0, first.stderr
        again = bulksend(
            "send", str(data), str(data), *target(url), "--out", str(out), "--resume", "--quiet"
        )
        assert again.returncode == 0, again.stderr
        assert accepted(url) == 200
    lines = read_jsonl(out)
    assert len(lines) == 200 and len({r["identity"] for r in lines}) == 200
    assert ok_seqs(out) == Counter(range(200))


def test_a_ledger_from_before_identities_resumes_by_canonical_source(tmp_path: Path) -> None:
    """Old lines have no identity and old sidecars are keyed by the path as typed: both are
    read through the canonical path, so a resume under another spelling skips them."""
    n = 50
    data = write_jsonl(tmp_path / "day1.jsonl", msgs(n, ids=5))
    out = tmp_path / "ledger.jsonl"
    old = [
        {"seq": i, "source": f"day1.jsonl:{i + 1}", "id": f"order-{i % 5}", "status": "ok",
         "http_status": 200, "msg_id": f"M{i}", "attempts": 1}
        for i in range(30)
    ]  # fmt: skip
    out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in old))
    Path(f"{out}.inputs.json").write_bytes(
        orjson.dumps({"inputs": {"day1.jsonl": fingerprint(str(data))}})
    )
    with start_server_subprocess() as (_, url):
        again = bulksend(
            "send", "./day1.jsonl", *target(url), "--out", str(out), "--resume", "--quiet",
            cwd=str(tmp_path),
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert accepted(url) == n - 30
    assert ok_seqs(out) == Counter(range(n))
    data.write_bytes(data.read_bytes() + b'{"topic":"orders","body":"new"}\n')
    changed = bulksend(
        "send", "./day1.jsonl", "--embedded", "--out", str(out), "--resume", cwd=str(tmp_path)
    )
    assert changed.returncode == 2 and "changed since" in changed.stderr


# --- exact bodies -------------------------------------------------------------------------------


def test_non_string_bodies_reach_the_server_as_written(tmp_path: Path) -> None:
    bodies = [
        "123456789012345678901234567890",
        "1E2",
        '{"price":19.990,"qty":18446744073709551616,"b":1,"a":[true,null,"x  y"]}',
    ]
    data = tmp_path / "in.jsonl"
    data.write_text(
        "".join(f'{{"topic":"exact","body": {b},"id":{n}}}\n' for n, b in
                zip(["1E2", "123456789012345678901234567890", "7"], bodies, strict=True))
    )  # fmt: skip
    out = tmp_path / "ledger.jsonl"
    with start_server_subprocess() as (_, url):
        done = bulksend("send", str(data), *target(url), "--out", str(out), "--key-from-id")
        assert done.returncode == 0, done.stderr
        stored = listed(url, topic="exact")
    ids = ["1E2", "123456789012345678901234567890", "7"]
    assert {m["body"]: m["property_list"] for m in stored} == {
        b: [{"name": "KEYS", "value": k}] for b, k in zip(bodies, ids, strict=True)
    }
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(ids)


# --- what a resume checks before it skips anything --------------------------------------------


def _sent_embedded(tmp_path: Path) -> tuple[Path, Path]:
    """in.jsonl (20 records) sent whole with --embedded into l.jsonl: (input, ledger)."""
    data = tmp_path / "in.jsonl"
    data.write_bytes(jsonl_bytes(msgs(20)))
    out = tmp_path / "l.jsonl"
    first = bulksend("send", str(data), "--embedded", "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    return data, out


def _resume_embedded(data: Path, out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return bulksend(
        "send", str(data), "--embedded", "--out", str(out), "--resume", "--quiet", *more
    )


def test_a_resume_without_the_inputs_fingerprint_is_refused_unless_forced(tmp_path: Path) -> None:
    # The ledger copied or moved without its .inputs.json: line numbers were trusted
    # blindly, and a line added at the top was never sent (and another sent twice).
    data, out = _sent_embedded(tmp_path)
    (tmp_path / "l.jsonl.inputs.json").unlink()
    # A run line written before fingerprints were kept in it: nothing left to compare.
    lines = out.read_bytes().splitlines(keepends=True)
    run = orjson.loads(lines[0])
    run.pop("fingerprints", None)
    out.write_bytes(orjson.dumps(run) + b"\n" + b"".join(lines[1:]))
    data.write_bytes(jsonl_bytes([{"topic": "orders", "body": "NEW-FIRST"}, *msgs(20)]))
    refused = _resume_embedded(data, out)
    assert refused.returncode == 2 and no_traceback(refused), refused.stderr
    assert "no fingerprint" in refused.stderr and "--force" in refused.stderr
    forced = _resume_embedded(data, out, "--force")
    assert forced.returncode == 0, forced.stderr


def test_the_ledger_carries_its_fingerprints_in_its_run_line(tmp_path: Path) -> None:
    # Without the sidecar, the run line still says what the inputs were: an edit is caught.
    data, out = _sent_embedded(tmp_path)
    (tmp_path / "l.jsonl.inputs.json").unlink()
    again = _resume_embedded(data, out)
    assert again.returncode == 0, again.stderr  # same file: resumes, all skipped
    data.write_bytes(jsonl_bytes([{"topic": "orders", "body": "NEW-FIRST"}, *msgs(20)]))
    (tmp_path / "l.jsonl.inputs.json").unlink()
    refused = _resume_embedded(data, out)
    assert refused.returncode == 2 and "changed since" in refused.stderr, refused.stderr


def test_a_moved_input_is_not_taken_for_a_new_one(tmp_path: Path) -> None:
    # Identities go by path: `mv in.jsonl archive/` then a resume naming the new path sent
    # every record again. Its fingerprint is the old path's: that says what happened.
    data, out = _sent_embedded(tmp_path)
    (tmp_path / "archive").mkdir()
    moved = tmp_path / "archive" / "in.jsonl"
    data.rename(moved)
    refused = _resume_embedded(moved, out)
    assert refused.returncode == 2 and no_traceback(refused), refused.stderr
    assert str(data) in refused.stderr and "--force" in refused.stderr
    assert len(read_jsonl(out)) == 20  # nothing sent


def test_a_resume_to_another_target_is_refused_unless_forced(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    data.write_bytes(jsonl_bytes(msgs(20)))
    out = tmp_path / "l.jsonl"
    with start_server_subprocess() as (_, url):
        first = bulksend("send", str(data), *target(url), "--out", str(out), "--quiet")
        assert first.returncode == 0, first.stderr
        other = [*target(url)]
        other[other.index("--instance-id") + 1] = "another-instance"
        refused = bulksend("send", str(data), *other, "--out", str(out), "--resume", "--quiet")
        assert refused.returncode == 2 and no_traceback(refused), refused.stderr
        assert "another-instance" in refused.stderr and "--force" in refused.stderr
        forced = bulksend(
            "send", str(data), *other, "--out", str(out), "--resume", "--force", "--quiet"
        )
        assert forced.returncode == 0, forced.stderr
        # The latest run's target is the one a resume keeps to.
        again = bulksend("send", str(data), *other, "--out", str(out), "--resume", "--quiet")
        assert again.returncode == 0, again.stderr


def test_a_resume_that_leaves_an_input_out_says_so(tmp_path: Path) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_bytes(jsonl_bytes(msgs(5)))
    two.write_bytes(jsonl_bytes(msgs(5)))
    out = tmp_path / "l.jsonl"
    first = bulksend("send", str(one), str(two), "--embedded", "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    again = bulksend("send", str(one), "--embedded", "--out", str(out), "--resume", "--quiet")
    assert again.returncode == 0, again.stderr
    assert f"was begun with {two} too, which this run does not read" in again.stderr
