"""What any run on a ledger does with the ``OUT.parts/`` a distributed run left beside it
(its driver killed): a ``--resume`` finishes that run first, with or without
``--workers``; ``--overwrite`` drops the parts; a plain run is refused. And a merge cut
short is undone on the files it was appending to, from whatever directory the resume
runs in. No Dask here: a shard's pipeline writes the part in this process."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from pathlib import Path

import orjson
import pytest

from bulksend.config import Credentials, RetryPolicy, SendOptions, Target
from bulksend.errors import LedgerError
from bulksend.ledger import write_fingerprints
from bulksend.merge import Parts, merge_parts, recover
from bulksend.shard_task import ShardTask, run_shard_async
from bulksend.shards import ShardPlan
from tests.cli_helpers import bulksend, read_jsonl, target, write_jsonl
from tests.serve_helpers import INSTANCE_ID, PROJECT_ID, messages_path, start_server_subprocess

N = 120


def _killed_distributed_run(tmp_path: Path, url: str) -> tuple[Path, Path, Path]:
    """An input, its ledger and the parts a killed ``--workers 2`` driver leaves: shard 0
    of 2 finished its records and wrote them to its part; shard 1 never began; the
    ledger holds only the driver's run line."""
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": f"m{i}"} for i in range(N)])
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"status":"run","at":0,"command":"send","settings":{"workers":2}}\n')
    write_fingerprints(str(out), [str(inputs)])  # as the driver does before any shard runs
    parts = Parts(f"{out}.parts")
    parts.create()
    task = ShardTask(
        index=0,
        plan=ShardPlan(2),
        inputs=(str(inputs),),
        fmt=None,
        topic=None,
        target=Target(url, PROJECT_ID, INSTANCE_ID),
        credentials=Credentials(),
        options=SendOptions(concurrency=8, retry=RetryPolicy(backoff_base=0.01)),
        total_rate=0.0,
        epoch=0.0,
        part=parts.ledger(0, 2),
        failed_part=parts.failed(0, 2),
        previous=None,
    )
    report = asyncio.run(run_shard_async(task))
    assert report.error is None and report.stats.counts == {"ok": N // 2}
    return inputs, out, Path(parts.directory)


def _stored_bodies(url: str) -> Counter[str]:
    query = f"{url}{messages_path()}?topic=t&limit=10000&start_time=0&end_time={2**53}"
    with urllib.request.urlopen(query, timeout=30) as answer:
        listing = orjson.loads(answer.read())
    return Counter(m["body"] for m in listing["messages"])


def test_a_single_process_resume_finishes_the_distributed_run_first(tmp_path: Path) -> None:
    with start_server_subprocess() as (_, url):
        inputs, out, parts = _killed_distributed_run(tmp_path, url)
        done = bulksend("send", str(inputs), *target(url), "--out", str(out), "--resume")
        stored = _stored_bodies(url)
    assert done.returncode == 0, done.stderr
    assert f"merged {N // 2} results a previous run left in {parts}" in done.stderr
    # Each record once at the server: the shard's were not sent again.
    assert stored == Counter(f"m{i}" for i in range(N))
    lines = read_jsonl(out)
    assert Counter(x["seq"] for x in lines) == Counter(range(N))
    assert {x["status"] for x in lines} == {"ok"}
    assert sum("shard" in x for x in lines) == N // 2
    assert not parts.exists()


def test_a_plain_run_is_refused_and_overwrite_drops_the_parts(tmp_path: Path) -> None:
    with start_server_subprocess() as (_, url):
        inputs, out, parts = _killed_distributed_run(tmp_path, url)
        out.write_bytes(b"")  # the ledger emptied by hand: the parts still hold results
        kept = sorted(p.read_bytes() for p in parts.iterdir())
        refused = bulksend("send", str(inputs), *target(url), "--out", str(out))
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"bulksend: error: {parts} holds the results of an unfinished run: add --resume to"
            " continue it, or --overwrite to start again"
        )
        assert sorted(p.read_bytes() for p in parts.iterdir()) == kept
        assert _stored_bodies(url).total() == N // 2  # nothing sent
        again = bulksend("send", str(inputs), *target(url), "--out", str(out), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not parts.exists()
    assert sorted(x["seq"] for x in read_jsonl(out)) == list(range(N))


def _line(seq: int) -> bytes:
    return orjson.dumps({"seq": seq, "status": "ok"}, option=orjson.OPT_APPEND_NEWLINE)


def test_a_merge_cut_short_is_undone_on_its_own_files_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, other = tmp_path / "a", tmp_path / "b"
    run_dir.mkdir()
    other.mkdir()
    (run_dir / "out.jsonl").write_bytes(_line(7))
    bystander = other / "out.jsonl"
    bystander.write_bytes(_line(100) * 50)
    parts = Parts(str(run_dir / "out.jsonl.parts"))
    parts.create()
    Path(parts.ledger(0, 2)).write_bytes(_line(0) + _line(2))
    # Shard 1's part holds a line that stops the merge after shard 0's lines went in,
    # as a driver killed in the middle of a merge leaves it.
    Path(parts.ledger(1, 2)).write_bytes(_line(1) + b"not a result\n")
    monkeypatch.chdir(run_dir)
    with pytest.raises(LedgerError, match="not a results line"):
        merge_parts(parts, out="out.jsonl", failed=None)
    assert (run_dir / "out.jsonl").read_bytes().count(b"\n") == 3  # 7, then 0 and 2
    monkeypatch.chdir(other)
    assert recover(parts) is True
    assert (run_dir / "out.jsonl").read_bytes() == _line(7)
    assert bystander.read_bytes() == _line(100) * 50


def test_files_bulksend_did_not_write_in_the_parts_directory_are_left_alone(
    tmp_path: Path,
) -> None:
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "b"}] * 3)
    out = tmp_path / "out.jsonl"
    parts = tmp_path / "out.jsonl.parts"
    (parts / "sub").mkdir(parents=True)
    (parts / "notes.txt").write_text("precious")
    for flags in ([], ["--overwrite"], ["--resume"], ["--workers", "1"]):
        proc = bulksend("send", str(inputs), "--embedded", "--out", str(out), *flags)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1] == (
            f"bulksend: error: {parts} holds files bulksend did not write there (notes.txt,"
            " sub): move them away, or give another --out"
        )
    assert (parts / "notes.txt").read_text() == "precious" and (parts / "sub").is_dir()


def test_a_part_line_that_is_not_a_result_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    parts = Parts(f"{out}.parts")
    parts.create()
    Path(parts.ledger(7, 9)).write_bytes(b'{"seq":1,"identity":"zzz","status":"ok"}\n{"foo":1}\n')
    with pytest.raises(LedgerError, match="holds a line that is not a results line"):
        merge_parts(parts, out=str(out), failed=None)


def test_a_load_left_parts_is_told_overwrite_not_resume(tmp_path: Path) -> None:
    """``load`` has no --resume: the refusal names only what it has."""
    out = tmp_path / "load.jsonl"
    parts = Parts(f"{out}.parts")
    parts.create()
    Path(parts.ledger(0, 2)).write_bytes(_line(0))
    args = ["load", "--embedded", "--rate", "50", "--duration", "1s", "--out", str(out)]
    refused = bulksend(*args)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"bulksend: error: {parts.directory} holds the results of an unfinished run:"
        " add --overwrite to start again"
    )
    again = bulksend(*args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not Path(parts.directory).exists()


def test_a_refusal_over_the_parts_leaves_the_ledger_as_it_was(tmp_path: Path) -> None:
    """--overwrite would empty the ledger; refused over the parts directory, it has not."""
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"topic": "t", "body": "b"}] * 3)
    out = tmp_path / "out.jsonl"
    out.write_bytes(_line(0) + _line(1))
    (tmp_path / "out.jsonl.parts").mkdir()
    (tmp_path / "out.jsonl.parts" / "notes.txt").write_text("precious")
    proc = bulksend("send", str(inputs), "--embedded", "--out", str(out), "--overwrite")
    assert proc.returncode == 2 and "holds files bulksend did not write" in proc.stderr
    assert out.read_bytes() == _line(0) + _line(1)
