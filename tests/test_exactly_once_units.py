"""--exactly-once's write-ahead without a network: a request may leave only once its
intent is in the ledger file, whichever loop iteration queued it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import orjson

from bulksend.config import Target
from bulksend.reconcile import Reconciler
from bulksend.record import Record
from bulksend.sinks import LineWriter
from bulksend.writeahead import WriteAhead


def record(seq: int) -> Record:
    return Record(seq, f"in.jsonl:{seq + 1}", "orders", f"m{seq}", identity=f"x:{seq + 1}")


def intents_in(path: Path) -> list[int]:
    return [orjson.loads(line)["seq"] for line in path.read_bytes().splitlines()]


async def test_a_request_waits_for_its_own_intents_write(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = LineWriter(str(path))
    reconciler = Reconciler(Target("http://127.0.0.1:9", "p", "i"))
    wa = WriteAhead(reconciler, ledger, salt="1")
    on_disk_when_sent: dict[int, list[int]] = {}
    all_sent = asyncio.Event()

    def sender(seq: int) -> Callable[[BaseException | None], None]:
        def go(error: BaseException | None) -> None:
            assert error is None
            on_disk_when_sent[seq] = intents_in(path)
            if len(on_disk_when_sent) == 3:
                all_sent.set()

        return go

    def intent(seq: int) -> asyncio.Future[None]:
        r = record(seq)
        _, written = wa.intent(r, wa.key(r))
        assert written is not None
        return written

    def queue(seq: int) -> None:
        wa.after(intent(seq), sender(seq))

    # Record 0's intent schedules the ledger's write; a callback scheduled before record
    # 0's send runs between the two in the next iteration and queues record 1, whose
    # intent goes into the next write: record 1 must not leave with record 0.
    written = intent(0)
    asyncio.get_running_loop().call_soon(queue, 1)
    wa.after(written, sender(0))
    queue(2)
    async with asyncio.timeout(5):
        await all_sent.wait()
    ledger.close()
    for seq, on_disk in on_disk_when_sent.items():
        assert seq in on_disk, (seq, on_disk)
    assert on_disk_when_sent[0] == on_disk_when_sent[2] == [0, 2]  # one write for the turn
    assert sorted(intents_in(path)) == [0, 1, 2]


def test_the_summary_gives_the_wait_per_check_not_the_sum_of_overlapping_waits(
    tmp_path: Path,
) -> None:
    wa = WriteAhead(
        Reconciler(Target("http://127.0.0.1:9", "p", "i")),
        LineWriter(str(tmp_path / "ledger.jsonl")),
        salt="1",
    )
    # 40 checks that waited side by side, 5 s each, in a run of about 5 s.
    wa.reconciler.counters.checks, wa.reconciler.counters.waited_s = 40, 200.0
    wa.reconciler.counters.queries = 40
    (line,) = wa.lines(summary=True, complete=True)
    assert line.endswith(
        "40 ListMessages queries for 40 records in doubt, each after 5.0 s on average for the index"
    )
    assert "200" not in line
