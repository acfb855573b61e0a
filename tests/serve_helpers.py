"""Start ``bulksend serve`` for tests, as a subprocess (the real CLI) or in-process.

    with start_server_subprocess("--error-rate", "0.1", "--seed", "1") as (proc, url):
        ...

    async with start_server_inprocess(error_rate=0.1, seed=1) as server:
        ... server.url ... await server.store.messages()

Both listen on 127.0.0.1 and a free port. The subprocess gets the test run's environment
minus any HUAWEICLOUD_SDK_* auth variables (so it is unsigned unless ``env`` says
otherwise), is stopped with SIGTERM on leaving, and killed if it does not exit in time.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp

from bulksend import signing
from bulksend.server import RunningServer, ServerOptions, run_server

AUTH_ENV = ("HUAWEICLOUD_SDK_AK", "HUAWEICLOUD_SDK_SK", "HUAWEICLOUD_SDK_AUTH_TOKEN")
PROJECT_ID = "0a1b2c3d4e5f"
INSTANCE_ID = "11111111-2222-3333-4444-555555555555"
AK, SK = "AKTESTSERVE000000001", "serve/test+secret=key~0123456789"


def messages_path(
    instance_id: str = INSTANCE_ID, engine: str = "rocketmq", project_id: str = PROJECT_ID
) -> str:
    """The SendMessage / ListMessages path."""
    return f"/v2/{engine}/{project_id}/instances/{instance_id}/messages"


def read_url(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of a starting server (its URL), waiting at most ``timeout``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"bulksend serve printed no URL within {timeout} s")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            line = proc.stdout.readline().strip()
            if not line:
                code = proc.wait(timeout=5)
                raise RuntimeError(f"bulksend serve exited ({code}) before printing its URL")
            return line


def stop(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def spawn_server(
    *flags: str,
    env: Mapping[str, str] | None = None,
    stderr: IO[Any] | int | None = None,
    max_file_bytes: int | None = None,
) -> subprocess.Popen[str]:
    """Start ``python -m bulksend serve --host 127.0.0.1 --port 0 *flags`` (not waiting).

    ``max_file_bytes`` caps the size of any file the server writes (RLIMIT_FSIZE): past it
    a write fails with EFBIG, as on a full disk (Python ignores the SIGXFSZ that comes too).
    """
    full_env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "bulksend", "serve", "--host", "127.0.0.1", "--port", "0", *flags]

    def limit_files() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=full_env,
        text=True,
        preexec_fn=limit_files if max_file_bytes is not None else None,
    )


@contextmanager
def start_server_subprocess(
    *flags: str,
    env: Mapping[str, str] | None = None,
    stderr: IO[Any] | int | None = None,
    timeout: float = 30.0,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A running ``bulksend serve`` subprocess and its URL; stopped on leaving.

    ``flags`` go after ``--host 127.0.0.1 --port 0`` (a later ``--port`` wins). ``env`` is
    added to the environment (e.g. HUAWEICLOUD_SDK_AK/SK); ``stderr`` is passed to Popen
    (default: inherited, so pytest shows it on failure).
    """
    proc = spawn_server(*flags, env=env, stderr=stderr)
    try:
        url = read_url(proc, timeout)
        yield proc, url
    finally:
        stop(proc)


@asynccontextmanager
async def start_server_inprocess(**options: Any) -> AsyncIterator[RunningServer]:
    """``run_server`` on 127.0.0.1 and a free port, with ServerOptions fields as keywords."""
    async with run_server(ServerOptions(**{"host": "127.0.0.1", "port": 0, **options})) as server:
        yield server


#: ListMessages' time range that covers every message (ms since the epoch): without
#: ``msg_id`` the API requires ``start_time`` and ``end_time``.
ALL_TIME = {"start_time": "0", "end_time": str(2**53)}


async def list_messages(
    session: aiohttp.ClientSession,
    url: str,
    *,
    instance_id: str = INSTANCE_ID,
    **query: str,
) -> list[dict[str, Any]]:
    """Every message ListMessages gives for ``query`` (all pages, oldest first). Without
    ``msg_id`` the whole time range is asked for unless ``start_time``/``end_time`` are given."""
    params = {**({} if "msg_id" in query else ALL_TIME), **query}
    out: list[dict[str, Any]] = []
    while True:
        page_params = {**params, "limit": "10000", "offset": str(len(out))}
        async with session.get(url + messages_path(instance_id), params=page_params) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        out.extend(page["messages"])
        if not page["messages"] or len(out) >= page["total"]:
            return out


def sign_headers(
    url: str,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    query: Sequence[tuple[str, str]] = (),
    ak: str = AK,
    sk: str = SK,
    now: float | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers (Host, Content-Type, X-Sdk-Date, Authorization ...) that sign a request to
    ``url`` the way the SDK does. Send them as they are: Host must be sent exactly."""
    headers = {"Host": urlsplit(url).netloc, "Content-Type": "application/json", **(extra or {})}
    return signing.sign(
        method,
        path,
        list(query),
        headers,
        body,
        ak=ak,
        sk=sk,
        now=time.time() if now is None else now,
    )


def sdk_client(url: str, ak: str = AK, sk: str = SK, project_id: str = PROJECT_ID) -> Any:
    """The official SDK's RocketMQ client for ``url``. Always give AK/SK: without them the
    SDK asks a cloud metadata address for credentials."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkrocketmq.v2 import RocketMQClient

    config = HttpConfig.get_default_config()
    config.timeout = (5, 15)  # (connect, read) seconds
    return (
        RocketMQClient.new_builder()
        .with_http_config(config)
        .with_credentials(BasicCredentials(ak, sk, project_id))
        .with_endpoint(url)
        .build()
    )
