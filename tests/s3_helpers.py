"""moto's S3 server on 127.0.0.1 for the tests of s3:// inputs and outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import orjson

BUCKET = "backfill"


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[dict[str, str], Any]]:
    """An S3 server on 127.0.0.1 with the bucket ``BUCKET``, the environment that points
    bulksend (fsspec, botocore) at it, and an s3fs filesystem on it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {
            "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"]
        )
        # moto keeps its buckets per process, not per server: an earlier module's is there.
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        yield env, fs
    finally:
        server.stop()


def jsonl(start: int, n: int) -> bytes:
    return b"".join(
        orjson.dumps({"topic": "t", "body": f"m{i}"}) + b"\n" for i in range(start, start + n)
    )


def put(fs: Any, key: str, data: bytes) -> str:
    """Write ``data`` as ``key`` in ``BUCKET``; its s3:// URL."""
    with fs.open(f"{BUCKET}/{key}", "wb") as fh:
        fh.write(data)
    return f"s3://{BUCKET}/{key}"
