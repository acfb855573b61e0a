"""``--out s3://...`` for ``send --workers``: the shards upload their ledger parts as
segments, the driver merges them into the one ledger object. Against moto's S3 server
and a real ``bulksend serve`` on 127.0.0.1: every record once in the merged object and at
the server; a non-empty object refused untouched; a driver killed with SIGKILL mid-run,
then ``--resume``: every record once, re-sends within the bound README states (one
segment interval of sends, plus the requests in flight); a worker stopped (SIGSTOP) past
the scheduler's TTL and woken once its shard runs again: the lost attempt's late upload
and the new attempt's both kept, the run ends normally, every record once; an abandoned
run's summary counts the uploaded segments."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.cli_helpers import bulksend, target
from tests.s3_helpers import BUCKET, moto_s3
from tests.s3_helpers import jsonl as _jsonl
from tests.s3_helpers import put as _put
from tests.serve_helpers import messages_path, start_server_subprocess

pytestmark = pytest.mark.slow
pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is in the test extra")
pytest.importorskip("moto.server", reason="moto[server] is in the test extra")

S3 = tuple[dict[str, str], Any]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with moto_s3() as found:
        yield found


def _stored(url: str) -> dict[str, Any]:
    query = f"{url}{messages_path()}?topic=t&limit=10000&start_time=0&end_time={2**53}"
    with urllib.request.urlopen(query, timeout=30) as answer:
        return dict(orjson.loads(answer.read()))


def _objects(fs: Any, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.find(f"{BUCKET}/{prefix}"))


def _results(fs: Any, key: str) -> list[dict[str, Any]]:
    fs.invalidate_cache()
    lines = (orjson.loads(x) for x in fs.cat_file(f"{BUCKET}/{key}").splitlines())
    return [x for x in lines if x.get("status") != "run"]


def _uploaded_lines(fs: Any, key: str) -> int:
    """Result lines in the shards' uploaded segments so far."""
    total = 0
    for path in _objects(fs, f"{key}.parts/"):
        if "/shard-" in path and path.endswith(".jsonl"):
            data = fs.cat_file(path)
            total += data.count(b"\n") - data.count(b'{"status":"run",')
    return total


def test_workers_2_write_the_ledger_to_s3_once_each(tmp_path: Path, s3: S3) -> None:
    env, fs = s3
    n = 3000
    source = _put(fs, "in-once.jsonl", _jsonl(0, n))
    out, failed = f"s3://{BUCKET}/once/out.jsonl", f"s3://{BUCKET}/once/failed.jsonl"
    stats, html = f"s3://{BUCKET}/once/stats.json", f"s3://{BUCKET}/once/report.html"
    with start_server_subprocess() as (_, url):
        proc = bulksend(
            "send", source, *target(url), "--workers", "2", "--concurrency", "8",
            "--out", out, "--failed", failed, "--stats", stats, "--html", html, "--quiet",
            env=env, timeout=180,
        )  # fmt: skip
        stored = _stored(url)
    assert proc.returncode == 0, proc.stderr
    lines = _results(fs, "once/out.jsonl")
    assert Counter(x["seq"] for x in lines) == Counter(range(n))  # each record once
    assert {x["status"] for x in lines} == {"ok"} and {x["shard"] for x in lines} == {0, 1}
    assert stored["total"] == n and len({m["body"] for m in stored["messages"]}) == n
    figures = orjson.loads(fs.cat_file(f"{BUCKET}/once/stats.json"))
    assert (figures["total"], figures["ok"]) == (n, n)
    assert fs.cat_file(f"{BUCKET}/once/failed.jsonl") == b""
    assert b"<html" in fs.cat_file(f"{BUCKET}/once/report.html")[:200].lower()
    # The parts and the lock are gone; the inputs' fingerprints stay for --resume.
    assert _objects(fs, "once/") == sorted(
        f"{BUCKET}/once/{k}" for k in ("out.jsonl", "out.jsonl.inputs.json", "failed.jsonl",
                                       "stats.json", "report.html")
    )  # fmt: skip

    again = bulksend(
        "send", source, *target(url), "--workers", "2", "--out", out, "--resume", "--quiet",
        env=env, timeout=180,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert Counter(x["seq"] for x in _results(fs, "once/out.jsonl")) == Counter(range(n))

    # bulksend report reads the merged object where it is.
    report = bulksend("report", out, "--json", env=env)
    assert report.returncode == 0, report.stderr
    assert orjson.loads(report.stdout)["ok"] == n
    missing = bulksend("report", f"s3://{BUCKET}/once/nothing.jsonl", env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr


def test_a_non_empty_out_object_is_refused_untouched(tmp_path: Path, s3: S3) -> None:
    env, fs = s3
    source = _put(fs, "in-refused.jsonl", _jsonl(0, 10))
    out = _put(fs, "refused/out.jsonl", b'{"seq":0,"status":"ok"}\n')
    before = fs.info(f"{BUCKET}/refused/out.jsonl")["ETag"]
    proc = bulksend("send", source, "--embedded", "--workers", "2", "--out", out, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "add --resume to continue it" in proc.stderr
    fs.invalidate_cache()
    assert fs.info(f"{BUCKET}/refused/out.jsonl")["ETag"] == before
    assert _objects(fs, "refused/") == [f"{BUCKET}/refused/out.jsonl"]  # no lock left

    # A ledger another live run holds: refused, the holder named.
    import socket

    lock = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": 0})
    _put(fs, "held/out.jsonl.lock", lock)
    held = bulksend("send", source, "--embedded", "--workers", "2", "--out",
                    f"s3://{BUCKET}/held/out.jsonl", env=env)  # fmt: skip
    assert held.returncode == 2 and f"is in use by pid {os.getpid()}" in held.stderr
    assert held.stderr.count("\n") == 1
    assert fs.cat_file(f"{BUCKET}/held/out.jsonl.lock") == lock

    # One process: refused in one line, nothing written.
    single = bulksend("send", source, "--embedded", "--out", f"s3://{BUCKET}/single.jsonl", env=env)
    assert single.returncode == 2, single.stderr
    assert single.stderr.count("\n") == 1 and "only from send --workers/--cluster" in single.stderr
    assert _objects(fs, "single") == []


def test_resume_after_the_driver_is_killed_resends_within_one_interval(
    tmp_path: Path, s3: S3
) -> None:
    env, fs = s3
    n, rate, concurrency, interval = 3000, 500, 8, 0.5
    source = _put(fs, "in-killed.jsonl", _jsonl(0, n))
    out = f"s3://{BUCKET}/killed/out.jsonl"
    with start_server_subprocess() as (_, url):
        args = ["send", source, *target(url), "--workers", "2", "--out", out, "--quiet"]
        args += ["--concurrency", str(concurrency), "--segment-interval", str(interval)]
        driver = subprocess.Popen(
            [sys.executable, "-m", "bulksend", *args, "--rate", str(rate)],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the driver and its worker processes: one group
        )
        try:
            deadline = time.monotonic() + 90
            while _uploaded_lines(fs, "killed/out.jsonl") < n // 3:
                assert time.monotonic() < deadline and driver.poll() is None
                time.sleep(0.1)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        uploaded = _uploaded_lines(fs, "killed/out.jsonl")
        sent_before = _stored(url)["total"]
        stats = tmp_path / "stats.json"
        resumed = bulksend(*args, "--resume", "--stats", str(stats), env=env, timeout=180)
        stored = _stored(url)
    assert resumed.returncode == 0, resumed.stderr
    # The uploaded lines were merged first, and their records skipped.
    figures = orjson.loads(stats.read_bytes())
    assert figures["skipped"] >= uploaded and figures["skipped"] + figures["ok"] == n
    lines = _results(fs, "killed/out.jsonl")
    assert Counter(x["seq"] for x in lines) == Counter(range(n))  # each record ok once
    assert {x["status"] for x in lines} == {"ok"}
    assert len({m["body"] for m in stored["messages"]}) == n
    resent = stored["total"] - n
    # What the kill cost: the lines not uploaded yet (one interval of sends, and the
    # upload in progress) and the requests in flight, over both shards.
    bound = rate * 2 * interval + 2 * concurrency
    print(
        f"\nuploaded {uploaded} of {sent_before} sent at the kill; re-sent {resent}, bound {bound}"
    )
    assert resent <= bound
    assert _objects(fs, "killed/out.jsonl.parts") == []


def test_a_resume_removes_parts_the_ledger_already_holds(s3_here: S3) -> None:
    """A driver killed after uploading the merged ledger, before removing its parts: the
    resume sees the ledger name that generation, and drops it instead of merging twice."""
    from bulksend.remote import RemoteLedger

    _, fs = s3_here
    gen = "run-1764556800000-abcdef"
    run = orjson.dumps({"status": "run", "at": 1, "command": "send", "settings": {"parts": gen}})
    line = orjson.dumps({"seq": 0, "identity": "x:1", "status": "ok", "shard": 0})
    out = _put(fs, "window/out.jsonl", run + b"\n" + line + b"\n")
    _put(fs, f"window/out.jsonl.parts/{gen}/run.jsonl", run + b"\n")
    seg = "shard-0000-of-0001/attempt-1764556800000-000000/seg-000000.jsonl"
    _put(fs, f"window/out.jsonl.parts/{gen}/{seg}", line + b"\n")
    remote = RemoteLedger(out, None, resume=True, overwrite=False)
    try:
        remote.open()
        assert remote.merge_left() == 0
        assert Path(remote.ledger).read_bytes().count(b"\n") == 2
    finally:
        remote.close()
    assert _objects(fs, "window/") == [f"{BUCKET}/window/out.jsonl"]


@pytest.fixture
def s3_here(s3: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    """The moto server, for bulksend code run in this process."""
    import fsspec.config

    env, fs = s3
    # fsspec read FSSPEC_S3_* when it was imported: its config is set here instead.
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]})
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    return env, fs


async def test_a_shard_run_again_resumes_from_its_uploaded_segments(
    tmp_path: Path, s3_here: S3
) -> None:
    """A lost worker's shard, run again: it downloads the segments its first attempt
    uploaded, sends only the records they lack, and uploads the rest after them."""
    from bulksend.config import Credentials, RetryPolicy, SendOptions, Target
    from bulksend.identity import input_key
    from bulksend.shard_task import ShardTask, run_shard_async
    from bulksend.shards import ShardPlan
    from tests.serve_helpers import INSTANCE_ID, PROJECT_ID, start_server_inprocess

    _, fs = s3_here
    n = 200
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(_jsonl(0, n))
    key = input_key(str(inputs))
    prefix = "rerun/out.jsonl.parts/run-1764556800000-abcdef/shard-0000-of-0001"
    first = f"{prefix}/attempt-1764556800000-000000"  # its lost first attempt's
    earlier = b"".join(
        orjson.dumps({"seq": s, "source": f"{inputs}:{s + 1}", "id": None,
                      "identity": f"{key}:{s + 1}", "status": "ok"}) + b"\n"
        for s in range(60)
    )  # fmt: skip
    _put(fs, f"{first}/seg-000000.jsonl", earlier)
    async with start_server_inprocess() as server:
        task = ShardTask(
            index=0, plan=ShardPlan(1), inputs=(str(inputs),), fmt=None, topic=None,
            target=Target(server.url, PROJECT_ID, INSTANCE_ID), credentials=Credentials(),
            options=SendOptions(concurrency=8, retry=RetryPolicy(backoff_base=0.01)),
            total_rate=0.0, epoch=0.0, part=str(tmp_path / "shard-0000-of-0001.jsonl"),
            failed_part=None, previous=None, segments=f"s3://{BUCKET}/{prefix}",
        )  # fmt: skip
        report = await run_shard_async(task)
        stored = sorted(int(m.body[1:]) for m in await server.store.messages())
    assert report.error is None and report.resumed == 60
    assert stored == list(range(60, n))  # none of the uploaded ones again
    objects = _objects(fs, f"{prefix}/")
    segments = [o for o in objects if o.endswith(".jsonl")]
    assert segments[0] == f"{BUCKET}/{first}/seg-000000.jsonl" and len(segments) >= 2
    # The second attempt says what it resumed from: a merge needs it (see the next test).
    bases = [o for o in objects if o.endswith("/base.json")]
    assert [orjson.loads(fs.cat_file(b)) for b in bases] == [{first.rsplit("/", 1)[1]: 1}]
    lines = [orjson.loads(x) for s in segments for x in fs.cat_file(s).splitlines()]
    assert Counter(x["seq"] for x in lines if x["status"] != "run") == Counter(range(n))


def test_a_resume_cuts_the_failed_object_back_before_merging_again(s3_here: S3) -> None:
    """A driver killed after uploading --failed, before the ledger: the generation is not
    in the ledger, so it is merged again, onto the failed object as it was before."""
    from bulksend.remote import RemoteLedger

    _, fs = s3_here
    gen = "run-1764556800000-fedcba"
    run = orjson.dumps({"status": "run", "at": 1, "command": "send", "settings": {"parts": gen}})
    line = orjson.dumps({"seq": 0, "identity": "x:1", "status": "failed"})
    out = _put(fs, "cut/out.jsonl", b"")
    failed = _put(fs, "cut/failed.jsonl", b'{"before":1}\n{"x":1}\n')  # its merge uploaded
    parts = f"cut/out.jsonl.parts/{gen}"
    _put(fs, f"{parts}/run.jsonl", run + b"\n")
    attempt = "attempt-1764556800000-000000"
    _put(fs, f"{parts}/shard-0000-of-0001/{attempt}/seg-000000.jsonl", line + b"\n")
    _put(fs, f"{parts}/failed-0000-of-0001/{attempt}/seg-000000.jsonl", b'{"x":1}\n')
    _put(fs, f"{parts}/MERGING", orjson.dumps({"failed_size": len(b'{"before":1}\n')}))
    remote = RemoteLedger(out, failed, resume=True, overwrite=False)
    try:
        remote.open()
        assert remote.merge_left() == 1
    finally:
        remote.close()
    fs.invalidate_cache()
    assert fs.cat_file(f"{BUCKET}/cut/failed.jsonl") == b'{"before":1}\n{"x":1}\n'
    merged = fs.cat_file(f"{BUCKET}/cut/out.jsonl").splitlines()
    assert [orjson.loads(x).get("shard") for x in merged] == [None, 0]  # run line, result
    assert _objects(fs, "cut/") == [f"{BUCKET}/cut/failed.jsonl", f"{BUCKET}/cut/out.jsonl"]


def test_segments_come_back_in_order_past_one_fetch_batch(s3_here: S3) -> None:
    from bulksend.remote import FETCH_BATCH, ShardSegments

    _, fs = s3_here
    prefix = "order/out.jsonl.parts/run-1764556800000-012345/shard-0000-of-0001"
    count = FETCH_BATCH + 9
    for i in reversed(range(count)):  # written out of order: read back by number
        _put(fs, f"{prefix}/attempt-1764556800000-000000/seg-{i:06d}.jsonl", b"%d\n" % i)
    segments = ShardSegments(f"s3://{BUCKET}/{prefix}", None, ("part.jsonl", None))
    try:
        segments.download()
        with open(segments.part, "rb") as fh:
            assert fh.read().splitlines() == [b"%d" % i for i in range(count)]
        # This attempt's segments go under its own prefix, numbered from 0.
        assert segments.ledger.next == 0
        assert segments.ledger.uploaded == os.path.getsize(segments.part)
    finally:
        segments.close()


def test_the_uploading_hooks_forward_every_hook_of_the_shard() -> None:
    """The uploader wraps a shard's hooks: each of them must still reach the harness
    (a hook added to ``run.Hooks`` later must be forwarded too)."""
    from bulksend.remote import _UploadingHooks
    from bulksend.run import Hooks

    hooks = [n for n in vars(Hooks) if not n.startswith("_") and callable(getattr(Hooks, n))]
    assert "attempt_observers" in hooks
    assert [n for n in hooks if n not in vars(_UploadingHooks)] == []

    class Inner(Hooks):
        def attempt_observers(self) -> list[Any]:
            return ["mine"]

    async def ticker() -> None:
        return None

    assert _UploadingHooks(Inner(), ticker).attempt_observers() == ["mine"]


def _ledger_line(seq: int, status: str = "ok") -> bytes:
    return orjson.dumps(
        {"seq": seq, "source": f"in.jsonl:{seq + 1}", "id": None,
         "identity": f"k:{seq + 1}", "status": status}
    ) + b"\n"  # fmt: skip


def _failed_line(seq: int) -> bytes:
    return orjson.dumps({"topic": "t", "body": f"m{seq}", "_source": f"in.jsonl:{seq + 1}"}) + b"\n"


def _append(path: str | None, data: bytes) -> None:
    assert path is not None
    with open(path, "ab") as fh:
        fh.write(data)


def test_a_shard_run_again_while_its_lost_attempt_still_uploads(s3_here: S3) -> None:
    """Dask declared a worker lost while its process still ran (a partition, a GC pause,
    SIGSTOP): the shard ran again elsewhere and resumed from the segments it listed; then
    the lost attempt woke and uploaded what it had done since. Both attempts' uploads
    are kept, and the merge keeps one line per record: an ok one where either was ok,
    its --failed line only where the line kept is a failure."""
    from bulksend.remote import RemoteLedger

    _, fs = s3_here
    out, failed = f"s3://{BUCKET}/race/out.jsonl", f"s3://{BUCKET}/race/failed.jsonl"
    remote = RemoteLedger(out, failed, resume=False, overwrite=False)
    remote.open()  # the driver's lock and local copies, before any part
    try:
        _race(fs, remote)
    finally:
        remote.close()
    lines = _results(fs, "race/out.jsonl")
    assert Counter(x["seq"] for x in lines) == Counter(range(200))  # each record once
    assert {x["seq"] for x in lines if x["status"] != "ok"} == {77, 150}
    failed_lines = fs.cat_file(f"{BUCKET}/race/failed.jsonl").splitlines()
    assert sorted(orjson.loads(x)["body"] for x in failed_lines) == ["m150", "m77"]
    assert _objects(fs, "race/") == [f"{BUCKET}/race/failed.jsonl", f"{BUCKET}/race/out.jsonl"]


def _race(fs: Any, remote: Any) -> None:
    from bulksend.remote import ShardSegments

    gen = remote.generation
    run = orjson.dumps({"status": "run", "at": 1, "command": "send", "settings": {"parts": gen}})
    _put(fs, f"race/out.jsonl.parts/{gen}/run.jsonl", run + b"\n")
    parts = f"s3://{BUCKET}/race/out.jsonl.parts/{gen}"
    names = ("shard-0000-of-0001.jsonl", "failed-0000-of-0001.jsonl")

    def attempt() -> ShardSegments:
        return ShardSegments(
            f"{parts}/shard-0000-of-0001", f"{parts}/failed-0000-of-0001", names
        )  # fmt: skip

    lost, again = attempt(), attempt()
    try:
        lost.download()
        _append(lost.part, b"".join(_ledger_line(s) for s in range(60)))
        lost.upload()  # its first interval
        again.download()  # Dask ran the shard again: it lists and resumes from 60 records
        assert Path(again.part).read_bytes().count(b"\n") == 60
        # The lost attempt wakes and uploads what it did meanwhile: records 60-79 (70
        # and 77 failed), which the new attempt did not see and sends again.
        late = [_ledger_line(s, "failed" if s in (70, 77) else "ok") for s in range(60, 80)]
        _append(lost.part, b"".join(late))
        _append(lost.failed_part, _failed_line(70) + _failed_line(77))
        lost.upload()
        # The new attempt: 70 ok this time, 75 and 77 failed, 150 failed.
        bad = (75, 77, 150)
        _append(again.part, b"".join(_ledger_line(s, "failed" if s in bad else "ok")
                                      for s in range(60, 200)))  # fmt: skip
        _append(again.failed_part, b"".join(_failed_line(s) for s in bad))
        again.upload()  # no collision with the lost attempt's segments
    finally:
        lost.close()
        again.close()

    # A third attempt resumes from both: each record once, none to send again.
    third = attempt()
    try:
        third.download()
        seqs = [orjson.loads(x)["seq"] for x in Path(third.part).read_bytes().splitlines()]
        assert Counter(seqs) == Counter(range(200))
    finally:
        third.close()
    remote.finish()


def test_an_abandoned_runs_summary_counts_the_uploaded_segments(tmp_path: Path, s3: S3) -> None:
    """Ctrl-C twice: the shards are abandoned mid-run, their segments stay for --resume,
    and the summary and --stats count what those segments hold (the driver has no local
    parts to count), each record once."""
    env, fs = s3
    n = 3000
    source = _put(fs, "in-abandoned.jsonl", _jsonl(0, n))
    out, stats = f"s3://{BUCKET}/abandoned/out.jsonl", tmp_path / "stats.json"
    # 1 s answers: requests are in flight when the second Ctrl-C comes, so the shards
    # cannot all report in between.
    with start_server_subprocess("--latency", "1000") as (_, url):
        cmd = [sys.executable, "-m", "bulksend", "send", source, *target(url), "--workers", "2"]
        cmd += ["--concurrency", "64", "--out", out, "--stats", str(stats)]
        cmd += ["--segment-interval", "0.3", "--progress-interval", "1"]
        driver = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while _uploaded_lines(fs, "abandoned/out.jsonl") < 100:
                assert time.monotonic() < deadline and driver.poll() is None
                time.sleep(0.1)
            driver.send_signal(signal.SIGINT)  # the driver only: its workers go on
            time.sleep(0.3)  # two signals at once may arrive as one
            driver.send_signal(signal.SIGINT)
            _, err = driver.communicate(timeout=90)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(timeout=30)
    stderr = err.decode()
    assert driver.returncode == 130, stderr
    assert f"their parts stay in {out}.parts" in stderr and "Traceback" not in stderr
    uploaded = Counter(
        orjson.loads(x)["seq"]
        for path in _objects(fs, "abandoned/out.jsonl.parts/")
        if "/shard-" in path and path.endswith(".jsonl")
        for x in fs.cat_file(path).splitlines()
        if not x.startswith(b'{"status":"run"')
    )
    assert uploaded and max(uploaded.values()) == 1
    figures = orjson.loads(stats.read_bytes())
    assert (figures["total"], figures["ok"]) == (len(uploaded), len(uploaded))


def test_segment_interval_without_an_object_store_out_is_refused(tmp_path: Path) -> None:
    """``--segment-interval`` only paces a shard's uploads to ``--out s3://...``: given on
    the command line for any other run it would do nothing, so the run is refused in
    one line (exit 2) before anything starts. From the environment or a config file it
    is a default for the runs that upload, and other runs go on."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(_jsonl(0, 5))
    out = tmp_path / "out.jsonl"
    for extra in ([], ["--workers", "2"], ["--workers", "2", "--out", str(out)]):
        proc = bulksend("send", str(inputs), "--embedded", *extra, "--segment-interval", "1")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "--out s3://" in proc.stderr, proc.stderr
        assert not out.exists()
    load = bulksend("load", "--embedded", "--rate", "10", "--duration", "1s",
                    "--segment-interval", "1")  # fmt: skip
    assert load.returncode == 2 and "--segment-interval" in load.stderr, load.stderr
    quiet = bulksend(
        "send", str(inputs), "--embedded", "--out", str(out), "--quiet",
        env={"BULKSEND_SEGMENT_INTERVAL": "1"},
    )  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert len(out.read_bytes().splitlines()) == 6  # the run line and 5 results


def test_a_worker_stopped_past_its_ttl_then_woken_ends_the_run_normally(
    tmp_path: Path, s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race over a real ``dask scheduler`` and three ``dask worker`` processes: a
    worker running a shard gets SIGSTOP; past the scheduler's worker TTL it is declared
    lost and the shard runs again on the idle worker, resuming from the segments it
    lists; then SIGCONT: the lost attempt wakes and uploads what it did meanwhile. The
    run ends normally (exit 0), each record ok once in the merged object."""
    from tests.test_distributed import _dask, _end

    env, fs = s3
    for key, value in env.items():  # the scheduler, workers and driver all reach moto
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "3s")
    n, rate, concurrency, interval = 1600, 400, 8, 1.0
    source = _put(fs, "in-stopped.jsonl", _jsonl(0, n))
    out = f"s3://{BUCKET}/stopped/out.jsonl"
    log, info = tmp_path / "dask.log", tmp_path / "scheduler.json"
    procs = [
        _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
              "127.0.0.1:0", "--scheduler-file", str(info), log=log)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_bytes().strip():
            assert time.monotonic() < deadline and procs[0].poll() is None, log.read_text()
            time.sleep(0.1)
        address = orjson.loads(info.read_bytes())["address"]
        workers = {
            # No nanny: a stopped nanny would hold the scheduler 30 s trying to restart
            # its worker before the shard runs again.
            name: _dask("worker", address, "--name", name, "--nthreads", "1", "--host",
                        "127.0.0.1", "--no-dashboard", "--no-nanny", "--death-timeout", "60",
                        log=log)
            for name in ("w0", "w1", "w2")
        }  # fmt: skip
        procs += workers.values()
        asyncio.run(_wait_for(address, 3))
        with start_server_subprocess() as (_, url):
            args = ["send", source, *target(url), "--cluster", address, "--shards", "2"]
            args += ["--out", out, "--rate", str(rate), "--concurrency", str(concurrency)]
            args += ["--segment-interval", str(interval), "--quiet"]
            driver = subprocess.Popen(
                [sys.executable, "-m", "bulksend", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            procs.append(driver)  # type: ignore[arg-type]
            deadline = time.monotonic() + 90
            while _uploaded_lines(fs, "stopped/out.jsonl") < n // 5:
                assert time.monotonic() < deadline and driver.poll() is None
                time.sleep(0.1)
            name, worker, key = asyncio.run(_a_shard_on(address))
            shard = int(key.split("-")[2])
            os.killpg(workers[name].pid, signal.SIGSTOP)
            try:
                before = _sends_of(url, shard)
                moved = asyncio.run(_moved(address, worker, key, deadline=time.monotonic() + 60))
                # The next attempt sends: it has listed the segments and resumed. Only then
                # may the stopped one wake, with lines that attempt did not see.
                deadline = time.monotonic() + 60
                while moved and _sends_of(url, shard) == before:
                    assert time.monotonic() < deadline and driver.poll() is None
                    time.sleep(0.05)
            finally:
                os.killpg(workers[name].pid, signal.SIGCONT)
            assert moved, "the scheduler never ran the stopped worker's shard again"
            seen: dict[str, bytes] = {}  # the parts' objects while the run goes on
            deadline = time.monotonic() + 120
            while driver.poll() is None:
                assert time.monotonic() < deadline
                for path in _objects(fs, "stopped/out.jsonl.parts/"):
                    if path not in seen:
                        with contextlib.suppress(FileNotFoundError):  # merged meanwhile
                            seen[path] = fs.cat_file(path) if path.endswith("base.json") else b""
                time.sleep(0.2)
            err = driver.stderr.read() if driver.stderr else b""
            stored = _stored(url)
    finally:
        for proc in reversed(procs):
            _end(proc)  # type: ignore[arg-type]
    assert driver.returncode == 0, err.decode()
    lines = _results(fs, "stopped/out.jsonl")
    assert Counter(x["seq"] for x in lines) == Counter(range(n))  # each record ok once
    assert {x["status"] for x in lines} == {"ok"}
    assert len({m["body"] for m in stored["messages"]}) == n
    # The race did happen: the stopped attempt uploaded a segment the shard's next
    # attempt had not seen when it resumed (its base.json counts fewer).
    late = _late_segments(seen, key)
    resent = stored["total"] - n
    print(f"\nlate segments {late}; re-sent {resent} (the stopped attempt's in flight "
          f"{concurrency}, one interval {rate // 2 * interval:.0f})")  # fmt: skip
    assert late, "\n".join(sorted(p.split("parts/")[-1] for p in seen))


def _sends_of(url: str, shard: int) -> int:
    """Requests the server took for shard ``shard`` of 2 (records by position)."""
    return sum(int(m["body"][1:]) % 2 == shard for m in _stored(url)["messages"])


def _late_segments(seen: dict[str, bytes], key: str) -> list[str]:
    """The segments of the stopped shard's first attempt that its second attempt had not
    seen when it resumed (its base.json counts fewer)."""
    shard = int(key.split("-")[2])
    attempts: dict[str, list[int]] = {}
    bases: dict[str, dict[str, int]] = {}
    for path, data in seen.items():
        shard_dir, attempt, name = path.split("/")[-3:]
        if not shard_dir.startswith(f"shard-{shard:04d}-"):
            continue
        if name == "base.json":
            bases[attempt] = orjson.loads(data)
        else:
            attempts.setdefault(attempt, []).append(name)
    assert len(attempts) >= 2, attempts  # a busy machine may lose a worker twice
    first, *later = sorted(attempts)
    count = min(bases[a].get(first, 0) for a in later)
    return sorted(n for n in attempts[first] if n.startswith("seg-") and int(n[4:10]) >= count)


async def _wait_for(address: str, n: int) -> None:
    from distributed import Client

    async with Client(address, asynchronous=True, timeout=30) as client:
        await client.wait_for_workers(n, timeout=60)


async def _processing(address: str) -> dict[str, list[str]]:
    """Per worker address, the shard tasks it runs (asked of the scheduler only: a
    stopped worker answers nothing)."""
    from distributed import Client

    async with Client(address, asynchronous=True, timeout=30) as client:
        processing = await client.processing()
    return {
        a: [str(k) for k in keys if "bulksend-shard" in str(k)] for a, keys in processing.items()
    }


async def _a_shard_on(address: str) -> tuple[str, str, str]:
    """A worker running a shard: its name, its address and the shard's task key."""
    from distributed import Client

    def _worker_name(dask_worker: object) -> str:  # nested: travels by value to the worker
        return str(dask_worker.name)  # type: ignore[attr-defined]

    async with Client(address, asynchronous=True, timeout=30) as client:
        names = await client.run(_worker_name)
    busy = [(names[a], a, keys[0]) for a, keys in (await _processing(address)).items() if keys]
    assert busy
    return busy[0]


async def _moved(address: str, worker: str, key: str, *, deadline: float) -> bool:
    """Whether the shard ``key`` came to run on a worker other than ``worker`` in time."""
    while time.monotonic() < deadline:
        if any(key in keys for a, keys in (await _processing(address)).items() if a != worker):
            return True
        await asyncio.sleep(0.2)
    return False


def test_attempts_come_in_the_order_they_resumed_from_each_other() -> None:
    """By start (their names) unless one resumed from another: a worker whose clock is
    behind names its attempt earlier than the one it read, and still comes after it."""
    from bulksend.remote import _in_order

    first, second, third = (f"attempt-176455680000{i}-000000" for i in (1, 2, 3))
    assert _in_order({third: {}, first: {}, second: {}}) == [first, second, third]
    assert _in_order({first: {second: 2}, second: {}, third: {first: 1, second: 2}}) == [
        second,
        first,
        third,
    ]


def test_a_bad_line_in_a_raced_shard_is_named_with_its_segment(s3_here: S3) -> None:
    from bulksend.errors import LedgerError
    from bulksend.remote import Attempts, Store

    _, fs = s3_here
    prefix = "bad/out.jsonl.parts/run-1764556800000-0a0b0d/shard-0000-of-0001"
    lost, again = "attempt-1764556800001-000000", "attempt-1764556800002-000000"
    _put(fs, f"{prefix}/{lost}/seg-000000.jsonl", _ledger_line(0) + _ledger_line(1))
    _put(fs, f"{prefix}/{again}/base.json", b"{}")  # it saw nothing: seg 0 is late
    _put(fs, f"{prefix}/{again}/seg-000000.jsonl", _ledger_line(1) + b"{not json\n")
    attempts = Attempts.read(Store(f"s3://{BUCKET}/{prefix}"), f"{BUCKET}/{prefix}")
    with pytest.raises(LedgerError) as caught:
        list(attempts.ledger_blocks())
    assert str(caught.value) == (
        f"s3://{BUCKET}/{prefix}/{again}/seg-000000.jsonl:2: not a results line"
    )


def test_an_abandoned_runs_count_refuses_a_bad_line_in_one_line(s3_here: S3) -> None:
    from bulksend.errors import LedgerError
    from bulksend.remote import RemoteLedger
    from bulksend.stats import Stats

    _, fs = s3_here
    remote = RemoteLedger(f"s3://{BUCKET}/badcount/out.jsonl", None, resume=False, overwrite=False)
    shard = f"badcount/out.jsonl.parts/{remote.generation}/shard-0000-of-0001"
    _put(fs, f"{shard}/attempt-1764556800001-000000/seg-000000.jsonl", _ledger_line(0) + b"[1\n")
    try:
        with pytest.raises(LedgerError, match=r"shard-0000-of-0001: holds a line that is not"):
            remote.count(Stats())
    finally:
        remote.close()


def test_segments_of_an_older_layout_are_refused_not_skipped(s3_here: S3) -> None:
    """Segments right under a shard's prefix (no attempt) were written by a bulksend
    before attempts: read as none they would be lost, so the read stops in one line."""
    from bulksend.errors import LedgerError
    from bulksend.remote import Attempts, Store

    _, fs = s3_here
    prefix = "old/out.jsonl.parts/run-1764556800000-0a0b0e/shard-0000-of-0001"
    _put(fs, f"{prefix}/seg-000000.jsonl", _ledger_line(0))
    with pytest.raises(LedgerError, match=r"shard-0000-of-0001/seg-000000.jsonl: a segment of"):
        Attempts.read(Store(f"s3://{BUCKET}/{prefix}"), f"{BUCKET}/{prefix}")
