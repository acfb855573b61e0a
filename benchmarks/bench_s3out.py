"""What ``--out s3://...`` costs a shard: the uploader's CPU per ledger line, measured.

    python benchmarks/bench_s3out.py [--lines 200000] [--segments 1000,10000,50000]

A shard writes its part locally as with a file ``--out`` (one write per event-loop turn)
and its uploader sends the whole lines written since the last upload as the next segment
(``remote.ShardSegments``). Here ``--lines`` ledger lines of a real send are written to a
local part in turns of 64 lines: once alone (the baseline: what a shard pays today), and
once with an upload to moto's S3 server (a subprocess on 127.0.0.1, so its CPU is not
counted) after every ``segment`` lines. The figure is this process's CPU (user + system)
per line, and the uploads' share of it against the baseline of the same run. At 5 s a
segment, a shard sending 2,000 msg/s uploads 10,000 lines a segment.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from bulksend.remote import ShardSegments
from bulksend.result import OK, Result
from bulksend.sinks import LineWriter

TURN = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ledger_lines(n: int) -> list[bytes]:
    return [
        Result(
            seq=i,
            source=f"/data/in.jsonl:{i + 1}",
            id=f"id-{i}",
            identity=f"/data/in.jsonl:{i + 1}",
            status=OK,
            http_status=200,
            msg_id=f"{i:032x}",
            queue_id=i % 8,
            queue_offset=i,
            broker_name="broker-0",
            attempts=1,
            latency_ms=3.25,
            request_id=f"{i:032x}",
            started_at=1_764_556_800_000 + i,
            done_at=1_764_556_800_003 + i,
            intended_at=1_764_556_800_000 + i,
            queue_ms=0.1,
        ).to_json_line()
        for i in range(n)
    ]


def write(lines: list[bytes], path: str, segments: ShardSegments | None, every: int) -> float:
    """CPU seconds to write ``lines`` to ``path`` (uploading every ``every`` lines)."""
    writer = LineWriter(path, append=True)
    start = time.process_time()
    for i in range(0, len(lines), TURN):
        # One write a loop turn, as the ledger's LineWriter does.
        writer.write_now(b"".join(lines[i : i + TURN]))
        if segments is not None and (i + TURN) % every < TURN:
            segments.upload()
    writer.close()
    if segments is not None:
        segments.upload()
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--segments", default="1000,10000,50000")
    args = ap.parse_args()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
         "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        os.environ.update(
            FSSPEC_S3_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import fsspec.config
        import s3fs

        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
        lines = ledger_lines(args.lines)
        size = sum(map(len, lines))
        print(f"{args.lines:,} ledger lines, {size / len(lines):.0f} bytes each")
        with tempfile.TemporaryDirectory() as tmp:
            base = min(write(lines, os.path.join(tmp, f"base{k}.jsonl"), None, 0) for k in range(5))
            print(f"baseline, local part only: {base / len(lines) * 1e6:6.2f} us CPU a line")
            for every in (int(x) for x in args.segments.split(",")):
                costs = []
                for k in range(5):
                    url = f"s3://bench/run{every}-{k}/shard-0000-of-0001"
                    segs = ShardSegments(url, None, ("shard-0000-of-0001.jsonl", None))
                    try:
                        costs.append(write(lines, segs.part, segs, every))
                        uploads = segs.uploaders[0].next
                    finally:
                        segs.close()
                cost = min(costs)
                extra = (cost - base) / len(lines) * 1e6
                print(
                    f"segments of {every:>6,} lines ({uploads} uploads): "
                    f"{cost / len(lines) * 1e6:6.2f} us a line, uploads {extra:+5.2f} us"
                    f" ({cost / base:4.2f}x the baseline;"
                    f" {(cost - base) / uploads * 1e3:.1f} ms CPU an upload)"
                )
    finally:
        moto.terminate()
        moto.wait(timeout=30)


if __name__ == "__main__":
    main()
