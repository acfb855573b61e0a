"""``bulksend serve --store``: a 200 means the message is stored. kill -9 under load, a
failing disk, and two servers on one store, each against a real subprocess server and a
real client (aiohttp) over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bulksend.errors import ConfigError
from bulksend.server import journal
from tests.serve_helpers import (
    list_messages,
    messages_path,
    read_url,
    spawn_server,
    start_server_inprocess,
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


# --- a --store file that is not a whole bulksend store -------------------------------------

#: 20 zero bytes written at each of these offsets of a 3,000-message store: in the page
#: header (SQLite itself refuses), in a msg_id (a message no msg_id lookup would find), and
#: in cell headers (NULLs and rows out of order, a restore that met them crashed).
DAMAGE_AT = (8_192, 20_000, 40_000, 100_000, 200_000)


@pytest.fixture(scope="module")
def store_3000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 3,000 messages written by the real server, one message after another (so
    its pages are laid out the same in every run), closed cleanly."""
    db = tmp_path_factory.mktemp("store") / "store.sqlite"

    async def send_all(url: str) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            for i in range(3000):
                payload = json.dumps({"topic": "t", "body": f"r-{i}"}).encode()
                async with s.post(
                    url + messages_path("i"),
                    data=payload,
                    headers={"Content-Type": "application/json"},
                ) as r:
                    assert r.status == 200, await r.text()

    with start_server_subprocess("--store", str(db)) as (_, url):
        asyncio.run(send_all(url))
    return db


def serve_refuses(store: Path) -> str:
    """Run ``bulksend serve --store store``, which must refuse it: exit 2, one line on
    stderr, no traceback, nothing on stdout, the file untouched. That line."""
    before, files = store.read_bytes(), sorted(os.listdir(store.parent))
    proc = spawn_server("--store", str(store), stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bulksend serve opened {store} and served it")
    finally:
        stop(proc)
    assert (proc.returncode, out) == (2, ""), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bulksend: error: cannot open --store {store}: "), err
    assert store.read_bytes() == before
    assert sorted(os.listdir(store.parent)) == files  # no -wal or -shm left behind
    return lines[0]


@pytest.mark.parametrize("offset", DAMAGE_AT)
def test_a_damaged_store_is_refused(store_3000: Path, tmp_path: Path, offset: int) -> None:
    damaged = tmp_path / "damaged.sqlite"
    data = bytearray(store_3000.read_bytes())
    assert offset + 20 <= len(data) and any(data[offset : offset + 20])
    data[offset : offset + 20] = bytes(20)
    damaged.write_bytes(data)
    line = serve_refuses(damaged)
    assert "damaged" in line or "malformed" in line, line


def test_the_undamaged_store_opens_with_every_message(store_3000: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(store_3000.read_bytes())

    async def listed(url: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            return await list_messages(s, url, instance_id="i", topic="t")

    with start_server_subprocess("--store", str(copy)) as (_, url):
        stored = asyncio.run(listed(url))
    assert sorted(m["body"] for m in stored) == sorted(f"r-{i}" for i in range(3000))


def test_a_foreign_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "people.sqlite"
    with contextlib.closing(sqlite3.connect(foreign)) as db, db:
        db.execute("CREATE TABLE people (name TEXT)")
        db.execute("INSERT INTO people VALUES ('alice')")
    line = serve_refuses(foreign)
    assert "not a bulksend store" in line, line
    with contextlib.closing(sqlite3.connect(foreign)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master")]
    assert tables == ["people"]


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a database\n" * 200)
    serve_refuses(text)


#: The table every earlier bulksend created, without marking the file.
OLD_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages (\n"
    "    seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL, instance_id TEXT NOT NULL,\n"
    "    topic TEXT NOT NULL, broker INTEGER NOT NULL, queue_id INTEGER NOT NULL,\n"
    "    queue_offset INTEGER NOT NULL, body TEXT NOT NULL, properties TEXT NOT NULL,\n"
    "    keys TEXT, store_ts INTEGER NOT NULL, born_ts INTEGER NOT NULL,\n"
    "    born_host TEXT NOT NULL)"
)


def test_a_store_of_an_earlier_bulksend_is_accepted_and_marked(tmp_path: Path) -> None:
    """Earlier versions created the same table without marking the file: such a store is
    opened, its messages restored, and marked as bulksend's from then on."""
    db = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(OLD_SCHEMA)
        conn.executemany(
            "INSERT INTO messages VALUES (?, ?, 'i', 't', 0, ?, ?, ?, '[]', NULL, ?, ?, 'h:1')",
            [
                (seq, f"{'AB' * 8}{seq:016X}", seq % 4, seq // 4, f"old-{seq}", 1000 + seq, 1000)
                for seq in range(10)
            ],
        )
        assert conn.execute("PRAGMA application_id").fetchone() == (0,)

    async def send_one(url: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            payload = json.dumps({"topic": "t", "body": "new"}).encode()
            async with s.post(
                url + messages_path("i"), data=payload, headers={"Content-Type": "application/json"}
            ) as r:
                assert r.status == 200, await r.text()
                sent = await r.json()
            return sent, await list_messages(s, url, instance_id="i", topic="t")

    with start_server_subprocess("--store", str(db)) as (_, url):
        sent, stored = asyncio.run(send_one(url))
    # The restore continued the old store: arrival number 10, queue 10 % 4 at offset 10 // 4.
    assert sent["msg_id"].endswith(f"{10:016X}")
    assert (sent["queue_id"], sent["queue_offset"]) == (2, 2)
    assert [m["body"] for m in stored] == [f"old-{seq}" for seq in range(10)] + ["new"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone() != (0,)
        assert conn.execute("PRAGMA user_version").fetchone() != (0,)


def make_db(path: Path, *statements: str) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in statements:
            conn.execute(statement)
    return path


@pytest.mark.parametrize(
    ("statements", "why"),
    [
        (["CREATE TABLE messages (id INTEGER PRIMARY KEY, text TEXT)"], "messages table is not"),
        ([OLD_SCHEMA, "CREATE TABLE people (name TEXT)"], "also holds table people"),
        (['CREATE TABLE "a\nb" (x)'], "no messages table; it holds table 'a\\nb'"),
        ([OLD_SCHEMA, "PRAGMA application_id=1"], "application_id 0x1"),
        ([OLD_SCHEMA, "PRAGMA user_version=7"], "user_version 7"),
        ([OLD_SCHEMA, "PRAGMA application_id=0x42534E44", "PRAGMA user_version=2"], "format 2"),
    ],
    ids=[
        "other-messages-table",
        "other-tables-too",
        "newline-in-a-name",
        "other-program",
        "other-version",
        "newer",
    ],
)
async def test_a_database_that_is_not_a_bulksend_store_is_refused(
    tmp_path: Path, statements: list[str], why: str
) -> None:
    db = make_db(tmp_path / "other.sqlite", *statements)
    before = db.read_bytes()
    with pytest.raises(ConfigError) as refused:
        async with start_server_inprocess(store_path=str(db)):
            pass
    assert str(refused.value).startswith(f"cannot open --store {db}: "), refused.value
    assert why in str(refused.value)
    assert db.read_bytes() == before


async def test_a_store_with_an_earlier_bulksends_index_is_accepted(tmp_path: Path) -> None:
    """One earlier version kept an index on the store time and a table of keys as well."""
    db = make_db(
        tmp_path / "old.sqlite",
        OLD_SCHEMA,
        "CREATE TABLE message_keys (key TEXT NOT NULL, seq INTEGER NOT NULL,"
        " PRIMARY KEY (key, seq)) WITHOUT ROWID",
        "CREATE INDEX messages_store_ts ON messages (store_ts)",
        "INSERT INTO messages VALUES (0, 'ABABABABABABABAB0000000000000000', 'i', 't', 0, 0, 0,"
        " 'old', '[]', NULL, 1000, 1000, 'h:1')",
    )
    async with start_server_inprocess(store_path=str(db)) as server:
        assert [m.body for m in await server.store.messages()] == ["old"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone() == (0x42534E44,)


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE messages SET queue_offset = 'twelve' WHERE seq = 1",
        "UPDATE messages SET store_ts = 1.5 WHERE seq = 1",
        "UPDATE messages SET broker = -1 WHERE seq = 1",
        "UPDATE messages SET msg_id = 'ABABABABABABABAB0000000000000007' WHERE seq = 1",
    ],
    ids=["text-offset", "real-time", "negative-broker", "msg_id-of-another-seq"],
)
async def test_a_row_bulksend_never_writes_is_refused(tmp_path: Path, damage: str) -> None:
    db = str(tmp_path / "store.sqlite")
    async with start_server_inprocess(store_path=db) as server:
        for i in range(3):
            server.store.append("i", "t", f"m{i}", (), "h:1", 1000 + i)
        await server.store.flush()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(damage)
    with pytest.raises(ConfigError, match="message 1 holds values bulksend never writes"):
        async with start_server_inprocess(store_path=db):
            pass


async def test_a_store_cut_short_while_created_opens_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new store's table and mark are one transaction: a creation that stops half way
    (here: writing the format refused) leaves a file the next open takes as new, never a
    table with half a mark that it would refuse."""
    db = str(tmp_path / "store.sqlite")
    connect = sqlite3.connect

    def refusing_the_format(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)

        def authorize(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
            writes_format = action == sqlite3.SQLITE_PRAGMA and arg1 == "user_version" and arg2
            return sqlite3.SQLITE_DENY if writes_format else sqlite3.SQLITE_OK

        conn.set_authorizer(authorize)
        return conn

    with monkeypatch.context() as patched:
        patched.setattr(journal.sqlite3, "connect", refusing_the_format)
        with pytest.raises(ConfigError, match="not authorized"):
            async with start_server_inprocess(store_path=db):
                pass
    async with start_server_inprocess(store_path=db) as server:
        server.store.append("i", "t", "first", (), "h:1", 1000)
        await server.store.flush()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
