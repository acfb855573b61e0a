"""Every misbehaviour flag of ``bulksend serve``, seeded. Bounds are on counts and on
lower bounds of time only (an answer can be late on a loaded machine, never early), so
these cannot flake on a busy 2-core box."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse
import urllib.request
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.serve_helpers import ALL_TIME, messages_path, start_server_subprocess

TIMEOUT = aiohttp.ClientTimeout(total=20)
BODY = b'{"topic":"faults","body":"hello"}'
HEADERS = {"Content-Type": "application/json"}


async def post(s: aiohttp.ClientSession, url: str, body: bytes = BODY) -> tuple[int, bytes, Any]:
    async with s.post(url + messages_path(), data=body, headers=HEADERS) as r:
        return r.status, await r.read(), r.headers


async def metric(s: aiohttp.ClientSession, url: str, line_prefix: str) -> int:
    async with s.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(line_prefix + " "):
                return int(line.rsplit(" ", 1)[1])
    return 0


def raw_request(body: bytes = BODY) -> bytes:
    return (
        f"POST {messages_path()} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def connect(url: str, timeout: float) -> socket.socket:
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=timeout)


async def test_error_rate_about_right_and_not_stored() -> None:
    with start_server_subprocess("--error-rate", "0.3", "--seed", "7") as (_, url):
        async with aiohttp.ClientSession(
            timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=16)
        ) as s:
            results = await asyncio.gather(*(post(s, url) for _ in range(400)))
            statuses = [r[0] for r in results]
            assert set(statuses) <= {200, 503}
            errors = statuses.count(503)
            assert 0.2 * 400 <= errors <= 0.4 * 400
            body = json.loads(next(r[1] for r in results if r[0] == 503))
            assert body["error_code"] == "DMS.00503001"
            assert await metric(s, url, "bulksend_serve_messages_accepted_total") == 400 - errors
            assert await metric(s, url, 'bulksend_serve_faults_total{kind="error"}') == errors


async def test_same_seed_same_choices() -> None:
    async def run() -> list[int]:
        with start_server_subprocess("--error-rate", "0.5", "--seed", "42") as (_, url):
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                return [(await post(s, url))[0] for _ in range(40)]  # one at a time: fixed order

    first, second = await run(), await run()
    assert first == second
    assert 200 in first
    assert 503 in first


def test_drop_closes_without_answer() -> None:
    with (
        start_server_subprocess("--drop-rate", "1", "--seed", "1") as (_, url),
        connect(url, 10) as sock,
    ):
        sock.sendall(raw_request())
        assert sock.recv(1024) == b""  # closed, not a byte of answer


async def test_drop_rate_about_right() -> None:
    with start_server_subprocess("--drop-rate", "0.3", "--seed", "3") as (_, url):
        connector = aiohttp.TCPConnector(force_close=True, limit=16)  # one request per connection
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as s:

            async def one() -> str:
                try:
                    return str((await post(s, url))[0])
                except aiohttp.ServerDisconnectedError:
                    return "dropped"

            outcomes = await asyncio.gather(*(one() for _ in range(200)))
            assert set(outcomes) <= {"200", "dropped"}
            assert 0.2 * 200 <= outcomes.count("dropped") <= 0.4 * 200
            accepted = await metric(s, url, "bulksend_serve_messages_accepted_total")
            assert accepted == outcomes.count("200")


async def test_hang_never_answers_but_keeps_connection_open() -> None:
    with (
        start_server_subprocess("--hang-rate", "1", "--seed", "1") as (_, url),
        connect(url, 1.0) as sock,
    ):
        sock.sendall(raw_request())
        with pytest.raises(TimeoutError):
            sock.recv(1024)  # neither an answer nor a close within the timeout
        # Other connections are served meanwhile (/metrics never misbehaves).
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            assert await metric(s, url, 'bulksend_serve_faults_total{kind="hang"}') == 1
            assert await metric(s, url, "bulksend_serve_messages_accepted_total") == 0
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1024)


async def test_hang_times_out_a_client() -> None:
    with start_server_subprocess("--hang-rate", "1") as (_, url):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
            with pytest.raises(asyncio.TimeoutError):
                await post(s, url)


async def test_garbage_is_200_not_json_and_stored() -> None:
    with start_server_subprocess("--garbage-rate", "1", "--seed", "1") as (_, url):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            status, body, _ = await post(s, url)
            assert status == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(body)
            assert await metric(s, url, "bulksend_serve_messages_accepted_total") == 1


async def test_no_msgid_is_200_json_without_msg_id() -> None:
    with start_server_subprocess("--no-msgid-rate", "1") as (_, url):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            status, body, _ = await post(s, url)
            data = json.loads(body)
            assert status == 200
            assert "msg_id" not in data
            assert data["topic"] == "faults"
            assert data["queue_offset"] == 0
            assert await metric(s, url, "bulksend_serve_messages_accepted_total") == 1


@pytest.mark.parametrize("as_date", [False, True])
async def test_rate_limit_429_with_retry_after(as_date: bool) -> None:
    flags = ["--rate-limit", "5", "--rate-burst", "3", *(["--retry-after-date"] if as_date else [])]
    with start_server_subprocess(*flags) as (_, url):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            start = time.monotonic()
            results = await asyncio.gather(*(post(s, url) for _ in range(40)))
            elapsed = time.monotonic() - start
    ok = [r for r in results if r[0] == 200]
    limited = [r for r in results if r[0] == 429]
    assert len(ok) + len(limited) == 40
    assert 3 <= len(ok) <= 3 + 5 * elapsed + 1  # the burst, then 5/s at most
    if elapsed < (40 - 3) / 5:  # too fast to have been admitted at 5/s: some were refused
        assert limited
    for _, body, headers in limited:
        assert json.loads(body)["error_code"] == "APIG.0308"
        if as_date:
            retry_at = parsedate_to_datetime(headers["Retry-After"]).timestamp()
            assert time.time() - 5 <= retry_at <= time.time() + 60
        else:
            assert 1 <= int(headers["Retry-After"]) <= 60


async def test_latency_delays_answers() -> None:
    with start_server_subprocess("--latency", "300", "--latency-jitter", "100", "--seed", "1") as (
        _,
        url,
    ):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            await post(s, url)  # connect first
            start = time.monotonic()
            results = await asyncio.gather(*(post(s, url) for _ in range(5)))
            assert time.monotonic() - start >= 0.3
            assert {r[0] for r in results} == {200}
            # ListMessages is not delayed: misbehaviour is for SendMessage only.
            async with s.get(url + messages_path(), params={"topic": "faults", **ALL_TIME}) as r:
                assert r.status == 200
            assert await metric(s, url, "bulksend_serve_messages_accepted_total") == 6


async def test_stall_holds_answers() -> None:
    # From 1 s after start, every 1 s: hold all answers for 800 ms.
    with start_server_subprocess("--stall", "1s:800ms") as (_, url):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            held = []
            deadline = time.monotonic() + 15
            # One request after another: the first to arrive in a stall waits for its end,
            # nearly 800 ms (all of it but the few ms since the stall began).
            while time.monotonic() < deadline and not held:
                t0 = time.monotonic()
                assert (await post(s, url))[0] == 200
                if time.monotonic() - t0 >= 0.3:
                    held.append(time.monotonic() - t0)
            assert held, "no answer was held by a stall"
            assert await metric(s, url, 'bulksend_serve_faults_total{kind="stalled"}') >= 1


def test_max_body_413() -> None:
    with start_server_subprocess("--max-body", "64") as (_, url):
        small = b'{"topic":"t","body":"b"}'
        big = b'{"topic":"t","body":"' + b"x" * 100 + b'"}'
        with connect(url, 10) as sock:
            sock.sendall(raw_request(big) + raw_request(small))  # still in sync after a 413
            data = b""
            while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
        first, second = data.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"413")
        assert b"APIGW.0201" in first
        assert second.startswith(b"200")
        # Expecting 100-continue with an oversized Content-Length: refused before the body.
        with connect(url, 10) as sock:
            head = raw_request(big).split(b"\r\n\r\n")[0]
            sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
            answer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 413")
            assert b"Connection: close" in answer


def list_stored(url: str, **query: str) -> list[dict[str, Any]]:
    """What ListMessages lists of topic "faults" (all time)."""
    params = urllib.parse.urlencode({"topic": "faults", "limit": "1000", **ALL_TIME, **query})
    with urllib.request.urlopen(f"{url}{messages_path()}?{params}", timeout=20) as r:
        return list(json.loads(r.read())["messages"])


@pytest.mark.parametrize("store", [False, True])
def test_lose_answer_stores_then_drops_the_connection(tmp_path: Path, store: bool) -> None:
    flags = ["--lose-answer-rate", "1", "--seed", "1"]
    if store:
        flags += ["--store", str(tmp_path / "s.db")]
    with start_server_subprocess(*flags) as (_, url):
        with connect(url, 10) as sock:
            sock.sendall(raw_request())
            assert sock.recv(1024) == b""  # closed, not a byte of answer
        (stored,) = list_stored(url)  # ... but stored (and committed, with --store)
        assert stored["body"] == "hello"
        with urllib.request.urlopen(url + "/metrics", timeout=20) as r:
            lines = r.read().decode().splitlines()
        assert 'bulksend_serve_faults_total{kind="lose_answer"} 1' in lines
        assert "bulksend_serve_messages_accepted_total 1" in lines
        assert not [line for line in lines if 'route="send"' in line]  # no answer was sent


async def test_lose_answer_hang_sends_the_answer_late() -> None:
    flags = ("--lose-answer-rate", "1", "--lose-answer-hang", "2", "--seed", "1")
    with start_server_subprocess(*flags) as (_, url):
        # A client whose timeout is shorter than the hold gives up ...
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
            with pytest.raises(asyncio.TimeoutError):
                await post(s, url)
        (first,) = list_stored(url)  # ... although its message is stored.
        # A patient one gets the answer, no earlier than 2 s, with the stored msg_id.
        with connect(url, 30) as sock:
            start = time.monotonic()
            sock.sendall(raw_request(b'{"topic":"faults","body":"late"}'))
            answer = b""
            while not answer.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk
                answer += chunk
            assert time.monotonic() - start >= 2.0
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        second = next(m for m in list_stored(url) if m["body"] == "late")
        assert json.loads(body)["msg_id"] == second["msg_id"] != first["msg_id"]


async def test_lose_answer_rate_about_right_and_every_message_stored() -> None:
    with start_server_subprocess("--lose-answer-rate", "0.3", "--seed", "3") as (_, url):
        connector = aiohttp.TCPConnector(force_close=True, limit=16)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as s:

            async def one(i: int) -> str:
                body = json.dumps({"topic": "faults", "body": f"m{i}"}).encode()
                try:
                    return str((await post(s, url, body))[0])
                except aiohttp.ServerDisconnectedError:
                    return "lost"

            outcomes = await asyncio.gather(*(one(i) for i in range(200)))
            assert set(outcomes) <= {"200", "lost"}
            assert 0.2 * 200 <= outcomes.count("lost") <= 0.4 * 200
            assert await metric(s, url, 'bulksend_serve_faults_total{kind="lose_answer"}') == (
                outcomes.count("lost")
            )
        assert sorted(m["body"] for m in list_stored(url)) == sorted(f"m{i}" for i in range(200))
