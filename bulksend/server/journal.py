"""The SQLite journal behind ``--store FILE``: a message is answered only once it is stored.

Group commit, as databases do it: ``add`` appends a message to the open batch and returns
that batch's ``Commit`` (one asyncio Future for the whole batch). One writer thread owns
the write connection; it commits one batch at a time, in one transaction, and while it
writes, the next batch fills. When a commit ends, its Future resolves (None, or the error)
and the server releases that batch's answers; the next batch goes to the writer at once.
So a message waits for at most two commits, and under load batches grow by themselves
(64 connections: ~30 messages a commit) and the per-commit cost is shared.

WAL with ``synchronous=NORMAL``: a commit is in the WAL file before its answers leave, so
it survives the process dying (kill -9), not necessarily the machine losing power.

Subtleness ahead! A failed commit (disk full, I/O error) stores none of its batch: every
message in it, and in the batch filling behind it, is answered 500, and the journal
refuses every message after (``failed``), so no offset is ever handed out that a restart
could hand out again: offsets and arrival numbers are restored from what is stored.

ListMessages reads on a connection and thread of its own, so a long read never holds up a
commit (WAL lets readers and the writer run at once); it sees every committed message,
hence every acknowledged one. No index but the primary key (an index on the store time
and a table of keys made each insert 2.8 times as costly, measured: 10.5 µs a message
against 3.7): a msg_id is found by its arrival number, and a time range, which every
query without msg_id has, becomes a range of arrival numbers by bisection, store times
never decreasing; only the rows in that range are scanned, for ``key`` too.

One server per file: an exclusive ``flock`` on the file itself, taken before SQLite opens
it and held until the journal is closed (SQLite's own locks are POSIX locks; Linux keeps
the two apart). A second server fails to open the store, naming the pid that holds it.

Nothing is served from a file, nor written to it, before it is known to be a whole
bulksend store: marked as one (``application_id``, ``user_version``; an earlier
bulksend's unmarked store with the same table is marked), its pages whole (``PRAGMA
quick_check``), and every row holding what bulksend writes, so a restore never meets a
NULL or hands out offsets read from a damaged page. Anything else raises NotAStore or
DamagedStore, the file as it was found.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import orjson

from bulksend.server.store import (
    Commit,
    MessageQuery,
    QueueState,
    Restored,
    StoredMessage,
    StoreError,
    seq_of_msg_id,
)

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
    store_ts       INTEGER NOT NULL,      -- ms since the epoch, never decreasing with seq
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
#: The first row at or after an arrival number (a primary-key lookup).
_STORE_TS_FROM = "SELECT store_ts FROM messages WHERE seq >= ? ORDER BY seq LIMIT 1"


#: The SQLite header's application_id of a bulksend store ("BSND"), set when bulksend
#: creates it, so that no other program's database is taken for one.
APPLICATION_ID = 0x42534E44
#: The header's user_version: the store's format. 1: the ``messages`` table above.
FORMAT = 1

_StoreKind = Literal["new", "marked", "unmarked"]


def _table_info(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("PRAGMA table_info(messages)").fetchall()


def _expected_table_info() -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.execute(_SCHEMA)
        return _table_info(conn)


#: The columns of bulksend's ``messages`` table (name, type, NOT NULL, default, key).
_TABLE_INFO = _expected_table_info()
#: What an earlier bulksend kept next to the table (a keys table, an index on the store
#: time); unused now, and harmless.
_EARLIER_OBJECTS = {("table", "message_keys"), ("index", "messages_store_ts")}


def _names(objects: set[tuple[str, str]]) -> str:
    """ "table people, index x" for a one-line message: a few names, each printable."""
    shown = [
        f"{kind} {name if name.isprintable() else ascii(name)}"
        for kind, name in sorted(objects, key=lambda o: (o[0] != "table", o))[:5]
    ]
    more = f" and {len(objects) - 5} more" if len(objects) > 5 else ""
    return (", ".join(shown) + more) or "nothing"


def _kind(conn: sqlite3.Connection) -> _StoreKind:
    """What the file is: "new" (empty), "marked" (a bulksend store), "unmarked" (an
    earlier bulksend's store, with its schema but no mark). NotAStore for anything else;
    sqlite3.DatabaseError for a file SQLite cannot read."""
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    objects = {
        (kind, name)
        for kind, name in conn.execute("SELECT type, name FROM sqlite_master")
        if not name.startswith("sqlite_")
    }
    if app_id not in (0, APPLICATION_ID):
        raise NotAStore(f"not a bulksend store (application_id {app_id:#x})")
    if app_id == 0 and version == 0 and not objects:
        return "new"
    if ("table", "messages") not in objects:
        raise NotAStore(f"not a bulksend store (no messages table; it holds {_names(objects)})")
    if _table_info(conn) != _TABLE_INFO:
        raise NotAStore("not a bulksend store (its messages table is not bulksend's)")
    others = objects - {("table", "messages"), *_EARLIER_OBJECTS}
    if others:
        raise NotAStore(f"not a bulksend store (it also holds {_names(others)})")
    if app_id == 0:
        if version != 0:
            raise NotAStore(f"not a bulksend store (user_version {version}, no bulksend mark)")
        return "unmarked"
    if version != FORMAT:
        raise NotAStore(f"store format {version}, this bulksend reads format {FORMAT}")
    return "marked"


#: The values the restore reads are what bulksend writes: integers, none negative, and a
#: msg_id of 32 characters ending in the arrival number's 16 hex digits (ListMessages
#: finds a msg_id by them; length() stops at a NUL, so zeroed bytes in it show). NULLs in
#: NOT NULL columns are quick_check's. Text columns are not looked into: bytes damaged
#: inside a body or a topic read as other text, which no check short of a checksum finds.
_ROW_OK = """(
    typeof(broker) = 'integer' AND typeof(queue_id) = 'integer'
    AND typeof(queue_offset) = 'integer' AND typeof(store_ts) = 'integer'
    AND broker >= 0 AND queue_id >= 0 AND queue_offset >= 0 AND store_ts >= 0 AND seq >= 0
    AND length(msg_id) = 32 AND substr(msg_id, 17) = printf('%016X', seq)
)"""
#: The last store time and the first row that is not _ROW_OK, in one scan (the restore
#: needed that scan for the store time anyway).
_LAST_AND_BAD = (
    "SELECT COALESCE(MAX(store_ts), 0),"
    f" MIN(CASE WHEN {_ROW_OK} THEN NULL ELSE seq END) FROM messages"
)
#: Each queue's next offset and message count, for the restore.
_QUEUES = (
    "SELECT instance_id, topic, broker, queue_id, MAX(queue_offset) + 1, COUNT(*)"
    " FROM messages GROUP BY instance_id, topic, broker, queue_id"
)

# Cost at open, measured by benchmarks/bench_serve_open.py on a store of 1,000,000
# messages (100-byte bodies, 257 MiB, in the page cache), in CPU seconds: the restore's
# scans as they were 1.6 s; quick_check 0.35 s (integrity_check costs the same here: what
# it adds checks indexes, and the store has none); the row check 0.66 s more in the
# store-time scan it shares. Start-up grows ~1.6 times, and stays a pass or two over the
# pages the restore reads anyway: cheap enough for every open, the one moment a damaged
# page can be caught before offsets are handed out again from it.


def _check_pages(conn: sqlite3.Connection) -> None:
    """DamagedStore unless SQLite finds every page whole (b-trees, cell order, free list,
    NOT NULL)."""
    problems = [line for (line,) in conn.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        found = "; ".join(
            line
            for problem in problems
            for line in problem.splitlines()
            if line and not line.startswith("***")  # "*** in database main ***"
        )
        raise DamagedStore(f"damaged (quick_check: {found})")


def _restore(conn: sqlite3.Connection) -> Restored:
    """The state to restore; DamagedStore if a row holds values bulksend never writes."""
    (last, bad) = conn.execute(_LAST_AND_BAD).fetchone()
    if bad is not None:
        raise DamagedStore(f"damaged (message {bad} holds values bulksend never writes)")
    queues = [QueueState(*row) for row in conn.execute(_QUEUES)]
    (next_seq,) = conn.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM messages").fetchone()
    return Restored(int(next_seq), queues, int(last))


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


def _first_seq_at(conn: sqlite3.Connection, store_ts: int, lo: int, hi: int) -> int:
    """The first arrival number in [lo, hi] whose store time is >= store_ts (hi: none is),
    by bisection over the primary key: store times never decrease with arrival numbers."""
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(_STORE_TS_FROM, (mid,)).fetchone()
        if row is None or row[0] >= store_ts:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _where(q: MessageQuery, seqs: tuple[int, int] | None) -> tuple[str, list[Any]]:
    """The WHERE clause of a query; ``seqs`` bounds the arrival numbers [first, end)."""
    clauses: list[str] = []
    params: list[Any] = []
    seq = seq_of_msg_id(q.msg_id) if q.msg_id is not None else None
    first, end = seqs if seqs is not None else (None, None)
    for column, value in (
        ("seq = ?", seq),  # the primary key finds a msg_id's row: its arrival number
        ("seq >= ?", first),  # and a time range's rows
        ("seq < ?", end),
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


def _lock(path: str) -> int:
    """An exclusive flock on ``path`` (created if missing); its fd. StoreInUse when another
    process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _flock_holder(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise StoreInUse(f"{path} is in use by another server ({who})") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock_holder(fd: int) -> int | None:
    """The pid holding a FLOCK on fd's file, from /proc/locks (Linux), or None."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks a waiter)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


class StoreInUse(StoreError):
    """Another process (another ``bulksend serve``) has the store file open."""


class NotAStore(StoreError):
    """The file is a database, but not a bulksend store (or one of a format unknown here)."""


class DamagedStore(StoreError):
    """The file is a bulksend store whose pages or rows are damaged."""


class SqliteJournal:
    """Accepted messages in a SQLite file, committed in batches by one writer thread."""

    def __init__(self, path: str, lock_fd: int, commit_interval_s: float) -> None:
        self.path = path
        #: Set once a commit failed; the store then refuses new messages.
        self.failed: BaseException | None = None
        self._lock_fd = lock_fd
        self._loop = asyncio.get_running_loop()
        # One thread owns each connection: writes in order on one, reads on the other.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulksend-store")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulksend-list")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        # The batch filling (messages and the Commit they wait for) and the one being written.
        self._pending: list[StoredMessage] = []
        self._pending_commit: Commit | None = None
        self._kicked = False
        self._writing: asyncio.Future[None] | None = None
        self._interval = commit_interval_s
        self._last_start = -commit_interval_s

    @classmethod
    async def open(
        cls, path: str, *, commit_interval_s: float = 0.0
    ) -> tuple[SqliteJournal, Restored]:
        """Lock and open (or create) the file; the journal and the state to restore.
        ``commit_interval_s``: the least time from one commit's start to the next one's
        (0: commit whenever the writer is free). Raises StoreInUse when another server
        holds the file, sqlite3.Error or OSError when it is unusable."""
        journal = cls(path, _lock(path), commit_interval_s)
        try:
            restored: Restored = await journal._loop.run_in_executor(journal._writer, journal._open)
        except BaseException:
            await journal._shutdown()
            raise
        return journal, restored

    # --- on the writer thread ----------------------------------------------------------

    def _open(self) -> Restored:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        self._wconn = conn
        # Everything is checked before anything is written: a file that is not a whole
        # bulksend store is refused as it was found (no WAL switch, no table added).
        kind = _kind(conn)
        restored = Restored(0, [])
        if kind != "new":
            _check_pages(conn)
            restored = _restore(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if kind != "marked":
            with conn:
                # One transaction (sqlite3 would run each of these on its own): a store
                # is never left with its table but half a mark.
                conn.execute("BEGIN")
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={FORMAT}")
        return restored

    def _write(self, batch: list[StoredMessage]) -> None:
        assert self._wconn is not None
        with self._wconn:  # one transaction: all of the batch or none of it
            self._wconn.executemany(_INSERT, [_row(m) for m in batch])

    def _select(self, q: MessageQuery) -> tuple[list[StoredMessage], int]:
        if self._rconn is None:
            self._rconn = sqlite3.connect(self.path, check_same_thread=False)
        conn = self._rconn
        conn.execute("BEGIN")  # one snapshot for the bounds, the count and the page
        try:
            seqs = None
            if q.msg_id is None and (q.start_time is not None or q.end_time is not None):
                # No index on the store time: its range becomes one of arrival numbers.
                lo, hi = conn.execute("SELECT MIN(seq), MAX(seq) + 1 FROM messages").fetchone()
                if lo is not None:
                    first = (
                        lo if q.start_time is None else _first_seq_at(conn, q.start_time, lo, hi)
                    )
                    end = (
                        hi if q.end_time is None else _first_seq_at(conn, q.end_time + 1, first, hi)
                    )
                    seqs = (first, end)
            where, params = _where(q, seqs)
            (total,) = conn.execute(f"SELECT COUNT(*) FROM messages{where}", params).fetchone()
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages{where} ORDER BY seq LIMIT ? OFFSET ?",
                [*params, q.limit, q.offset],
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return [_message(r) for r in rows], int(total)

    # --- on the event loop -------------------------------------------------------------

    def add(self, message: StoredMessage) -> Commit:
        """Put a message in the open batch; the Commit it waits for. No I/O here."""
        commit = self._pending_commit
        if commit is None:
            commit = self._pending_commit = self._loop.create_future()
            if self._writing is None and not self._kicked:
                self._schedule()
        self._pending.append(message)
        return commit

    def _schedule(self) -> None:
        """Kick the open batch at the end of this loop turn (every request read in it joins
        the batch), or once ``commit_interval_s`` has passed since the last commit began."""
        self._kicked = True
        at = self._last_start + self._interval
        if at > self._loop.time():
            self._loop.call_at(at, self._kick)
        else:
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kicked = False
        commit = self._pending_commit
        if self._writing is not None or commit is None:
            return
        batch, self._pending, self._pending_commit = self._pending, [], None
        if self.failed is not None:
            commit.set_result(self.failed)
            return
        self._last_start = self._loop.time()
        self._writing = self._loop.run_in_executor(self._writer, self._write, batch)
        self._writing.add_done_callback(lambda done: self._written(done, commit))

    def _written(self, done: asyncio.Future[None], commit: Commit) -> None:
        self._writing = None
        exc = StoreError("cancelled") if done.cancelled() else done.exception()
        if exc is not None and self.failed is None:
            self.failed = exc
            print(f"bulksend serve: store {self.path}: write failed: {exc}", file=sys.stderr)
        commit.set_result(self.failed)
        if self._pending_commit is not None and not self._kicked:
            self._schedule()  # the batch that filled meanwhile (failed too, if this one did)

    async def flush(self) -> None:
        """Wait until everything added so far is committed; StoreError if it was not."""
        while self._pending_commit is not None or self._writing is not None:
            commit = self._pending_commit
            if commit is None and self._writing is not None:
                await asyncio.wait({self._writing})  # neither raises nor cancels the write
                continue
            if commit is not None:
                await asyncio.wait({commit})
        if self.failed is not None:
            raise StoreError(f"store {self.path}: {self.failed}")

    async def query(self, query: MessageQuery) -> tuple[list[StoredMessage], int]:
        """Like ``Store.query``, over every committed message; StoreError if unreadable."""
        try:
            result: tuple[list[StoredMessage], int] = await self._loop.run_in_executor(
                self._reader, self._select, query
            )
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}") from None
        return result

    async def close(self) -> None:
        """Commit what remains and close. A failed journal closes quietly: its error was
        printed when it happened, and every message since was answered 500."""
        try:
            await self.flush()
        except StoreError:
            pass
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        def close_reader() -> None:
            if self._rconn is not None:
                self._rconn.close()

        def close_writer() -> None:
            if self._wconn is not None:
                with contextlib.suppress(sqlite3.Error):  # e.g. a checkpoint on a full disk
                    self._wconn.close()

        try:
            await self._loop.run_in_executor(self._reader, close_reader)
            await self._loop.run_in_executor(self._writer, close_writer)
        finally:
            self._reader.shutdown(wait=True)
            self._writer.shutdown(wait=True)
            # Last: closing any fd of the file drops SQLite's POSIX locks on it.
            os.close(self._lock_fd)
