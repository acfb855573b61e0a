"""Start, stop and restart ``bulksend serve``: SIGTERM drains, --store survives restarts,
TLS, the in-process API, and start-up errors."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bulksend.errors import ConfigError
from bulksend.server import MessageQuery, ServerOptions, run_server
from tests.serve_helpers import (
    ALL_TIME,
    INSTANCE_ID,
    messages_path,
    read_url,
    spawn_server,
    start_server_inprocess,
    start_server_subprocess,
    stop,
)

TIMEOUT = aiohttp.ClientTimeout(total=20)


async def post(
    s: aiohttp.ClientSession, url: str, topic: str = "life", body: str = "b"
) -> tuple[int, Any]:
    payload = json.dumps({"topic": topic, "body": body}).encode()
    async with s.post(
        url + messages_path(), data=payload, headers={"Content-Type": "application/json"}
    ) as r:
        return r.status, json.loads(await r.read())


async def wait_accepted(s: aiohttp.ClientSession, url: str, n: int) -> None:
    """Until the server has accepted n messages (its answers may still be pending), 10 s at most."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with s.get(url + "/metrics") as r:
            if f"bulksend_serve_messages_accepted_total {n}" in (await r.text()).splitlines():
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"server did not accept {n} messages within 10 s")


async def wait_exit(proc: subprocess.Popen[str]) -> int:
    """The exit code, waiting 20 s at most (in a thread: the event loop keeps running)."""
    return await asyncio.to_thread(proc.wait, 20.0)


async def test_sigterm_finishes_in_flight_requests_and_exits_0() -> None:
    proc = spawn_server("--latency", "1500")
    try:
        url = read_url(proc, 30)
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
            aiohttp.ClientSession(timeout=TIMEOUT) as probe,
        ):
            in_flight = asyncio.ensure_future(
                asyncio.gather(*(post(s, url, body=str(i)) for i in range(3)))
            )
            await wait_accepted(probe, url, 3)
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(in_flight, 20)
            assert [status for status, _ in results] == [200, 200, 200]
            assert await wait_exit(proc) == 0
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer listening
                await post(probe, url)
    finally:
        stop(proc)


async def test_second_signal_cuts_in_flight_and_exits_130() -> None:
    proc = spawn_server("--latency", "20000")
    try:
        url = read_url(proc, 30)
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
            aiohttp.ClientSession(timeout=TIMEOUT) as probe,
        ):
            in_flight = asyncio.ensure_future(post(s, url))
            await wait_accepted(probe, url, 1)
            proc.send_signal(signal.SIGINT)
            await asyncio.sleep(0.2)
            assert proc.poll() is None  # draining: the answer is due in 20 s
            proc.send_signal(signal.SIGINT)
            assert await wait_exit(proc) == 130
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(in_flight, 20)
    finally:
        stop(proc)


async def test_store_survives_restart_and_offsets_continue(tmp_path: Path) -> None:
    db = str(tmp_path / "messages.db")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        with start_server_subprocess("--store", db, "--queues", "2") as (_, url):
            first = [(await post(s, url, body=f"a{i}"))[1] for i in range(5)]
        with start_server_subprocess("--store", db, "--queues", "2") as (_, url):
            second = [(await post(s, url, body=f"b{i}"))[1] for i in range(5)]
            query = {"topic": "life", "limit": "100", **ALL_TIME}
            async with s.get(url + messages_path(), params=query) as r:
                listed = await r.json()
            async with s.get(url + "/metrics") as r:
                metrics = (await r.text()).splitlines()
    # Round-robin continues (5 messages before: queue 1 is next), offsets continue per queue.
    placed = [(m["queue_id"], m["queue_offset"]) for m in first + second]
    assert placed == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
        (0, 3),
        (1, 3),
        (0, 4),
        (1, 4),
    ]
    assert listed["total"] == 10
    assert [m["body"] for m in listed["messages"]] == [f"a{i}" for i in range(5)] + [
        f"b{i}" for i in range(5)
    ]
    assert len({m["msg_id"] for m in listed["messages"]}) == 10
    assert "bulksend_serve_messages_accepted_total 5" in metrics
    assert "bulksend_serve_messages_stored 10" in metrics


async def test_sigterm_commits_and_answers_messages_waiting_for_their_commit(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    # The first commit goes at once, the next one 3 s after it: 50 messages wait for it.
    proc = spawn_server("--store", str(db), "--commit-interval", "3000")
    try:
        url = read_url(proc, 30)
        connector = aiohttp.TCPConnector(limit=50)
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as s,
            aiohttp.ClientSession(timeout=TIMEOUT) as probe,
        ):
            assert (await post(s, url, body="first"))[0] == 200
            waiting = asyncio.ensure_future(
                asyncio.gather(*(post(s, url, body=str(i)) for i in range(50)))
            )
            await wait_accepted(probe, url, 51)
            assert not waiting.done()  # accepted, not yet stored: not yet answered
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(waiting, 20)
            assert {r[0] for r in results} == {200}
            assert await wait_exit(proc) == 0
    finally:
        stop(proc)
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT msg_id) FROM messages").fetchone() == (
            51,
            51,
        )


async def test_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with start_server_subprocess("--tls-cert", str(cert_file), "--tls-key", str(key_file)) as (
        _,
        url,
    ):
        assert url.startswith("https://127.0.0.1:")
        connector = aiohttp.TCPConnector(ssl=client_ctx)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as s:
            status, body = await post(s, url)
            assert status == 200
            assert body["msg_id"]


async def test_in_process_api() -> None:
    async with start_server_inprocess(queues=1) as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            sent = [(await post(s, server.url, topic="inproc", body=f"m{i}"))[1] for i in range(3)]
            await post(s, server.url, topic="other")
        stored = await server.store.messages(MessageQuery(topic="inproc"))
        assert [m.msg_id for m in stored] == [m["msg_id"] for m in sent]
        assert [m.queue_offset for m in stored] == [0, 1, 2]
        assert stored[0].instance_id == INSTANCE_ID
        assert stored[0].body == "m0"
        assert server.store.accepted == 4
        assert server.metrics.requests[("send", 200)] == 4
        assert server.seed is None  # nothing misbehaves


async def test_in_process_with_sqlite_store_and_faults(tmp_path: Path) -> None:
    options = ServerOptions(
        host="127.0.0.1", port=0, store_path=str(tmp_path / "s.db"), error_rate=0.5, seed=5
    )
    async with run_server(options) as server, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        statuses = [(await post(s, server.url, body=str(i)))[0] for i in range(40)]
        assert server.seed == 5
        stored = await server.store.messages()
        assert len(stored) == statuses.count(200) == server.store.accepted
    # The context exited: the server is closed and the store committed.
    async with run_server(options) as again:
        assert again.store.total == statuses.count(200)


async def test_shutdown_is_idempotent_and_closes_idle_keepalive() -> None:
    async with start_server_inprocess() as server, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await post(s, server.url))[0] == 200  # leaves an idle keep-alive connection
        await asyncio.wait_for(server.shutdown(), 10)
        await asyncio.wait_for(server.shutdown(), 10)


async def test_port_in_use_is_config_error() -> None:
    async with start_server_inprocess() as server:
        with pytest.raises(ConfigError, match="cannot listen"):
            async with run_server(ServerOptions(host="127.0.0.1", port=server.port)):
                pass


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port"),
        (["--error-rate", "1.5"], "--error-rate"),
        (["--stall", "1s"], "EVERY:FOR"),
        (["--stall", "1s:2s"], "FOR < EVERY"),
        (["--tls-cert", "/nonexistent.pem"], "--tls-key"),
        (["--queues", "0"], "--queues"),
        (["--lose-answer-rate", "2"], "--lose-answer-rate"),
        (["--lose-answer-hang", "-1"], "--lose-answer-hang"),
        (["--lose-answer-hang", "nan"], "--lose-answer-hang"),
    ],
)
def test_bad_flags_exit_2(flags: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bulksend", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


async def test_store_failure_answers_500(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    options = ServerOptions(host="127.0.0.1", port=0, store_path=str(tmp_path / "f.db"))
    async with run_server(options) as server, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert (await post(s, server.url))[0] == 200
        # Break the journal underneath: drop its table (the file stays open).
        import sqlite3

        with sqlite3.connect(tmp_path / "f.db") as conn:
            conn.execute("DROP TABLE messages")
        for _ in range(3):  # its commit fails; then the store refuses every message
            status, body = await post(s, server.url)
            assert status == 500
            assert body["error_code"] == "DMS.00500000"
        async with s.get(server.url + messages_path(), params=ALL_TIME) as r:
            assert r.status == 500
            assert (await r.json())["error_code"] == "DMS.00500000"
        assert server.metrics.requests[("send", 500)] == 3
        assert server.metrics.requests[("send", 200)] == 1
    assert "write failed" in capfd.readouterr().err
