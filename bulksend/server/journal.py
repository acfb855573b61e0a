"""The SQLite journal behind ``--store FILE``: accepted messages survive restarts.

Kept off the hot path: ``add`` only appends to a list. A commit happens at most every
``commit_interval_s`` (20 ms by default), on one dedicated writer thread that owns the
connection, so batches grow by themselves when the disk is slow and the event loop never
waits for SQLite. WAL with ``synchronous=NORMAL``: a commit survives the process dying,
not necessarily the machine losing power.

Subtleness ahead! An answer goes out before its message is committed, so a SIGKILL can lose
up to one commit interval of acknowledged messages. SIGINT/SIGTERM and leaving
``run_server`` commit everything first. ListMessages (and ``Store.query``) flushes before
it reads, so it sees every message accepted before it was asked.

No index but the primary key: inserts stay cheap, and ListMessages scans (~0.1 s per
million rows), which is fine for a test server.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from bulksend.server.store import MessageQuery, QueueState, Restored, StoredMessage, StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq            INTEGER PRIMARY KEY,  -- arrival number, continues across restarts
    msg_id         TEXT NOT NULL,
    instance_id    TEXT NOT NULL,
    topic          TEXT NOT NULL,
    broker         INTEGER NOT NULL,
    queue_id       INTEGER NOT NULL,
    queue_offset   INTEGER NOT NULL,
    body           TEXT NOT NULL,
    properties     TEXT NOT NULL,         -- JSON [[name, value], ...]
    keys           TEXT,                  -- ' k1 k2 ' (padded for whole-word instr), or NULL
    store_ts       INTEGER NOT NULL,      -- ms since the epoch
    born_ts        INTEGER NOT NULL,
    born_host      TEXT NOT NULL
)
"""
_COLUMNS = (
    "seq, msg_id, instance_id, topic, body, properties, broker, queue_id, queue_offset, "
    "store_ts, born_ts, born_host"
)
_INSERT = (
    "INSERT INTO messages (seq, msg_id, instance_id, topic, broker, queue_id, queue_offset,"
    " body, properties, keys, store_ts, born_ts, born_host)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _row(m: StoredMessage) -> tuple[Any, ...]:
    keys = m.keys
    return (
        m.seq, m.msg_id, m.instance_id, m.topic, m.broker, m.queue_id, m.queue_offset,
        m.body, orjson.dumps(m.properties).decode(), f" {' '.join(keys)} " if keys else None,
        m.store_timestamp, m.born_timestamp, m.born_host,
    )  # fmt: skip


def _message(row: tuple[Any, ...]) -> StoredMessage:
    seq, msg_id, instance_id, topic, body, props, broker, queue_id, offset, store, born, host = row
    properties = tuple((str(n), str(v)) for n, v in orjson.loads(props))
    return StoredMessage(
        seq, msg_id, instance_id, topic, body, properties, broker, queue_id, offset, store, born,
        host,
    )  # fmt: skip


def _where(q: MessageQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("instance_id = ?", q.instance_id),
        ("topic = ?", q.topic),
        ("queue_id = ?", q.queue),
        ("msg_id = ?", q.msg_id),
        ("store_ts >= ?", q.start_time),
        ("store_ts <= ?", q.end_time),
    ):
        if value is not None:
            clauses.append(column)
            params.append(value)
    if q.keys:
        clauses.append("(" + " OR ".join("instr(keys, ?) > 0" for _ in q.keys) + ")")
        params.extend(f" {k} " for k in q.keys)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class SqliteJournal:
    """Accepted messages in a SQLite file, written in batches by one thread."""

    def __init__(self, path: str, commit_interval_s: float) -> None:
        self.path = path
        self.failed: BaseException | None = None
        self._interval = commit_interval_s
        self._loop = asyncio.get_running_loop()
        # One thread owns the connection; its FIFO queue orders writes before reads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulksend-store")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[StoredMessage] = []
        self._scheduled = False
        self._writing: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls, path: str, *, commit_interval_s: float = 0.02
    ) -> tuple[SqliteJournal, Restored]:
        """Open (or create) the file; return the journal and the state to restore."""
        journal = cls(path, commit_interval_s)
        try:
            restored = await journal._run(journal._open)
        except BaseException:
            journal._executor.shutdown(wait=False)
            raise
        return journal, restored

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._loop.run_in_executor(self._executor, fn, *args)

    # --- on the writer thread ----------------------------------------------------------

    def _open(self) -> Restored:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
        conn.commit()
        self._conn = conn
        queues = [
            QueueState(*row)
            for row in conn.execute(
                "SELECT instance_id, topic, broker, queue_id, MAX(queue_offset) + 1, COUNT(*)"
                " FROM messages GROUP BY instance_id, topic, broker, queue_id"
            )
        ]
        (next_seq,) = conn.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM messages").fetchone()
        return Restored(int(next_seq), queues)

    def _write(self, batch: list[StoredMessage]) -> None:
        assert self._conn is not None
        with self._conn:  # one transaction, committed on leaving
            self._conn.executemany(_INSERT, [_row(m) for m in batch])

    def _select(self, q: MessageQuery) -> tuple[list[StoredMessage], int]:
        assert self._conn is not None
        where, params = _where(q)
        (total,) = self._conn.execute(f"SELECT COUNT(*) FROM messages{where}", params).fetchone()
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM messages{where} ORDER BY seq LIMIT ? OFFSET ?",
            [*params, q.limit, q.offset],
        ).fetchall()
        return [_message(r) for r in rows], int(total)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- on the event loop -------------------------------------------------------------

    def add(self, message: StoredMessage) -> None:
        self._pending.append(message)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_later(self._interval, self._kick)

    def _kick(self) -> None:
        self._scheduled = False
        # One write at a time: while one runs, the next batch keeps growing.
        if self._writing is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._writing = self._loop.run_in_executor(self._executor, self._write, batch)
        self._writing.add_done_callback(self._written)

    def _written(self, fut: asyncio.Future[None]) -> None:
        self._writing = None
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None and self.failed is None:
            self.failed = exc
            print(f"bulksend serve: store {self.path}: write failed: {exc}", file=sys.stderr)
        if self._pending and not self._scheduled:
            self._scheduled = True
            self._loop.call_later(self._interval, self._kick)

    async def flush(self) -> None:
        while self._writing is not None or self._pending:
            if self._writing is None:
                self._kick()
            if self._writing is not None:
                # wait() neither raises the write's error nor cancels it if we are cancelled.
                await asyncio.wait({self._writing})
            if self.failed is not None:
                break
        if self.failed is not None:
            raise StoreError(f"store {self.path}: {self.failed}")

    async def query(self, query: MessageQuery) -> tuple[list[StoredMessage], int]:
        await self.flush()
        result: tuple[list[StoredMessage], int] = await self._run(self._select, query)
        return result

    async def close(self) -> None:
        """Commit what remains and close. A failed journal closes quietly: its error was
        printed when it happened, and every send since was answered 500."""
        try:
            await self.flush()
        except StoreError:
            pass
        finally:
            await self._run(self._close)
            self._executor.shutdown(wait=True)
