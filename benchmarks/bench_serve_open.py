"""What ``bulksend serve --store`` pays at open to check the store, against the restore it
always did, on a store of N messages.

    python benchmarks/bench_serve_open.py [--messages 1000000] [--body 100] [--repeat 3]
        [--dir DIR]

The store is written once (straight into SQLite, the rows the server writes) and kept in
DIR for later runs. Each step runs on a fresh connection, best of --repeat; the file is in
the page cache after the first pass, so the figures are CPU-bound scans, and CPU seconds
(this process's) hold when other work shares the machine, where wall seconds do not.

Baseline, measured in the same run: the restore as open did it before the checks (its
GROUP BY of the queues and two MAX scans). Then quick_check, integrity_check (for
comparison), and ``journal._restore`` (the restore with the row check in its store-time
scan); the ratios say what start-up grows by.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulksend.server import journal
from bulksend.server.store import StoredMessage

_OLD_RESTORE = (
    "SELECT instance_id, topic, broker, queue_id, MAX(queue_offset) + 1, COUNT(*)"
    " FROM messages GROUP BY instance_id, topic, broker, queue_id",
    "SELECT COALESCE(MAX(seq) + 1, 0) FROM messages",
    "SELECT COALESCE(MAX(store_ts), 0) FROM messages",
)


def build(path: Path, messages: int, body: int) -> None:
    """A marked store of ``messages`` rows like the server's (8 queues, one KEYS each)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    with conn:
        conn.execute(journal._SCHEMA)
        conn.execute(f"PRAGMA application_id={journal.APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={journal.FORMAT}")
    text = "x" * body
    instance = "11111111-2222-3333-4444-555555555555"
    for start in range(0, messages, 100_000):
        rows = []
        for seq in range(start, min(messages, start + 100_000)):
            at = 1_796_000_000_000 + seq
            message = StoredMessage(
                seq, f"{'AB' * 8}{seq:016X}", instance, "orders", text, (("KEYS", f"k{seq}"),),
                0, seq % 8, seq // 8, at, at, "127.0.0.1:45678",
            )  # fmt: skip
            rows.append(journal._row(message))
        with conn:
            conn.executemany(journal._INSERT, rows)
    conn.close()


def timed(path: Path, what: str, step: Callable[[sqlite3.Connection], Any], repeat: int) -> float:
    """The step's CPU seconds, best of ``repeat``, each on a fresh connection; printed."""
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(repeat):
        conn = sqlite3.connect(path)
        wall, cpu = time.perf_counter(), time.process_time()
        step(conn)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        conn.close()
    print(f"  {what:<46} cpu {best_cpu:6.3f} s   wall {best_wall:6.3f} s")
    return best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--body", type=int, default=100, help="body bytes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    path = Path(args.dir) / f"bench_serve_open_{args.messages}_{args.body}.sqlite"
    if not path.exists():
        build(path, args.messages, args.body)
    size = path.stat().st_size / 2**20
    print(f"store: {args.messages:,} messages, {args.body}-byte bodies, {size:.0f} MiB ({path})")

    def old_restore(conn: sqlite3.Connection) -> None:
        for query in _OLD_RESTORE:
            conn.execute(query).fetchall()

    def pragma(name: str) -> Callable[[sqlite3.Connection], Any]:
        return lambda conn: conn.execute(f"PRAGMA {name}(3)").fetchall()

    base = timed(path, "baseline: the restore before the checks", old_restore, args.repeat)
    timed(path, "mark and schema (journal._kind)", journal._kind, args.repeat)
    quick = timed(path, "PRAGMA quick_check", pragma("quick_check"), args.repeat)
    timed(path, "PRAGMA integrity_check (not used)", pragma("integrity_check"), args.repeat)
    restore = timed(
        path, "restore with the row check (journal._restore)", journal._restore, args.repeat
    )
    per_million = 1e6 / args.messages
    print(
        f"quick_check: {quick:.2f} CPU s ({quick * per_million:.2f} a million messages),"
        f" {quick / base:.2f} x the baseline"
    )
    print(f"row check: {restore - base:+.2f} CPU s on the restore ({restore / base:.2f} x)")
    print(
        f"open's checks and restore: {quick + restore:.2f} CPU s against {base:.2f},"
        f" {(quick + restore) / base:.2f} x the baseline"
    )


if __name__ == "__main__":
    main()
