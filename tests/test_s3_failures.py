"""An S3 store that fails under an s3:// input, against moto's server on 127.0.0.1: at open
it is one line and exit 2; lost in the middle of a read, the input ends as a broken file
does (its unread rest one invalid result naming the failure), never a traceback, and a
--resume once the store is back sends the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.cli_helpers import bulksend, no_traceback, read_jsonl

s3fs = pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is in the test extra")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")

BUCKET = "store"
N = 20_000


@pytest.fixture
def store() -> Iterator[tuple[object, dict[str, str]]]:
    """moto's server on a free port of 127.0.0.1 (stopped by the tests at will), and the
    environment that points bulksend at it, reading 64 KiB blocks (so that a read in
    the middle of the object goes to the store)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        **os.environ,
        "FSSPEC_S3": orjson.dumps(
            {"endpoint_url": f"http://{host}:{port}", "default_block_size": 65536}
        ).decode(),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Fail fast once the store is gone: botocore would otherwise retry for a while.
        "AWS_MAX_ATTEMPTS": "1",
    }
    try:
        yield server, env
    finally:
        server.stop()


def _put(env: dict[str, str], key: str, data: bytes) -> str:
    endpoint = orjson.loads(env["FSSPEC_S3"])["endpoint_url"]
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    with fs.open(f"{BUCKET}/{key}", "wb") as fh:
        fh.write(data)
    return f"s3://{BUCKET}/{key}"


def test_a_store_that_cannot_be_reached_at_open_is_one_line(
    tmp_path: Path, store: tuple[object, dict[str, str]]
) -> None:
    _, env = store
    env = {**env, "FSSPEC_S3": orjson.dumps({"endpoint_url": "http://127.0.0.1:1"}).decode()}
    proc = bulksend("send", f"s3://{BUCKET}/in.jsonl", "--embedded", env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert no_traceback(proc), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"bulksend: error: cannot open input s3://{BUCKET}/in.jsonl")


def test_a_store_lost_mid_read_ends_the_input_as_broken_and_resume_sends_the_rest(
    tmp_path: Path, store: tuple[object, dict[str, str]]
) -> None:
    server, env = store
    data = b"".join(orjson.dumps({"topic": "t", "body": f"m{i:060d}"}) + b"\n" for i in range(N))
    url = _put(env, "in.jsonl", data)
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "bulksend", "send", url, "--embedded", "--out", str(out)]
    run = subprocess.Popen(
        [*args, "--rate", "2000", "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not out.exists() or out.read_bytes().count(b"\n") < 1000:
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        server.stop()  # type: ignore[attr-defined]
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert "Traceback" not in stderr, stderr
    assert run.returncode == 1, stderr
    lines = read_jsonl(out)
    statuses = Counter(x["status"] for x in lines)
    assert statuses["invalid"] == 1 and statuses["ok"] == len(lines) - 1 < N
    broken = next(x for x in lines if x["status"] == "invalid")
    assert "the store failed: EndpointConnectionError" in broken["error_msg"]
    assert "the rest of this file is skipped" in broken["error_msg"]

    # The store back (a new server, the same object: the same ETag), --resume sends the rest.
    again = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    again.start()
    try:
        host, port = again.get_host_and_port()
        env["FSSPEC_S3"] = orjson.dumps({"endpoint_url": f"http://{host}:{port}"}).decode()
        assert _put(env, "in.jsonl", data) == url
        resumed = bulksend(*args[3:], "--resume", "--quiet", env=env, timeout=120)
    finally:
        again.stop()
    assert resumed.returncode == 0, resumed.stderr
    ok = [x["seq"] for x in read_jsonl(out) if x["status"] == "ok"]
    assert Counter(ok) == Counter(range(N))  # each record ok once
