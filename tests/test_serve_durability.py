"""``bulksend serve --store``: a 200 means the message is stored. kill -9 under load, a
failing disk, and two servers on one store, each against a real subprocess server and a
real client (aiohttp) over loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from tests.serve_helpers import (
    list_messages,
    messages_path,
    read_url,
    spawn_server,
    start_server_subprocess,
    stop,
)

TIMEOUT = aiohttp.ClientTimeout(total=20)
TOPIC = "durable"
WORKERS = 32


async def load(
    url: str, acked: list[dict[str, Any]], statuses: Counter[int], *, tag: str, most: int
) -> None:
    """WORKERS clients, each sending one message after another on its keep-alive connection
    until the server goes away or answers 500, or ``most`` messages were sent. Every 200's
    answer goes to ``acked``, every status to ``statuses``."""
    connector = aiohttp.TCPConnector(limit=WORKERS)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as s:

        async def worker(w: int) -> None:
            for i in range(most // WORKERS):
                payload = json.dumps({"topic": TOPIC, "body": f"{tag}-{w}-{i}"}).encode()
                try:
                    async with s.post(
                        url + messages_path(),
                        data=payload,
                        headers={"Content-Type": "application/json"},
                    ) as r:
                        raw = await r.read()
                except (TimeoutError, aiohttp.ClientError):
                    return  # the server is gone
                statuses[r.status] += 1
                if r.status == 200:
                    acked.append(json.loads(raw))
                elif r.status == 500:
                    return  # the store failed: it will say so to every request now

        await asyncio.gather(*(worker(w) for w in range(WORKERS)))


async def wait_for(condition: Any, what: str) -> None:
    """Until condition() holds, 30 s at most."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def positions(acked: list[dict[str, Any]]) -> Counter[tuple[str, int, int]]:
    return Counter((m["broker_name"], m["queue_id"], m["queue_offset"]) for m in acked)


async def stored_by_id(url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        return {m["msg_id"]: m for m in await list_messages(s, url, topic=TOPIC)}


async def test_kill_9_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    db = str(tmp_path / "store.db")
    acked: list[dict[str, Any]] = []
    statuses: Counter[int] = Counter()
    for crash in range(3):
        proc = spawn_server("--store", db, "--queues", "4")
        try:
            url = read_url(proc, 30)
            before = len(acked)
            sending = asyncio.ensure_future(
                load(url, acked, statuses, tag=f"run{crash}", most=200_000)
            )
            # Under load, a moment after some answers came back: kill -9.
            await wait_for(lambda: len(acked) >= before + 1500 or sending.done(), "answers")  # noqa: B023
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(sending, 30)
        finally:
            stop(proc)
    with start_server_subprocess("--store", db, "--queues", "4") as (_, url):
        await load(url, acked, statuses, tag="after", most=WORKERS * 20)
        stored = await stored_by_id(url)
    assert set(statuses) == {200}
    missing = [m["msg_id"] for m in acked if m["msg_id"] not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages were not stored"
    for m in acked:
        s = stored[m["msg_id"]]
        assert (s["queue_id"], s["queue_offset"], s["body"]) == (
            m["queue_id"],
            m["queue_offset"],
            m["body"],
        )
    shared = [p for p, n in positions(acked).items() if n > 1]
    assert not shared, f"{len(shared)} (queue, offset) positions went to two acknowledged messages"


async def test_full_disk_loses_no_acknowledged_message(tmp_path: Path) -> None:
    db = str(tmp_path / "store.db")
    acked: list[dict[str, Any]] = []
    statuses: Counter[int] = Counter()
    err = tmp_path / "stderr"
    # Files may not grow past 400 kB: the WAL fills up after a few thousand messages.
    with err.open("w") as stderr:
        proc = spawn_server("--store", db, stderr=stderr, max_file_bytes=400_000)
        try:
            url = read_url(proc, 30)
            await load(url, acked, statuses, tag="full", most=40_000)
        finally:
            assert stop(proc) == 0
    assert statuses[200] > 100  # the disk filled up under load, not at once
    assert statuses[500] > 0, statuses  # then the store said so
    assert set(statuses) == {200, 500}
    assert "write failed" in err.read_text()
    with start_server_subprocess("--store", db) as (_, url):
        stored = await stored_by_id(url)
    missing = [m["msg_id"] for m in acked if m["msg_id"] not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages were not stored"
    assert not [p for p, n in positions(acked).items() if n > 1]


def test_second_server_on_one_store_exits_2(tmp_path: Path) -> None:
    db = str(tmp_path / "store.db")
    with start_server_subprocess("--store", db) as (first, _):
        second = subprocess.run(
            [*first.args[:3], "serve", "--host", "127.0.0.1", "--port", "0", "--store", db],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2
        assert second.stdout == ""
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "in use" in lines[0]
        assert f"pid {first.pid}" in lines[0]
        assert first.poll() is None  # the first one serves on
